"""Replicas over one S3 store (moto on loopback) behind HAProxy: how soon they all
serve a deploy, an alias move, a key revocation; a killed replica; req/s by replica count.

    python bench/replicas.py [--publishes 20] [--seconds 5]

Prints medians and worst cases; bench/s3.py runs this too. Everything runs on
127.0.0.1 and stops by PID. On a 2-core machine the replicas, HAProxy, moto and
the load generator share the same two cores, so req/s cannot grow with replicas:
what the figure shows is the cost of the extra hop, not scaling.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import httpx

import load
from servers import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"bench: not within {timeout:g} s: {what}")


class Moto:
    def __init__(self, stack: ExitStack, logs: Path) -> None:
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=open(logs / "moto.log", "w"), stderr=subprocess.STDOUT)
        stack.callback(stop, self.proc)
        wait_for(lambda: httpx.get(self.endpoint + "/moto-api/", timeout=1).status_code < 500, "moto up")
        self.env = {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}
        os.environ.update(self.env)  # the deploys in this process

    def bucket(self) -> str:
        import boto3

        name = f"bench-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return name


def serve(stack: ExitStack, store: str, directory: Path, env: dict[str, str]) -> tuple[int, subprocess.Popen]:
    """`framework serve` from an empty directory (no project source), stopped by PID."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("FRAMEWORK_")}
    full.update(env, FRAMEWORK_STORE=store, FRAMEWORK_CACHE_DIR=str(directory / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "framework", "serve", "--port", str(port)],
                            cwd=directory, env=full, stdout=open(directory / "serve.log", "w"),
                            stderr=subprocess.STDOUT)
    stack.callback(stop, proc)
    return port, proc


def ready(port: int) -> bool:
    return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200


class HAProxy:
    def __init__(self, stack: ExitStack, backends: list[int], directory: Path) -> None:
        self.port, self.stats = free_port(), free_port()
        servers = "\n".join(f"  server r{i} 127.0.0.1:{p} check" for i, p in enumerate(backends))
        config = directory / f"haproxy-{self.port}.cfg"
        config.write_text(f"""global
  maxconn 1024
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  retries 3
  option redispatch 1
frontend fe
  bind 127.0.0.1:{self.port}
  default_backend replicas
frontend stats
  bind 127.0.0.1:{self.stats}
  stats enable
  stats uri /stats
backend replicas
  balance roundrobin
  option httpchk GET /readyz
  timeout check 3s
  default-server inter 250ms fall 2 rise 2
{servers}
""")
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.proc = subprocess.Popen([haproxy, "-db", "-f", str(config)],
                                     stdout=open(directory / f"haproxy-{self.port}.log", "w"),
                                     stderr=subprocess.STDOUT)
        stack.callback(stop, self.proc)
        wait_for(lambda: self.up() == len(backends), "HAProxy sees every replica up")

    def status(self) -> dict[str, str]:
        text = httpx.get(f"http://127.0.0.1:{self.stats}/stats;csv", timeout=2).text
        return {r["svname"]: r["status"] for r in csv.DictReader(io.StringIO(text.lstrip("# ")))
                if r["pxname"] == "replicas" and r["svname"] not in ("BACKEND", "FRONTEND")}

    def up(self) -> int:
        return sum(s.startswith("UP") for s in self.status().values())


def versioned(n: int) -> Callable[[int], int]:
    def which_version(x: int) -> int:
        return n * 1000 + x
    return which_version


def answer(port: int, ref: str, key: str) -> tuple[int, Any]:
    r = httpx.post(f"http://127.0.0.1:{port}/v1/which_version/{ref}", json={"data": 1},
                   headers={"Authorization": key}, timeout=10)
    try:
        return r.status_code, r.json()
    except ValueError:  # not JSON: a balancer's error page
        return r.status_code, r.text


