"""Where sync calls run: inline when measured cheap, on the version's threads otherwise.

Whatever the placement, a deployment that blocks or turns slow must not stop
the server answering other deployments, and time limits must answer 504.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import textwrap
import threading
import traceback
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from conftest import Server, run_cli
from framework import preempt
from framework import inline
from framework.errors import CallTimeout
from framework.inline import InlinePolicy
from framework.packaging import Loaded
from framework.protocol import parse
from framework.runner import Runner

MODULE = '''
import os
import time
from framework import deployment


@deployment
def fast(x):
    return x + 1


@deployment
def sleepy(seconds):
    time.sleep(seconds)
    return seconds


@deployment
def spin(path):
    while path and not os.path.exists(path):  # busy, in Python bytecode, until `path` exists
        pass
    return path
'''


def _runner(fn: Callable[..., Any], budget: float = 0.001, **options: Any) -> Runner:
    manifest = {"name": fn.__name__, "version": 1, "branch": "main", "options": options}
    # pytest runs tests on the main thread, where the watchdog can stop a call.
    return Runner(Loaded(fn, manifest), threads=2, inline_budget=budget, watchdog=preempt.install())


def _threads(runner: Runner, calls: int, body: bytes = b'{"data": 1}', *then: bytes) -> list[str]:
    """The answers to `calls` calls of `body`, then one of each of `then`."""
    async def go() -> list[str]:
        return [(await runner.run(parse(b), 5))[1].decode() for b in [body] * calls + list(then)]

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


def test_small_micro_batches_of_a_cheap_vectorized_function_run_inline_once_measured() -> None:
    def columns_where(x: list[Any]) -> list[str]:
        return [threading.current_thread().name] * len(x)

    runner = _runner(columns_where, vectorized=True, max_batch_rows=64, max_wait_ms=0)
    answers = _threads(runner, 8, b'{"data": [[1, 1], [2, 2]]}')
    assert all("MainThread" not in a for a in answers[:3]), "warm-up calls run on the pool"
    assert all(json.loads(a)["data"] == [[1, "MainThread"], [2, "MainThread"]] for a in answers[3:])


def test_a_waiting_function_stays_on_its_threads() -> None:
    def napper(x: Any) -> str:
        time.sleep(0.03)
        return threading.current_thread().name

    assert all("MainThread" not in a for a in _threads(_runner(napper), 6))


def test_costs_are_learned_per_call_size() -> None:
    """A row of a single call carries the call's own cost; one of a large batch hardly
    does. One estimate for every size had kept large batches of a cheap function off
    the loop once single calls had been measured."""
    policy = InlinePolicy("p", inline_budget=0, wait_budget=0.001)
    policy.pool_wait = 0.0  # its calls on the threads never waited
    for _ in range(3):
        policy._learn(3e-6, 1)  # single calls: 3 us each
    assert policy.cheap(1) and policy.cheap(300)  # a size not seen: priced as the smaller one
    assert not policy.cheap(5000)
    policy._learn(0.0008, 5000)  # measured on a thread: 0.16 us a row
    assert policy.cheap(5000) and policy.cheap(1)
    assert not policy.cheap(10000)  # its own size, and 1.6 ms at the known rate
    policy._learn(3e-6, 1)
    assert policy.cheap(5000), "another size's calls leave this size's estimate alone"
    empty = InlinePolicy("e", inline_budget=0, wait_budget=0.001)
    empty.pool_wait = 0.0
    for _ in range(3):
        empty._learn(1e-6, 0)
    assert empty.timed_calls == 0 and not empty.cheap(1), "empty batches teach nothing"


def test_three_strikes_keep_a_version_off_the_loop_for_a_while_then_twice_as_long(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inline, "BAR_CALLS", 20)
    policy = InlinePolicy("p", inline_budget=0, wait_budget=0.001)
    policy.pool_wait = 0.0

    def measured(calls: int) -> None:  # cheap calls, as if timed on the threads
        for _ in range(calls):
            policy._learn(3e-6, 1)

    measured(3)
    for bar in (20, 40):  # long enough for the cost estimate to fall back under budget
        for _ in range(3):
            policy.overran(1)
        for _ in range(bar):
            assert not policy.cheap(1)
            measured(1)
        assert policy.cheap(1), f"back on the loop after {bar} calls"


def test_a_zero_budget_never_runs_inline() -> None:
    assert all("MainThread" not in a for a in _threads(_runner(where, budget=0), 6))


def test_an_inline_call_that_blocks_is_stopped_and_run_again_on_a_thread() -> None:
    naps = iter([0, 0, 0, 5.0])
    ran: list[str] = []

    def sometimes(x: Any) -> str:
        ran.append(threading.current_thread().name)
        time.sleep(next(naps, 0))
        return threading.current_thread().name

    runner = _runner(sometimes)
    start = time.perf_counter()
    answers = _threads(runner, 6)
    # The fourth call was stopped on the loop long before its 5 s nap ended, then ran
    # again from the start on a thread; the version stays there for a while.
    assert time.perf_counter() - start < 2.5
    assert "MainThread" in ran[3] and "MainThread" not in ran[4]
    assert "MainThread" not in answers[3] and "MainThread" not in answers[4]
    assert runner.policy.overruns == 1 and len(ran) == 7


def test_a_stop_never_lands_in_library_code() -> None:
    """`logging` takes its handler's lock just before its `try`: a stop landing in
    between would leave the lock taken, and every other thread that logs stuck."""
    handler = logging.StreamHandler(io.StringIO())
    logger = logging.getLogger("test_runner.chatty")
    logger.addHandler(handler)
    logger.propagate = False
    watchdog = preempt.install()
    assert watchdog is not None

    def chatty(x: Any) -> None:
        while True:  # nearly all its time in logging's code
            logger.warning("busy")

    try:
        for _ in range(10):
            with pytest.raises(preempt.Preempted) as stopped:
                watchdog.run(chatty, None, 0.002)
            frames = [f.f_code for f, _ in traceback.walk_tb(stopped.value.__traceback__)]
            assert frames[-2] is chatty.__code__, "stopped in its own code only"  # [-1]: the handler
        taken: list[bool] = []
        other = threading.Thread(target=lambda: taken.append(handler.lock.acquire(timeout=5)))
        other.start()
        other.join()
        assert taken == [True], "the handler's lock was left taken"
    finally:
        logger.removeHandler(handler)


def test_an_inline_call_that_waits_in_library_code_sends_its_version_back_to_its_threads() -> None:
    """A wait inside the standard library cannot be stopped; once it is over, the
    version goes back to its threads."""
    waits = iter([0, 0, 0, 0.05])

    def sometimes(x: Any) -> str:
        threading.Event().wait(next(waits, 0))
        return threading.current_thread().name

    runner = _runner(sometimes)
    answers = _threads(runner, 6)
    assert "MainThread" in answers[3] and "MainThread" not in answers[4]
    assert runner.policy.overruns == 1


# The one call asyncio.run refuses on the loop leaves its coroutine unawaited.
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_a_sync_function_that_runs_its_own_event_loop_works_once_it_runs_inline() -> None:
    def wrapped(x: int) -> list[Any]:  # a sync wrapper around an async client
        async def ask() -> int:
            await asyncio.sleep(0)
            return x + 1

        return [asyncio.run(ask()), threading.current_thread().name]

    runner = _runner(wrapped)
    answers = [json.loads(a)["data"] for a in _threads(runner, 6)]
    assert [a[0] for a in answers] == [2] * 6
    # The first call on the loop was refused, ran again on a thread; the next ones ran on the loop.
    assert answers[3][1] != "MainThread" and answers[-1][1] == "MainThread"
    assert runner.policy.loopless and runner.policy.overruns == 0


def test_a_runtime_error_on_the_loop_runs_the_call_again_once_then_fails_as_usual() -> None:
    ran: list[str] = []

    def picky(x: int) -> int:
        ran.append(threading.current_thread().name)
        if x < 0:
            raise RuntimeError("negative input")
        return x

    runner = _runner(picky)
    bad = b'{"data": [[1, -1], [2, 2]], "partial": true}'
    answers = _threads(runner, 4, b'{"data": 1}', bad, bad)
    assert answers[:4] == ['{"data":1}'] * 4
    assert ran[3] == "MainThread"  # the fourth call ran on the loop
    # The first failing batch on the loop stopped at its first row and ran again on a thread,
    # both rows answered from there. The next one failed as usual, wherever it ran: once.
    assert ran[4] == "MainThread" and ran[5] != "MainThread" and ran[6] != "MainThread"
    assert len(ran) == 9
    for answer in answers[4:]:
        assert "RuntimeError: negative input" in answer and '"data":[[2,2]]' in answer
    assert runner.policy.loopless and runner.policy.overruns == 0


def test_an_inline_batch_that_turns_slow_is_stopped_and_every_row_answered() -> None:
    def spin(n: int) -> int:
        return sum(i for i in range(n))  # a generator: Python bytecode the watchdog can stop

    runner = _runner(spin)
    small = b'{"data": [[1, 10], [2, 20]]}'
    big = b'{"data": [[1, 10], [2, 3000000], [3, 30]]}'
    answers = _threads(runner, 5, small, big)
    assert all(a == '{"data":[[1,45],[2,190]]}' for a in answers[:5])
    assert answers[5] == '{"data":[[1,45],[2,%d],[3,435]]}' % (3000000 * 2999999 // 2)
    assert runner.policy.overruns == 1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    project = tmp_path_factory.mktemp("runner")
    (project / "mod.py").write_text(textwrap.dedent(MODULE))
    (project / "deploy.yaml").write_text("modules: [mod]\n")  # calls measured cheap run inline
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


def test_a_cheap_deployment_given_a_costly_input_does_not_stall_the_server(
        server: Server, tmp_path: Path) -> None:
    for i in range(10):  # `spin` and `fast` now run inline
        server.post("/v1/spin/latest", {"data": ""})
        server.post("/v1/fast/latest", {"data": i})
    done = tmp_path / "done"
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.post, "/v1/spin/latest", {"data": str(done)})
        time.sleep(0.2)
        for i in range(20):
            assert server.post("/v1/fast/latest", {"data": i}).json() == {"data": i + 1}
        assert not pending.done()
        done.touch()
        assert pending.result().json() == {"data": str(done)}
    server.output_once(lambda out: "spin v1 (main) was stopped on the event loop" in out)


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


def test_a_deployment_declared_not_inline_stays_on_its_threads() -> None:
    assert all("MainThread" not in a for a in _threads(_runner(where, inline=False), 8))


def test_inline_is_a_declared_boolean() -> None:
    from framework import deployment
    from framework.errors import RegistryError

    with pytest.raises(RegistryError, match="inline must be True, False or left out"):
        deployment(inline="yes")
    assert deployment(inline=True)(where).options.describe()["inline"] is True
    assert deployment(inline=False)(where).options.describe()["inline"] is False
    assert "inline" not in deployment(where).options.describe()  # the server decides


WHERE = '''
import threading
from framework import deployment


@deployment
def where(x):
    return threading.current_thread().name
'''


def test_calls_run_on_the_event_loop_in_every_worker_process(tmp_path: Path) -> None:
    """`--workers 2`: each worker builds its app on its main thread, where the watchdog
    can run, so once measured cheap its calls run on the loop."""
    (tmp_path / "mod.py").write_text(textwrap.dedent(WHERE))
    (tmp_path / "deploy.yaml").write_text("modules: [mod]\n")
    run_cli("deploy", store=tmp_path / "store", cwd=tmp_path)
    srv = Server(tmp_path / "store", "--workers", "2", cwd=tmp_path)
    try:
        names = [srv.post("/v1/where/latest", {"data": i}).json()["data"] for i in range(40)]
    finally:
        srv.stop()
    # At most three warm-up calls per worker run on a thread.
    assert names.count("MainThread") >= len(names) - 6, names


def test_time_limits_answer_timeouts_and_let_other_cancellations_through() -> None:
    runner = _runner(where)

    async def go() -> None:
        with pytest.raises(CallTimeout, match="did not answer within 0.05 s"):
            await runner._limit(asyncio.sleep(5), 0.05)
        assert await runner._limit(asyncio.sleep(0, "done"), 0.05) == "done"
        await asyncio.sleep(0.1)  # the finished call's timer never fires into this task
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        # A cancellation from elsewhere (a shutdown) stays one, not a timeout.
        waiting = asyncio.ensure_future(runner._limit(asyncio.sleep(5), 1))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    try:
        asyncio.run(go())
    finally:
        runner.close()


def test_waiting_for_the_gil_while_the_loop_is_busy_is_not_waiting_on_io() -> None:
    """Under load, a function that releases the GIL (each numpy operation does) waits
    for it at each release while the loop serves other requests. Such waits must not
    keep it off the loop for good, as waits on I/O do."""
    def releases(x: Any) -> str:
        for _ in range(5):
            time.sleep(0)  # gives up the GIL, then waits for the busy loop to hand it back
        return threading.current_thread().name

    runner = _runner(releases, budget=0.002)

    async def busy_loop() -> None:
        end = time.perf_counter() + 0.05
        while time.perf_counter() < end:
            pass

    async def go() -> None:
        for _ in range(inline.WARMUP_CALLS):  # timed on the threads, the loop busy meanwhile
            await asyncio.gather(runner.run(parse(b'{"data": 1}'), 5), busy_loop())
        assert runner.policy.pool_wait < 0.002, f"waited {runner.policy.pool_wait * 1e3:.1f} ms"
        assert runner.policy.cheap(1)

    try:
        asyncio.run(go())
    finally:
        runner.close()
