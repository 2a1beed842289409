"""Starting, probing and stopping the servers under test, by PID, on loopback."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

BENCH = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: bytes, timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


class Server:
    """One server process; `started_s` is the time from spawn to its first 200 answer."""

    def __init__(self, label: str, argv: list[str], *, env: dict[str, str], cwd: Path,
                 probe: str, body: bytes, port: int) -> None:
        self.label, self.port = label, port
        self.log = open(Path(env.get("TMPDIR", "/tmp")) / f"bench-{label}-{port}.log", "w+")
        start = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = start + 30
        while True:  # bounded by the deadline
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"{label} did not answer within 30 s:\n{self.output()}")
            try:
                status, answer = post(port, probe, body, timeout=5)
            except OSError:
                time.sleep(0.005)
                continue
            if status != 200:
                self.stop()
                raise RuntimeError(f"{label} answered {status}: {answer[:300]!r}\n{self.output()}")
            break
        self.started_s = time.perf_counter() - start

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def rss_mb(self) -> float:
        """Resident memory of the server and its worker processes."""
        total = 0
        for pid in [self.proc.pid, *_children(self.proc.pid)]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total += int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmRSS")))
        return total / 1024

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def stop_all(running: Iterable[Server]) -> None:
    """Stop every server, even when stopping one of them fails; then raise the first failure."""
    failed: BaseException | None = None
    for server in running:
        try:
            server.stop()
        except BaseException as exc:  # noqa: BLE001 - raised below, once the others are stopped
            failed = failed or exc
    if failed is not None:
        raise failed


def _children(pid: int) -> list[int]:
    """The child processes of every thread of `pid`: the server starts worker processes
    from its threads, and /proc lists a child under the thread that started it."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def bare(port: int, probe: str, body: bytes, workers: int = 1, safe: bool = False) -> Server:
    """bench/bare_app.py: *bare-inline*, or with `safe` *bare-safe* (the work in Starlette's
    thread pool)."""
    env = {**os.environ, "PYTHONPATH": str(BENCH)}
    argv = [sys.executable, str(BENCH / "bare_app.py"), str(port), str(workers)] + ["--safe"] * safe
    return Server("bare-safe" if safe else "bare-inline", argv, env=env, cwd=BENCH, probe=probe,
                  body=body, port=port)


def ours(port: int, store: Path, probe: str, body: bytes, workers: int = 1,
         config: Path | None = None) -> Server:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAMEWORK_")}
    env["FRAMEWORK_STORE"] = str(store)
    # One BLAS thread for the numpy model, as one would serve a small model: its 64-wide
    # products gain nothing from more, and on two cores shared with the load generator
    # OpenBLAS's spinning threads took most of a vectorized call's time.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    if config is not None:
        env["FRAMEWORK_CONFIG"] = str(config)
    argv = [sys.executable, "-m", "framework", "serve", "--port", str(port),
            "--workers", str(workers), "--log-level", "warning"]
    # An empty working directory: no deploy.yaml, so only the store setting (and `config`) applies.
    return Server("ours", argv, env=env, cwd=store.parent, probe=probe, body=body, port=port)
