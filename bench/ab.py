"""This checkout's server against another commit's, side by side, on the same cases.

    git worktree add /tmp/before HEAD~1
    python bench/ab.py --before /tmp/before --rounds 8          # the numpy MLP's three paths
    python bench/ab.py --before /tmp/before --path /v1/doubler/latest --rows 1000

Both servers serve one store made by this checkout (`bench/run.py`'s), the older one
with `PYTHONPATH` set to `--before`, so the only difference is the framework's code. The
runs alternate, before and after, after and before, in every round: a change is judged
by the median of the rounds' ratios, taken minutes apart at most. Prints, writes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import load
import run as bench_run
import servers

MLP_PATHS = ["/v1/mlp_vectorized/latest", "/v1/mlp_rows/latest", "/v1/mlp_vectorized_inline/latest"]


def start(store_dir: Path, pythonpath: str | None) -> servers.Server:
    """Ours on `store_dir`, its framework imported from `pythonpath` when given."""
    saved = os.environ.pop("PYTHONPATH", None)
    if pythonpath is not None:
        os.environ["PYTHONPATH"] = pythonpath
    try:
        return servers.ours(servers.free_port(), store_dir, bench_run.DOUBLER, bench_run.SINGLE)
    finally:
        os.environ.pop("PYTHONPATH", None)
        if saved is not None:
            os.environ["PYTHONPATH"] = saved


def measure(store_dir: Path, paths: list[str], body: bytes, args: argparse.Namespace
            ) -> dict[tuple[str, str], list[float]]:
    """Rows/s per (side, path), one figure per round."""
    running = {"after": start(store_dir, None), "before": start(store_dir, str(args.before))}
    got: dict[tuple[str, str], list[float]] = {(side, path): [] for side in running for path in paths}
    try:
        for server in running.values():
            for path in paths:
                status, answer = servers.post(server.port, path, body)
                if status != 200:
                    raise RuntimeError(f"{server.label} {path} answered {status}: {answer[:300]!r}")
        for n in range(args.rounds):
            order = ["after", "before"] if n % 2 == 0 else ["before", "after"]
            for path in paths:
                for side in order:
                    result = load.run(running[side].url(path), body, connections=args.connections,
                                      seconds=args.seconds)
                    if result.errors:
                        raise RuntimeError(f"{side} {path}: {result.errors} failed requests under load")
                    got[(side, path)].append(result.rps * args.rows)
            print(f"round {n + 1}/{args.rounds}", flush=True)
    finally:
        servers.stop_all(running.values())
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="a checkout of the commit to compare with")
    p.add_argument("--path", action="append", help="the paths measured (repeatable); the MLP's by default")
    p.add_argument("--rows", type=int, default=1000, help="rows per request")
    p.add_argument("--features", type=int, default=4, help="arguments per row (4 for the MLP, 1 for the doubler)")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    args.before = before = Path(args.before).resolve()  # the servers run in the store's folder
    if not (before / "framework" / "__init__.py").is_file():
        sys.exit(f"--before {before}: no framework/ package there; make a checkout with "
                 "`git worktree add <dir> <commit>`")
    paths = args.path or MLP_PATHS
    body = bench_run.batch(args.rows, args.features)
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        got = measure(bench_run.make_store(Path(tmp), 1), paths, body, args)
    print(f"\n| {args.rows:,}-row requests, {args.connections} connections, rows/s | before | after | after / before |")
    print("|---|---|---|---|")
    for path in paths:
        b, a = got[("before", path)], got[("after", path)]
        ratio = statistics.median(x / y for x, y in zip(a, b))
        print(f"| `{path}` | {statistics.median(b):,.0f} | {statistics.median(a):,.0f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
