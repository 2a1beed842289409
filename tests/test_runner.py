"""Where sync calls run: inline when measured cheap, on the version's threads otherwise.

Whatever the placement, a deployment that blocks must not stop the server
answering other deployments, and time limits must answer 504.
"""

from __future__ import annotations

import asyncio
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import httpx
import pytest

from conftest import Server, run_cli
from framework.packaging import Loaded
from framework.protocol import parse
from framework.runner import Runner

MODULE = '''
import time
from framework import deployment


@deployment
def fast(x):
    return x + 1


@deployment
def sleepy(seconds):
    time.sleep(seconds)
    return seconds
'''


def _runner(fn: Callable[..., Any], budget: float = 0.001, **options: Any) -> Runner:
    manifest = {"name": fn.__name__, "version": 1, "branch": "main", "options": options}
    return Runner(Loaded(fn, manifest), threads=2, inline_budget=budget)


def _threads(runner: Runner, calls: int, body: bytes = b'{"data": 1}') -> list[str]:
    async def go() -> list[str]:
        return [(await runner.run(parse(body), 5))[1].decode() for _ in range(calls)]

    try:
        return asyncio.run(go())
    finally:
        runner.close()


def where(x: Any) -> str:
    return threading.current_thread().name


def test_a_cheap_function_runs_inline_once_measured() -> None:
    answers = _threads(_runner(where), 8)
    assert all("MainThread" not in a for a in answers[:3]), "warm-up calls run on the pool"
    assert all("MainThread" in a for a in answers[3:])


def test_a_waiting_function_stays_on_its_threads() -> None:
    def napper(x: Any) -> str:
        time.sleep(0.03)
        return threading.current_thread().name

    assert all("MainThread" not in a for a in _threads(_runner(napper), 6))


def test_a_zero_budget_never_runs_inline() -> None:
    assert all("MainThread" not in a for a in _threads(_runner(where, budget=0), 6))


def test_an_inline_call_that_blocks_sends_its_version_back_to_its_threads() -> None:
    naps = iter([0, 0, 0, 0.05])

    def sometimes(x: Any) -> str:
        time.sleep(next(naps, 0))
        return threading.current_thread().name

    answers = _threads(_runner(sometimes), 6)
    assert "MainThread" in answers[3] and "MainThread" not in answers[4]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    project = tmp_path_factory.mktemp("runner")
    (project / "mod.py").write_text(textwrap.dedent(MODULE))
    # Inline running is opt-in: these tests check that it stays safe when on.
    (project / "deploy.yaml").write_text("modules: [mod]\nserver: {inline_budget_ms: 1}\n")
    run_cli("deploy", store=project / "store", cwd=project)
    srv = Server(project / "store", cwd=project)
    yield srv
    srv.stop()


def _fast_while(server: Server, slow: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    """Run `slow` in the background; the slowest of 20 `fast` calls made meanwhile."""
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(slow)
        time.sleep(0.2)
        worst = 0.0
        for i in range(20):
            start = time.perf_counter()
            assert server.post("/v1/fast/latest", {"data": i}).json() == {"data": i + 1}
            worst = max(worst, time.perf_counter() - start)
        return pending.result(), worst


def test_a_blocking_deployment_does_not_stop_the_others(server: Server) -> None:
    for i in range(10):  # `fast` now runs inline
        server.post("/v1/fast/latest", {"data": i})
    answer, worst = _fast_while(server, lambda: server.post("/v1/sleepy/latest", {"data": 2}))
    assert answer.json() == {"data": 2}
    assert worst < 1.5


def test_a_call_past_its_time_limit_answers_504(server: Server) -> None:
    for _ in range(5):  # cheap calls first: a version measured cheap still times out
        server.post("/v1/sleepy/latest", {"data": 0})
    slow = {"data": 3, "timeout_seconds": 0.5}
    server.post("/v1/sleepy/latest", slow)  # may run inline once: it teaches the runner
    start = time.perf_counter()
    answer, worst = _fast_while(server, lambda: server.post("/v1/sleepy/latest", slow))
    assert answer.status_code == 504
    assert "did not answer within 0.5 s" in answer.json()["error"]
    assert time.perf_counter() - start < 2.5 and worst < 1.5


def test_a_deployment_declared_inline_runs_inline_on_a_server_that_does_not() -> None:
    declared = _threads(_runner(where, budget=0, inline=True), 8)
    assert "MainThread" not in declared[0] and "MainThread" in declared[-1]
    plain = _threads(_runner(where, budget=0), 8)
    assert all("MainThread" not in a for a in plain)


def test_inline_is_a_declared_boolean() -> None:
    from framework import deployment
    from framework.errors import RegistryError

    with pytest.raises(RegistryError, match="inline must be True or False"):
        deployment(inline="yes")
    assert deployment(inline=True)(where).options.describe()["inline"] is True
