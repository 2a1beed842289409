"""Per-deployment environments: what a build costs, and a call in an environment's worker.

    python bench/environments.py            # about a minute; needs the package index

Prints medians of: a cold build (empty uv cache: downloads included), a build
with uv's cache warm (a new environment of known packages), a reuse (the
environment exists), and per call, in-process on the version's thread against
the same function in a worker started from its environment.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle

from framework.execute.environments import Environments
from framework.execute.isolation import ProcessLane
from framework.protocol import parse
from framework.execute.runner import Runner


def intcomma(x: int) -> str:
    import humanize

    return humanize.intcomma(x)


def plain(x: int) -> int:
    return 2 * x


def manifest(fn: object, name: str, packages: list[str]) -> tuple[bytes, dict]:
    artifact = cloudpickle.dumps({"fn": fn, "setup": None}, protocol=5)
    return artifact, {"name": name, "version": 1, "branch": "main", "options": {},
                      "python": ".".join(map(str, sys.version_info[:3])),
                      "sha256": hashlib.sha256(artifact).hexdigest(),
                      "requirements": {"declared": packages, "detected": {}}}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


async def per_call(runner: Runner, calls: int) -> float:
    body = parse(b'{"data": 1234567}')
    await runner.run(body, 30)
    start = time.perf_counter()
    for _ in range(calls):
        await runner.run(parse(b'{"data": 1234567}'), 30)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    cold, warm, reuse = [], [], []
    for n in range(args.passes):
        with tempfile.TemporaryDirectory() as root:
            env = {"UV_CACHE_DIR": os.path.join(root, "uv-cache")}
            os.environ.update(env)
            envs = Environments(Path(root) / "envs")
            _, m = manifest(intcomma, "pretty", [f"humanize=={('4.9.0', '4.10.0', '4.11.0')[n % 3]}"])
            cold.append(timed(lambda: envs.ensure(m)))
            _, m2 = manifest(intcomma, "pretty2", ["humanize", "six"])
            warm.append(timed(lambda: envs.ensure(m2)) if n == 0 else timed(lambda: envs.ensure(
                manifest(intcomma, f"p{n}", ["humanize", f"six>=1.{n}"])[1])))
            reuse.append(timed(lambda: envs.ensure(m)))
            del os.environ["UV_CACHE_DIR"]
            if n == 0:
                artifact, m3 = manifest(plain, "plain", ["humanize==4.9.0"])  # the same function, in an env
                python = str(envs.ensure(m3))

                async def compare() -> tuple[float, float]:
                    here = Runner(m3, fn=plain)
                    lane = ProcessLane(1, "plain v1", artifact, m3, python=python)
                    there = Runner(m3, lane, signature=lane.signature)
                    try:
                        return await per_call(here, args.calls), await per_call(there, args.calls)
                    finally:
                        here.close()
                        there.close()

                in_process, in_env = asyncio.run(compare())
    print("| case | median | passes |\n|---|---|---|")
    for label, values in (("cold build (empty uv cache)", cold), ("new environment, uv cache warm", warm),
                          ("reuse of a built environment", reuse)):
        print(f"| {label} | {statistics.median(values) * 1000:,.1f} ms | {len(values)} |")
    print(f"| one call in-process, on its thread (sequential) | {in_process:,.0f} us | |")
    print(f"| one call in the environment's worker process (sequential) | {in_env:,.0f} us | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
