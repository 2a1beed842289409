"""Bounded memory: the cache of loaded versions gives back what it evicts."""

from __future__ import annotations

import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from conftest import Server, run_cli

VERSIONS = 40
CACHED = 8
MODEL_MB = 20

MODULE = f'''
import numpy as np

from framework import deployment


@deployment
def tiny(x):
    return float(np.float64(x))


def _model(weights):
    def big(x):
        return float(weights[0]) + x
    return big


for i in range({VERSIONS}):  # each holds a {MODEL_MB} MB array of its own
    deployment(_model(np.full({MODEL_MB} * 1024 * 1024 // 8, float(i))), name=f"big{{i}}")
'''


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_rss_stays_bounded_while_versions_are_loaded_and_evicted_round_robin(tmp_path: Path) -> None:
    (tmp_path / "mod.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "deploy.yaml").write_text(f"modules: [mod]\nserver: {{cache_size: {CACHED}, preload: false}}\n")
    run_cli("deploy", store=tmp_path / "store", cwd=tmp_path, timeout=600)
    server = Server(tmp_path / "store", cwd=tmp_path)
    try:
        with httpx.Client(timeout=120) as client:
            post = lambda name, x: client.post(f"{server.url}/v1/{name}/latest", json={"data": x})  # noqa: E731
            assert post("tiny", 1).json() == {"data": 1.0}  # numpy imported: the server's base
            base = _rss_mb(server.proc.pid)
            bound = base + CACHED * MODEL_MB * 1.5
            worst = base
            for round_ in range(2):
                for i in range(VERSIONS):
                    assert post(f"big{i}", round_).json() == {"data": float(i + round_)}
                    worst = max(worst, _rss_mb(server.proc.pid))
            assert worst < bound, f"RSS reached {worst:.0f} MB; bound {bound:.0f} MB (base {base:.0f})"
            # Concurrent callers while versions are evicted under them: none fails.
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda i: post(f"big{i % VERSIONS}", 1), range(2 * VERSIONS)))
            assert [a.json() for a in answers] == [{"data": float(i % VERSIONS + 1)}
                                                   for i in range(2 * VERSIONS)]
            loaded = httpx.get(f"{server.url}/healthz").json()["loaded"]
            assert loaded <= CACHED
            deadline = time.monotonic() + 30  # after idle, the evicted versions' memory is back
            while _rss_mb(server.proc.pid) >= bound and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _rss_mb(server.proc.pid) < bound
    finally:
        server.stop()
