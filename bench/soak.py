"""Soak test: mixed valid and invalid traffic while a version is deployed and an alias moves.

    python bench/soak.py                          # one minute, 64 connections
    python bench/soak.py --duration 5 --connections 16

Loopback only, bounded in time. Everything is on: a signing key, an API key,
metrics and the access log. A deployment `scale` answers x * k in its
version k. Version 2 is deployed a third of the way in, and alias `stable`
moves from 1 to 2 at two thirds; every answer is checked against what the
store held when the request was sent (with a 1.5 s grace for the server to
notice). Prints a JSON summary; exits 1 on any wrong answer, 5xx or
connection error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import httpx

import framework
from framework.serve import auth
from framework.store import open_store

GRACE_S = 1.5  # the server re-reads latest and aliases every 0.5 s
Check = Callable[[int, Any, float, float], bool]  # (status, body, sent, answered) -> right?


def make_scale(k: int) -> Callable[[float], float]:
    def scale(x: float) -> float:
        return x * k

    return scale


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Soak:
    def __init__(self, url: str, key: str, duration: float) -> None:
        self.url, self.key, self.duration = url, key, duration
        self.events: dict[str, tuple[float, float]] = {}  # name -> (started, done)
        self.statuses: Counter[int] = Counter()
        self.wrong: list[str] = []
        self.transport_errors = 0
        self.latencies: list[float] = []

    def factors(self, event: str, before: int, after: int, sent: float, answered: float) -> set[int]:
        """What a ref may answer, given when the request was in flight and when `event` happened."""
        if event not in self.events or answered < self.events[event][0]:
            return {before}
        return {after} if sent > self.events[event][1] + GRACE_S else {before, after}

    def case(self) -> tuple[str, bytes, dict[str, str], Check]:
        auth_ok = {"Authorization": random.choice([self.key, f"Bearer {self.key}"])}
        xs = [random.randint(-1000, 1000) for _ in range(random.randint(1, 20))]
        rows = json.dumps({"data": [[i, x] for i, x in enumerate(xs)]}).encode()

        def scaled(allowed: Callable[[float, float], set[int]]) -> Check:
            def ok(status: int, doc: Any, sent: float, answered: float) -> bool:
                return status == 200 and any(doc == {"data": [[i, x * k] for i, x in enumerate(xs)]}
                                             for k in allowed(sent, answered))
            return ok

        def expect(code: int) -> Check:
            return lambda status, doc, *_: status == code and isinstance(doc.get("error"), str)

        v2_ready = "deploy" in self.events and self.events["deploy"][1] < float("inf")
        choices = [
            ("/v1/scale/1", rows, auth_ok, scaled(lambda *_: {1})),
            ("/v1/scale/latest", rows, auth_ok,
             scaled(lambda s, a: self.factors("deploy", 1, 2, s, a))),
            ("/v1/scale/main/stable", rows, auth_ok,
             scaled(lambda s, a: self.factors("alias", 1, 2, s, a))),
            ("/v1/scale/latest", b'{"data": [[1, 2], [1, 3]]}', auth_ok, expect(400)),
            ("/v1/scale/latest", b'{"data": [[1, 2]', auth_ok, expect(400)),
            ("/v1/scale/latest", b'{"data": [[1, null]]}', auth_ok, expect(422)),
            ("/v1/nope/latest", rows, auth_ok, expect(404)),
            ("/v1/scale/latest", rows, {}, expect(401)),
            ("/v1/scale/latest", rows, {"Authorization": "fw_00000000_wrong"}, expect(401)),
        ]
        if v2_ready:
            choices.append(("/v1/scale/2", rows, auth_ok, scaled(lambda *_: {2})))
        return random.choice(choices)

    async def worker(self, client: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            path, body, headers, ok = self.case()
            sent = time.monotonic()
            try:
                resp = await client.post(path, content=body, headers=headers)
            except httpx.TransportError as exc:
                self.transport_errors += 1
                self.wrong.append(f"{path}: {type(exc).__name__}")
                continue
            answered = time.monotonic()
            self.latencies.append(answered - sent)
            self.statuses[resp.status_code] += 1
            try:
                doc = resp.json()
            except ValueError:
                doc = None
            if not isinstance(doc, dict) or not ok(resp.status_code, doc, sent, answered):
                self.wrong.append(f"{path} {body[:60]!r} -> {resp.status_code} {resp.text[:200]}")

    async def timed(self, name: str, at: float, action: Callable[[], Any]) -> None:
        await asyncio.sleep(at)
        started = time.monotonic()
        self.events[name] = (started, float("inf"))
        await asyncio.to_thread(action)
        self.events[name] = (started, time.monotonic())

    async def run(self, connections: int, deploy: Callable[[], Any], move: Callable[[], Any]) -> None:
        until = time.monotonic() + self.duration
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=30) as client:
            await asyncio.gather(
                *(self.worker(client, until) for _ in range(connections)),
                self.timed("deploy", self.duration / 3, deploy),
                self.timed("alias", 2 * self.duration / 3, move),
            )


def wait_ready(url: str, server: subprocess.Popen, log: Path, seconds: float = 30) -> None:
    """Until `/readyz` answers 200, pausing between tries; a server that exits or is not
    ready in time ends the run with its log, not a soak against nothing."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the server was not ready within {seconds:.0f} s:\n{log.read_text()}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (default 60)")
    p.add_argument("--connections", type=int, default=64)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="framework-soak-") as tmp:
        work = Path(tmp)
        store_path = str(work / "store")
        config = work / "deploy.yaml"
        config.write_text("server: {access_log: true, metrics: true}\n")
        os.environ["FRAMEWORK_SIGNING_KEY"] = secrets.token_hex(32)
        store = open_store(store_path)
        framework.deploy(make_scale(1), name="scale", store=store_path, config=str(config))
        store.set_alias("main", "scale", "stable", 1)
        _, key = auth.create_key(store, note="soak")
        port = free_port()
        env = {**os.environ, "FRAMEWORK_STORE": store_path}
        log = open(work / "server.log", "w")
        server = subprocess.Popen(
            [sys.executable, "-m", "framework", "--config", str(config), "serve", "--port", str(port),
             "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, server, work / "server.log")
            rss_start = rss_kib(server.pid)
            soak = Soak(url, key, args.duration)
            started = time.monotonic()
            asyncio.run(soak.run(
                args.connections,
                lambda: framework.deploy(make_scale(2), name="scale", store=store_path, config=str(config)),
                lambda: store.set_alias("main", "scale", "stable", 2),
            ))
            elapsed = time.monotonic() - started
            rss_end = rss_kib(server.pid)
            alive = httpx.get(url + "/livez").status_code == 200
        finally:
            server.terminate()
            server.wait(30)
            log.close()
        logged = (work / "server.log").read_text()
    total = sum(soak.statuses.values())
    lat = sorted(soak.latencies) or [0.0]
    summary = {
        "duration_s": round(elapsed, 1),
        "connections": args.connections,
        "requests": total,
        "requests_per_s": round(total / elapsed, 1),
        "statuses": dict(sorted(soak.statuses.items())),
        "wrong_answers": len(soak.wrong),
        "server_errors_5xx": sum(n for s, n in soak.statuses.items() if s >= 500),
        "connection_errors": soak.transport_errors,
        "latency_ms": {"p50": round(statistics.median(lat) * 1000, 2),
                       "p99": round(lat[int(len(lat) * 0.99)] * 1000, 2)},
        "rss_kib": {"start": rss_start, "end": rss_end, "growth": rss_end - rss_start},
        "api_key_in_log": key in logged,
        "server_alive": alive,
        "first_wrong": soak.wrong[:5],
    }
    print(json.dumps(summary, indent=2))
    failed = (summary["wrong_answers"] or summary["server_errors_5xx"] or summary["api_key_in_log"]
              or not alive)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
