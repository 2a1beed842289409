"""Shared fixtures: real stores on disk, the real CLI, real servers in subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(store: Path | str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAMEWORK_")}
    env["FRAMEWORK_STORE"] = str(store)
    env.update(extra)
    return env


def run_cli(*args: str, store: Path | str, cwd: Path = REPO, check: bool = True,
            timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m framework ARGS` in a subprocess against `store`."""
    proc = subprocess.run(
        [sys.executable, "-m", "framework", *args], cwd=cwd, env=cli_env(store, **env),
        capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"framework {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a process started by a test, by its PID: terminate, then kill if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Server:
    """`framework serve` in a subprocess on a free loopback port, stopped by its PID."""

    def __init__(self, store: Path | str, *args: str, cwd: Path = REPO, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"framework-serve-{self.port}.log"
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "framework", "serve", "--port", str(self.port), *args],
            cwd=cwd, env=cli_env(store, **env), stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError(f"server did not answer /healthz within 30 s:\n{self.output()}")

    def output(self) -> str:
        if not self._log.closed:  # closed once the server has stopped
            self._log.flush()
        return self.log.read_text()

    def output_once(self, ready: Callable[[str], bool], timeout: float = 10) -> str:
        """The output once `ready(output)` holds: access-log lines are written in
        batches, within 50 ms of their request (bounded: fails after `timeout` s)."""
        deadline = time.monotonic() + timeout
        while not ready(text := self.output()):
            if time.monotonic() > deadline:
                raise AssertionError(f"the server log never became ready:\n{text[-3000:]}")
            time.sleep(0.02)
        return text

    def post(self, path: str, body: bytes | str | dict, **kw) -> httpx.Response:
        if isinstance(body, dict):
            return httpx.post(self.url + path, json=body, timeout=60, **kw)
        return httpx.post(self.url + path, content=body, timeout=60, **kw)

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture(scope="session")
def examples_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding this repo's deployments/, deployed once per test session."""
    path = tmp_path_factory.mktemp("examples") / "store"
    run_cli("deploy", store=path)
    return path


@pytest.fixture(scope="session")
def examples_server(examples_store: Path) -> Iterator[Server]:
    server = Server(examples_store)
    yield server
    server.stop()
