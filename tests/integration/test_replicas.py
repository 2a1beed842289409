"""Three `framework serve` replicas over one S3 store (moto), behind a real HAProxy.

The replicas run from empty directories (no project source): all they know is
the store. Nothing here is timed: every wait is "until it holds, or fail after a
generous bound"; the figures (how soon every replica serves a deploy) are
bench/replicas.py's.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

import framework
from conftest import Server, free_port, stop_process
from framework.serve import auth
from framework.store import open_store
from moto_server import MotoServer

pytest.importorskip("boto3")
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
BOUND_S = 30.0  # generous: the bench measures the real figure


def versioned(n: int) -> Callable[[int], int]:
    def which_version(x: int) -> int:
        return n * 1000 + x
    return which_version


def until(check: Callable[[], Any], what: str, timeout: float = BOUND_S) -> Any:
    deadline, got = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:g} s: {what} (last: {got!r})")


class HAProxy:
    """haproxy in the foreground on loopback, health-checking the replicas' /readyz."""

    def __init__(self, backends: list[int], directory: Path) -> None:
        if HAPROXY is None:
            raise AssertionError("haproxy is not installed: apt-get install haproxy (.ci/run does)")
        self.port, self.stats_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        servers = "\n".join(f"  server r{i} 127.0.0.1:{p} check" for i, p in enumerate(backends))
        self.config = directory / "haproxy.cfg"
        self.config.write_text(f"""
global
  maxconn 512
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
  bind 127.0.0.1:{self.stats_port}
  stats enable
  stats uri /stats
backend replicas
  balance roundrobin
  option httpchk GET /readyz
  # /readyz reads the store: on a loaded machine it can take longer than the check interval.
  timeout check 3s
  default-server inter 250ms fall 2 rise 2
{servers}
""")
        self.log = open(directory / "haproxy.log", "w")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        until(lambda: self.up() == len(backends), "HAProxy sees every replica up")

    def status(self) -> dict[str, str]:
        try:
            text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2).text
        except httpx.TransportError:
            return {}
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "replicas"
                and r["svname"] not in ("BACKEND", "FRONTEND")}

    def up(self) -> int:
        return sum(s.startswith("UP") for s in self.status().values())

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("replicas")
    moto = MotoServer(base)
    saved = dict(os.environ)
    os.environ.update(moto.env())  # deploys from this process reach the same store
    os.environ["FRAMEWORK_CACHE_DIR"] = str(base / "deployer-cache")
    url = f"s3://{moto.new_bucket()}/models"
    store = open_store(url)
    _, key = auth.create_key(store, note="replica tests")
    framework.deploy(versioned(1), name="which_version", store=url)
    replicas: list[Server] = []
    proxy = None
    try:
        for i in range(3):
            empty = base / f"machine{i}"
            empty.mkdir()
            replicas.append(Server(url, cwd=empty, log_dir=base, **moto.env(),
                                   FRAMEWORK_CACHE_DIR=str(empty / "cache")))
        proxy = HAProxy([r.port for r in replicas], base)
        yield {"url": url, "store": store, "replicas": replicas, "proxy": proxy, "key": key}
    finally:
        if proxy is not None:
            proxy.stop()
        for r in replicas:
            r.stop()
        moto.stop()
        os.environ.clear()
        os.environ.update(saved)


def call(url: str, ref: str, key: str, x: int = 7) -> tuple[int, Any]:
    try:
        r = httpx.post(f"{url}/v1/which_version/{ref}", json={"data": x}, timeout=30,
                       headers={"Authorization": key})
    except httpx.TransportError as exc:
        return 0, repr(exc)
    try:
        return r.status_code, r.json()
    except ValueError:  # not JSON: HAProxy's own error page, shown in the failure
        return r.status_code, r.text


def test_every_replica_serves_each_new_version(cluster: dict[str, Any]) -> None:
    replicas, key = cluster["replicas"], cluster["key"]
    for n in range(2, 7):
        version = framework.deploy(versioned(n), name="which_version", store=cluster["url"])
        assert version == n
        for r in replicas:
            until(lambda: call(r.url, "latest", key) == (200, {"data": n * 1000 + 7}),
                  f"replica {r.port} serves v{n}")
        # Pinned versions stay exactly what they were.
        assert call(cluster["proxy"].url, "1", key) == (200, {"data": 1007})


def test_alias_moves_and_key_revocations_reach_every_replica(cluster: dict[str, Any]) -> None:
    store, replicas, key = cluster["store"], cluster["replicas"], cluster["key"]
    store.set_alias("main", "which_version", "prod", 1)
    for r in replicas:
        until(lambda: call(r.url, "prod", key) == (200, {"data": 1007}), f"{r.port}: prod -> 1")
    store.set_alias("main", "which_version", "prod", 2)
    for r in replicas:
        until(lambda: call(r.url, "prod", key) == (200, {"data": 2007}), f"{r.port}: prod -> 2")
    doomed_id, doomed = auth.create_key(store, note="to be revoked")
    for r in replicas:
        until(lambda: call(r.url, "1", doomed)[0] == 200, f"{r.port} accepts the new key")
    auth.revoke_key(store, doomed_id)
    for r in replicas:
        until(lambda: call(r.url, "1", doomed)[0] == 401, f"{r.port} refuses the revoked key")
        assert call(r.url, "1", key)[0] == 200


def test_a_killed_replica_is_routed_around(cluster: dict[str, Any]) -> None:
    proxy, replicas, key = cluster["proxy"], cluster["replicas"], cluster["key"]
    victim = replicas[0]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    until(lambda: proxy.status().get("r0", "").startswith("DOWN"), "HAProxy marks r0 down")
    answers = [call(proxy.url, "1", key, x) for x in range(300)]
    assert answers == [(200, {"data": 1000 + x}) for x in range(300)]
    assert proxy.up() == 2
