"""The S3 store against the local one: cold start with 200 versions, steady req/s;
then bench/replicas.py (publish to all replicas, req/s through HAProxy by replica count).

    python bench/s3.py [--versions 200] [--seconds 5] [--no-replicas]

S3 is moto's server on loopback, so the network cost of a real bucket is not in
these figures; the number of requests is. Steady req/s should be the same for
both stores: calls are served from memory, and the store is only polled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import load
import replicas


def fill(store_url: str, versions: int) -> None:
    """`versions` versions of one deployment: one real deploy, then its artifact republished."""
    import framework
    from framework.store import open_store

    framework.deploy(replicas.versioned(1), name="which_version", store=store_url)
    store = open_store(store_url)
    artifact = store.read_artifact("main", "which_version", 1)
    manifest = store.read_manifest("main", "which_version", 1)
    for _ in range(versions - 1):
        store.publish("main", "which_version", artifact, manifest)


def cold_start(stack: ExitStack, store_url: str, directory: Path, env: dict[str, str]) -> float:
    """Seconds from spawning `framework serve` to its first answer from the latest version."""
    started = time.monotonic()
    port, proc = replicas.serve(stack, store_url, directory, env)
    replicas.wait_for(lambda: replicas.answer(port, "latest", "")[0] == 200, "first answer")
    took = time.monotonic() - started
    replicas.stop(proc)
    return took


def steady(stack: ExitStack, store_url: str, directory: Path, env: dict[str, str],
           seconds: float, connections: int) -> load.Load:
    port, proc = replicas.serve(stack, store_url, directory, env)
    replicas.wait_for(lambda: replicas.answer(port, "latest", "")[0] == 200, "first answer")
    got = load.run(f"http://127.0.0.1:{port}/v1/which_version/latest", json.dumps({"data": 1}).encode(),
                   connections=connections, seconds=seconds)
    replicas.stop(proc)
    return got


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--versions", type=int, default=200)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--starts", type=int, default=3, help="cold starts per store (median)")
    p.add_argument("--no-replicas", action="store_true")
    args = p.parse_args(argv)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        base = Path(tmp)
        os.environ["FRAMEWORK_CACHE_DIR"] = str(base / "deployer-cache")
        moto = replicas.Moto(stack, base)
        stores = {"local": (str(base / "local-store"), {}),
                  "s3": (f"s3://{moto.bucket()}/models", moto.env)}
        starts: dict[str, float] = {}
        for label, (url, env) in stores.items():
            began = time.monotonic()
            fill(url, args.versions)
            print(f"{label}: published {args.versions} versions in {time.monotonic() - began:.1f} s")
            # Each start from an empty directory and an empty artifact cache: a new machine.
            starts[label] = statistics.median(
                cold_start(stack, url, base / f"{label}-start{i}", env) for i in range(args.starts))
            print(f"{label}: cold start to first answer with {args.versions} versions: "
                  f"median {starts[label]:.2f} s of {args.starts}")
        print(f"cold start s3 / local: {starts['s3'] / starts['local']:.2f}x")
        rates = {}
        for label, (url, env) in stores.items():
            got = steady(stack, url, base / f"{label}-steady", env, args.seconds, args.connections)
            rates[label] = got.rps
            print(f"{label}: steady {got.rps:,.0f} req/s (p50 {got.p50_ms:.1f} ms, "
                  f"p99 {got.p99_ms:.1f} ms, errors {got.errors})")
        print(f"steady req/s s3 / local: {rates['s3'] / rates['local']:.2f}x")
    if not args.no_replicas:
        return replicas.main(["--seconds", str(args.seconds), "--connections", str(args.connections)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
