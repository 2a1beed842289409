"""Shared fixtures of both tiers: real stores on disk, the real CLI, real servers in subprocesses.

tests/unit holds in-process tests (no subprocess, no socket: enforced below); tests/integration
starts real servers and processes. Everything they start logs under pytest's temporary
directories and is stopped by its PID; what a test leaves running is stopped at session end.
"""

from __future__ import annotations

import multiprocessing.process
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

# The store's contract tests live outside a test module: rewrite their asserts too.
pytest.register_assert_rewrite("store_contract")

REPO = Path(__file__).resolve().parent.parent
KUBE = REPO / "kubernetes"
MANIFESTS = sorted(KUBE.glob("*.yaml")) + sorted((KUBE / "examples").glob("*.yaml"))
UNIT = Path(__file__).resolve().parent / "unit"

# Where servers and CLI subprocesses write logs and temporary files: set once per session
# to a directory under pytest's basetemp, so nothing is left loose in /tmp.
_session_dirs: dict[str, Path] = {}


def session_dir(name: str) -> Path:
    """A directory of this test session under pytest's basetemp (a fresh temporary one outside pytest)."""
    if name not in _session_dirs:
        base = _session_dirs.get("") or Path(tempfile.mkdtemp(prefix="framework-tests-"))
        _session_dirs[""] = base
        _session_dirs[name] = base / name
        _session_dirs[name].mkdir(parents=True, exist_ok=True)
    return _session_dirs[name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(store: Path | str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAMEWORK_")}
    env["FRAMEWORK_STORE"] = str(store)
    # Temporary files of what a test starts (Dask's scratch space, worker sockets) go
    # under pytest's basetemp too; a test may still pass its own TMPDIR.
    env["TMPDIR"] = str(session_dir("tmp"))
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

    def __init__(self, store: Path | str, *args: str, cwd: Path = REPO, log_dir: Path | None = None,
                 **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (log_dir or session_dir("logs")) / f"framework-serve-{self.port}.log"
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


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(pid: int) -> list[int]:
    """PIDs of every live process below `pid`, read from /proc (empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # a zombie has exited already
            children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    owned = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
    for pids in children.values():  # the interpreter's own helpers end with it
        pids[:] = [p for p in pids if not any(o in _cmdline(p) for o in owned)]
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


@pytest.fixture(scope="session", autouse=True)
def _session_hygiene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Logs and temporary files under basetemp; at the end, stop what a test left running."""
    _session_dirs[""] = tmp_path_factory.getbasetemp() / "session"
    yield
    left = _descendants(os.getpid())
    described = "; ".join(f"{pid} {_cmdline(pid)[:100]}" for pid in left)
    for pid in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while (alive := [p for p in left if p in _descendants(os.getpid())]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if left:
        _left_running.append(f"stopped {len(left)} process(es) a test left running: {described}")


_left_running: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _left_running:  # named, so the test that leaked them gets fixed
        terminalreporter.write_line(f"conftest: {line}", yellow=True)


def _refuse(what: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a unit test {what}: it belongs in tests/integration")
    return refuse


@pytest.fixture(autouse=True)
def _unit_tier_stays_in_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/unit runs in this process: starting a process or using the network fails the test."""
    if not Path(str(request.node.path)).is_relative_to(UNIT):
        return
    popen_init = subprocess.Popen.__init__

    def only_git(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
        # A deploy reads its git metadata through `git`: the one process a unit test may start.
        if (args.split()[0] if isinstance(args, str) else os.path.basename(str(args[0]))) != "git":
            _refuse("started a process")()
        popen_init(self, args, *rest, **kwargs)
    monkeypatch.setattr(subprocess.Popen, "__init__", only_git)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", _refuse("started a process"))
    for name in ("connect", "connect_ex", "bind"):
        original = getattr(socket.socket, name)

        def guarded(self: socket.socket, address: Any, *rest: Any, _original: Any = original) -> Any:
            if self.family in (socket.AF_INET, socket.AF_INET6):
                raise AssertionError("a unit test used the network: it belongs in tests/integration")
            return _original(self, address, *rest)
        monkeypatch.setattr(socket.socket, name, guarded)


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


def kube_docs() -> dict[str, dict[str, Any]]:
    """The Kubernetes manifests' documents, by "Kind/name"."""
    import yaml

    found = {}
    for f in MANIFESTS:
        for doc in yaml.safe_load_all(f.read_text()):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found
