"""Bounded memory: the cache of loaded versions gives back what it evicts."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

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


HEAP_CYCLES = '''
import ctypes, resource
from framework.execute.versions import _malloc_trim

assert _malloc_trim() is not None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

def request():  # what a large request does to the heap: a block under the mmap threshold, used, freed
    block = libc.malloc(900_000)
    libc.memset(block, 1, 900_000)
    libc.free(block)

request()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    request()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds set are glibc's")
def test_the_heap_freed_by_one_request_is_not_faulted_in_again_by_the_next() -> None:
    # With the mmap threshold fixed and the trim threshold left at glibc's 128 KiB, each
    # freed block was handed back and faulted in again, all 220 of its pages.
    out = subprocess.run([sys.executable, "-c", HEAP_CYCLES], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert int(out) < 1_000, f"{out.strip()} page faults for 100 blocks of 900 KB"
