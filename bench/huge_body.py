"""What one huge request body costs: server memory, and the event loop's answers meanwhile.

    python bench/huge_body.py                         # 2.65 M rows (about 30 MB), 3 runs
    python bench/huge_body.py --rows 1000000 --runs 1
    python bench/huge_body.py --source /path/to/other/checkout   # the same against other code
    python bench/huge_body.py --parse-only            # in-process: the event loop while parsing

Starts `framework serve` (one worker) on loopback with `max_rows` and
`max_body_bytes` raised to take the body, deploys this repo's examples into a
temporary store, and posts `{"data": [[id, n], ...]}` to `example_doubler`,
once alone (`--runs` times) and then `--concurrent` at once. Meanwhile a
thread polls the server's resident memory and another asks `/livez` in a
loop. Prints, as medians over the runs: the body's size, the time to the
answer, the server's RSS before, at its peak and after, and the slowest
`/livez` answer during the request next to the median one while idle.

`--parse-only` parses the body in this process, with the server's garbage
collector settings, three ways: on the event loop, with `protocol.parse` on a
thread, and with `bigbody.parse_large` on a thread (what the server does),
and prints the longest time the event loop went without a turn meanwhile.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

from servers import Server, free_port, post

REPO = Path(__file__).resolve().parent.parent
PATH = "/v1/example_doubler/latest"


def livez_s(port: int) -> float:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/livez")
        conn.getresponse().read()
    finally:
        conn.close()
    return time.perf_counter() - start


class Watch:
    """Polls RSS and /livez until stopped (bounded by the request it watches)."""

    def __init__(self, server: Server) -> None:
        self.server, self.peak_mb, self.livez = server, 0.0, [0.0]
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._rss), threading.Thread(target=self._livez)]
        for t in self.threads:
            t.start()

    def _rss(self) -> None:
        while not self.done.is_set():
            self.peak_mb = max(self.peak_mb, self.server.rss_mb())
            time.sleep(0.01)

    def _livez(self) -> None:
        while not self.done.is_set():
            self.livez.append(livez_s(self.server.port))
            time.sleep(0.005)

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(120)


def one_round(server: Server, body: bytes, concurrent: int) -> dict[str, float]:
    before = server.rss_mb()
    watch = Watch(server)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrent) as pool:
        answers = list(pool.map(lambda _: post(server.port, PATH, body, timeout=600), range(concurrent)))
    took = time.perf_counter() - start
    watch.stop()
    for status, answer in answers:
        if status != 200:
            raise SystemExit(f"answered {status}: {answer[:300]!r}")
    time.sleep(1)  # the answer's objects are freed as the request ends
    return {"answer_s": took, "rss_before_mb": before, "rss_peak_mb": watch.peak_mb,
            "rss_after_mb": server.rss_mb(), "livez_worst_ms": max(watch.livez) * 1000}


async def _loop_gaps(parse, body: bytes, on_loop: bool) -> tuple[float, float]:
    """(seconds the parse took, the longest the loop went without running a 1 ms sleep)."""
    import asyncio

    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    start = time.perf_counter()
    if on_loop:
        parse(body, None)
    else:
        await asyncio.to_thread(parse, body, None)
    took = time.perf_counter() - start
    await asyncio.sleep(0.01)
    stop.set()
    await task
    return took, max(gaps)


def parse_only(body: bytes, runs: int) -> None:
    import uvloop

    from framework.serve import bigbody
    from framework import protocol
    from framework.serve.server import tune_gc

    tune_gc()
    ways = (("protocol.parse on the loop", protocol.parse, True),
            ("protocol.parse on a thread", protocol.parse, False),
            ("bigbody.parse_large on a thread", bigbody.parse_large, False))
    results: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in ways}
    for _ in range(runs):
        for label, parse, on_loop in ways:
            results[label].append(uvloop.run(_loop_gaps(parse, body, on_loop)))
    base = statistics.median(gap for _, gap in results[ways[0][0]])
    for label, found in results.items():
        took, gap = statistics.median(t for t, _ in found), statistics.median(g for _, g in found)
        print(f"{label}: parse {took:.2f} s, loop's longest wait {gap * 1000:.0f} ms "
              f"({gap / base:.2f}x on the loop's)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_650_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=4)
    ap.add_argument("--source", type=Path, default=REPO, help="the checkout whose framework serves")
    ap.add_argument("--server", default="", help="more server settings, YAML: 'cache_size: 8'")
    ap.add_argument("--parse-only", action="store_true", help="in this process, no server")
    args = ap.parse_args()
    body = orjson.dumps({"data": [[i, i % 10] for i in range(args.rows)]})
    if args.parse_only:
        print(f"body {len(body) / 2**20:.1f} MiB, {args.rows:,} rows; median of {args.runs}")
        return parse_only(body, args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAMEWORK_")}
        env.update(FRAMEWORK_STORE=f"{tmp}/store", PYTHONPATH=str(args.source.resolve()), TMPDIR=tmp)
        subprocess.run([sys.executable, "-m", "framework", "deploy"], cwd=args.source, env=env,
                       check=True, capture_output=True)
        limits = f"max_body_bytes: {2 * len(body) + 1024}, timeout_seconds: 600"
        if "max_rows" in (args.source / "framework" / "config.py").read_text():
            limits += f", max_rows: {args.rows}, body_timeout_seconds: 600"
        extra = f", {args.server}" if args.server else ""
        Path(tmp, "deploy.yaml").write_text(f"server: {{{limits}, access_log: false{extra}}}\n")
        port = free_port()
        server = Server("huge-body", [sys.executable, "-m", "framework", "serve", "--port", str(port)],
                        env=env, cwd=Path(tmp), probe=PATH, body=b'{"data": [[1, 1]]}', port=port)
        try:
            idle_ms = statistics.median(livez_s(port) for _ in range(50)) * 1000
            print(f"source {args.source} {args.server}; body {len(body) / 2**20:.1f} MiB, {args.rows:,} rows; "
                  f"/livez idle median {idle_ms:.2f} ms")
            for concurrent, runs in ((1, args.runs), (args.concurrent, 1)):
                results = [one_round(server, body, concurrent) for _ in range(runs)]
                med = {k: statistics.median(r[k] for r in results) for k in results[0]}
                print(f"{concurrent} at once (median of {runs}): answer {med['answer_s']:.2f} s; "
                      f"RSS before {med['rss_before_mb']:.0f} MiB, peak {med['rss_peak_mb']:.0f} MiB "
                      f"(+{med['rss_peak_mb'] - med['rss_before_mb']:.0f} MiB, "
                      f"{(med['rss_peak_mb'] - med['rss_before_mb']) * 2**20 / len(body) / concurrent:.1f}x "
                      f"the body each), after {med['rss_after_mb']:.0f} MiB; /livez worst "
                      f"{med['livez_worst_ms']:.0f} ms ({med['livez_worst_ms'] / idle_ms:.0f}x idle)")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
