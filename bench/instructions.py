"""Instructions per request, counted by valgrind: the bare apps against ours, in-process.

    python bench/instructions.py                 # about 5 minutes; needs valgrind
    python bench/instructions.py --check         # each app a few requests, no valgrind

Throughput on a shared machine moves by a tenth from run to run; instruction
counts do not. Each app answers requests through ASGI directly (no HTTP: the
server's own cost is the same for both) inside `valgrind --tool=callgrind`,
once with `--requests` more requests than the other; the difference, divided
by that number, is what one request costs. Kernel time (system calls) is not
counted.

Ours runs in its default mode: each call on its version's own thread, so
the count includes the handoff to that thread and back (both threads' work
is counted); and with `inline=True`, on the event loop. The bare apps are
*bare-inline* (the function called on the event loop) and *bare-safe* (the
same work in Starlette's thread pool).

Under valgrind the clock runs some fifty times slower than the code would, so
work done per unit of time (re-reading `latest` and the API keys, formatting
the log's timestamp) would be counted many times more often per request than
at full speed: the child turns those off.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
BODIES = {"single": b'{"data": [[1, 10]]}', "call": b'{"data": 10}'}
BARES = ("bare-inline", "bare-safe")
# Ours: (kind, configuration); kind "ours" calls the doubler in the default mode, "ours-inline"
# its `inline=True` twin.
CONFIGS = {"ours": ("ours", "server: {}\n"),
           "ours, metrics and log off": ("ours", "server: {metrics: false, access_log: false}\n"),
           "ours, `inline=True`": ("ours-inline", "server: {}\n")}
PATHS = {"ours-inline": "/v1/doubler_inline/latest"}
WARMUP = 500


def _scope(body: bytes, path: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
            "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]}


async def _requests(app, body: bytes, n: int, path: str = "/v1/doubler/latest") -> None:
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise RuntimeError(f"answered {message['status']}")

    for _ in range(n):
        await app(_scope(body, path), receive, send)


async def _child(kind: str, config: str | None, case: str, n: int) -> None:
    import gc

    if kind in BARES:
        sys.path.insert(0, str(BENCH))
        import bare_app

        bare = bare_app.safe_app if kind == "bare-safe" else bare_app.app
        await _requests(bare, BODIES[case], WARMUP)
        gc.freeze()
        await _requests(bare, BODIES[case], n)
        return
    from framework import config as cfgmod
    from framework.serve import accesslog
    from framework.serve.app import create_app

    accesslog.AccessLog.timestamp = lambda self, seconds: b"2026-01-01T00:00:00.000+00:00"  # type: ignore[method-assign]
    app = create_app(cfgmod.load(config))
    app.state.runtime.versions.ttl = 1e9
    app.middleware_stack = layer = app.build_middleware_stack()
    while layer is not None:  # the key ring, in the auth middleware
        if hasattr(layer, "ring"):
            layer.ring.ttl = 1e9
        layer = getattr(layer, "app", None)
    path = PATHS.get(kind, "/v1/doubler/latest")
    async with app.router.lifespan_context(app):
        await _requests(app, BODIES[case], WARMUP, path)
        gc.freeze()
        await _requests(app, BODIES[case], n, path)


def _count(kind: str, config: Path | None, case: str, n: int, store: Path, valgrind: bool = True) -> int:
    """Instructions a child process ran, answering `n` requests after the warm-up."""
    tool = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"] if valgrind else []
    argv = [*tool, sys.executable, __file__, "--child", kind, str(config or ""), case, str(n)]
    env = {**os.environ, "PYTHONHASHSEED": "0", "FRAMEWORK_STORE": str(store)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or (valgrind and found is None):
        raise RuntimeError(f"{kind} {case} failed:\n{done.stderr[-3000:]}")
    return int(found.group(1)) if found else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=4000, help="requests counted per app and case")
    p.add_argument("--check", action="store_true", help="a few requests per app, without valgrind")
    p.add_argument("--child", nargs=4, metavar=("KIND", "CONFIG", "CASE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, config, case, n = args.child
        asyncio.run(_child(kind, config or None, case, int(n)))
        return 0
    if shutil.which("valgrind") is None and not args.check:
        print("valgrind is not installed (apt install valgrind); it counts the instructions",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(BENCH))
    import run

    with tempfile.TemporaryDirectory(prefix="framework-instructions-") as tmp:
        store = run.make_store(Path(tmp), 1)
        apps: dict[str, tuple[str, Path | None]] = {label: (label, None) for label in BARES}
        for label, (kind, text) in CONFIGS.items():
            apps[label] = (kind, Path(tmp) / f"{len(apps)}.yaml")
            apps[label][1].write_text(text)
        print("| case | " + " | ".join(apps) + " |")
        print("|---|" + "---|" * len(apps))
        if args.check:
            for kind, config in apps.values():
                for case in BODIES:
                    _count(kind, config, case, 10, store, valgrind=False)
            print("each app answered every case")
            return 0
        for case in BODIES:
            counts = {}
            for label, (kind, config) in apps.items():
                print(f"counting {label}, {case} ...", file=sys.stderr, flush=True)
                low = _count(kind, config, case, 0, store)
                counts[label] = (_count(kind, config, case, args.requests, store) - low) / args.requests
            inline, safe = counts["bare-inline"], counts["bare-safe"]
            cells = [f"{c:,.0f}" + ("" if label in BARES else
                                    f" ({c / inline:.2f}x bare-inline, {c / safe:.2f}x bare-safe)")
                     for label, c in counts.items()]
            print(f"| {case}, instructions per request | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