def time_to_all(ports: list[int], check: Callable[[int], bool], start: float,
                timeout: float = 30) -> list[float]:
    """Seconds from `start` until each replica passes `check`, polled every 10 ms."""
    seen: dict[int, float] = {}

    def poll(port: int) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check(port):
                    seen[port] = time.monotonic() - start
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.01)

    threads = [threading.Thread(target=poll, args=(p,)) for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(seen) != len(ports):
        raise SystemExit(f"bench: {len(ports) - len(seen)} replica(s) never caught up within {timeout} s")
    return [seen[p] for p in ports]


def summary(label: str, worst_per_event: list[float]) -> str:
    return (f"{label}: median {statistics.median(worst_per_event):.2f} s, worst "
            f"{max(worst_per_event):.2f} s, over {len(worst_per_event)} (slowest replica each time)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--publishes", type=int, default=20)
    p.add_argument("--seconds", type=float, default=5.0, help="each req/s measurement")
    p.add_argument("--connections", type=int, default=16)
    args = p.parse_args(argv)
    import framework
    from framework.serve import auth
    from framework.store import open_store

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        base = Path(tmp)
        os.environ["FRAMEWORK_CACHE_DIR"] = str(base / "deployer-cache")
        moto = Moto(stack, base)
        url = f"s3://{moto.bucket()}/models"
        store = open_store(url)
        framework.deploy(versioned(1), name="which_version", store=url)
        ports, procs = [], []
        for i in range(3):
            port, proc = serve(stack, url, base / f"machine{i}", moto.env)
            ports.append(port)
            procs.append(proc)
        for port in ports:
            wait_for(lambda: ready(port), f"replica {port} ready")
            wait_for(lambda: answer(port, "latest", "")[0] == 200, f"replica {port} answers")

        # Throughput first, while the store has no API keys (bench/load.py sends no headers).
        body = json.dumps({"data": 1}).encode()
        direct = load.run(f"http://127.0.0.1:{ports[0]}/v1/which_version/1", body,
                          connections=args.connections, seconds=args.seconds)
        print(f"req/s straight to one replica: {direct.rps:,.0f} (p50 {direct.p50_ms:.1f} ms, "
              f"errors {direct.errors})")
        for count in (1, 2, 3):
            proxy = HAProxy(stack, ports[:count], base)
            got = load.run(f"http://127.0.0.1:{proxy.port}/v1/which_version/1", body,
                           connections=args.connections, seconds=args.seconds)
            print(f"req/s through HAProxy, {count} replica(s): {got.rps:,.0f} "
                  f"(p50 {got.p50_ms:.1f} ms, p99 {got.p99_ms:.1f} ms, errors {got.errors})")
            stop(proxy.proc)

        _, key = auth.create_key(store, note="bench")
        time_to_all(ports, lambda pt: answer(pt, "1", key)[0] == 200, time.monotonic())
        publishes = []
        for n in range(2, args.publishes + 2):
            framework.deploy(versioned(n), name="which_version", store=url)
            returned = time.monotonic()
            want = (200, {"data": n * 1000 + 1})
            publishes.append(max(time_to_all(ports, lambda pt: answer(pt, "latest", key) == want, returned)))
        print(summary("a deploy reaches all 3 replicas", publishes))

        moves = []
        for n in range(1, 11):
            store.set_alias("main", "which_version", "prod", n)
            moved = time.monotonic()
            want = (200, {"data": n * 1000 + 1})
            moves.append(max(time_to_all(ports, lambda pt: answer(pt, "prod", key) == want, moved)))
        print(summary("an alias move reaches all 3 replicas", moves))

        revokes = []
        for _ in range(5):
            doomed_id, doomed = auth.create_key(store, note="doomed")
            time_to_all(ports, lambda pt: answer(pt, "1", doomed)[0] == 200, time.monotonic())
            auth.revoke_key(store, doomed_id)
            revoked = time.monotonic()
            revokes.append(max(time_to_all(ports, lambda pt: answer(pt, "1", doomed)[0] == 401, revoked)))
        print(summary("a key revocation reaches all 3 replicas", revokes))

        proxy = HAProxy(stack, ports, base)
        failed_before = failed_after = 0
        procs[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while not proxy.status().get("r0", "").startswith("DOWN"):
            failed_before += _status(proxy.port, key) != 200
            if time.monotonic() - killed > 30:
                raise SystemExit("bench: HAProxy never marked the killed replica down")
        noticed = time.monotonic() - killed
        sent_after = 500
        for _ in range(sent_after):
            failed_after += _status(proxy.port, key) != 200
        print(f"killed replica: HAProxy marked it down after {noticed:.2f} s; failed requests "
              f"before that {failed_before}, after it {failed_after} of {sent_after}")
        for failure in FAILURES[:5]:
            print(f"  failed: {failure}")
        print(f"(machine: {os.cpu_count()} cores shared by moto, HAProxy, the replicas and the load)")
    return 0


FAILURES: list[str] = []


def _status(port: int, key: str) -> int:
    """The status of one call through the balancer (0: no answer); failures are kept to show."""
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/which_version/1", json={"data": 1},
                       headers={"Authorization": key}, timeout=10)
    except httpx.TransportError as exc:
        FAILURES.append(repr(exc))
        return 0
    if r.status_code != 200:
        FAILURES.append(f"{r.status_code} {r.text[:200]!r}")
    return r.status_code


if __name__ == "__main__":
    sys.exit(main())
