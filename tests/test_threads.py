"""A version's threads (`framework.threads.Lane`): the loop waits for a call
only as long as it was told, a blocked thread leaves the others free, and a
call its caller gave up on never runs."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable

import pytest

from framework import threads
from framework.runner import Runner
from framework.packaging import Loaded
from framework.protocol import parse


def _run(body: Callable[[threads.Lane], Any], size: int = 2) -> Any:
    lane = threads.Lane(size, "test")

    async def go() -> Any:
        return await body(lane)

    try:
        return asyncio.run(go())
    finally:
        lane.close()


def _name() -> str:
    return threading.current_thread().name


def test_a_call_done_within_the_wait_is_answered_at_once_on_a_lane_thread() -> None:
    async def body(lane: threads.Lane) -> Any:
        handoff = lane.call(_name, wait=5.0)
        assert handoff.future is None, "finished while the loop waited"
        return handoff.result()

    assert _run(body).startswith("test-")


def test_a_call_past_the_wait_frees_the_loop_and_still_answers() -> None:
    release = threading.Event()

    def slow() -> str:
        release.wait(10)
        return "done"

    async def body(lane: threads.Lane) -> tuple[float, str]:
        start = time.perf_counter()
        handoff = lane.call(slow, wait=0.05)
        held = time.perf_counter() - start
        assert handoff.future is not None
        release.set()
        return held, await handoff.future

    held, answer = _run(body)
    assert answer == "done"
    assert held < 1.0, f"the loop was held {held:.2f} s for a 0.05 s wait"


@pytest.mark.parametrize("wait", [0.0, 5.0])
def test_what_a_call_raises_reaches_its_caller(wait: float) -> None:
    def fails() -> None:
        raise SystemExit(3)

    async def body(lane: threads.Lane) -> None:
        handoff = lane.call(fails, wait=wait)
        if handoff.future is None:
            handoff.result()
        else:
            await handoff.future

    with pytest.raises(SystemExit):
        _run(body)


def test_a_blocked_thread_leaves_the_others_free_and_size_bounds_them() -> None:
    release = threading.Event()
    running, most = 0, 0
    lock = threading.Lock()

    def blocker(n: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(10)
        with lock:
            running -= 1
        return n

    async def body(lane: threads.Lane) -> list[int]:
        blocked = lane.call(blocker, 0).future
        # A call measured cheap still gets a free thread while one is blocked.
        assert lane.call(_name, wait=5.0).future is None
        more = [lane.call(blocker, n).future for n in range(1, 5)]
        await asyncio.sleep(0.2)
        release.set()
        return await asyncio.gather(blocked, *more)

    assert _run(body, size=2) == [0, 1, 2, 3, 4]
    assert most == 2


def test_a_call_cancelled_while_queued_never_runs() -> None:
    release = threading.Event()
    ran: list[str] = []

    async def body(lane: threads.Lane) -> None:
        first = lane.call(release.wait, 10).future
        queued = lane.call(ran.append, "queued").future
        assert queued is not None
        queued.cancel()  # what a time limit does to the caller's await
        release.set()
        await first
        await lane.call(ran.append, "after").future

    _run(body, size=1)
    assert ran == ["after"]


def test_idle_threads_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "IDLE_EXIT_S", 0.05)

    async def body(lane: threads.Lane) -> list[str]:
        await asyncio.gather(*(lane.call(time.sleep, 0.05).future for _ in range(3)))
        for _ in range(100):  # bounded: up to 5 s
            live = [t.name for t in threading.enumerate() if t.name.startswith("test-")]
            if not live:
                return live
            await asyncio.sleep(0.05)
        return live

    assert _run(body, size=3) == []


def test_a_call_measured_cheap_that_turns_slow_holds_the_loop_only_briefly() -> None:
    """Where calls cannot run on the loop (no watchdog here) a version measured cheap is
    waited for, but a slow call then costs the loop a few milliseconds, not its
    whole run: other requests go on, and its time limit still fires."""
    naps = iter([0, 0, 0, 0, 0, 2.0])

    def sometimes(x: Any) -> Any:
        time.sleep(next(naps, 0))
        return x

    runner = Runner(Loaded(sometimes, {"name": "sometimes", "version": 1, "branch": "main"}), threads=2)

    async def go() -> tuple[float, bool]:
        for _ in range(5):
            await runner.run(parse(b'{"data": 1}'), 5)
        assert runner.policy.cheap(1)
        start = time.perf_counter()
        slow = asyncio.ensure_future(runner.run(parse(b'{"data": 1}'), 0.5))
        await asyncio.sleep(0.01)
        ticked = time.perf_counter() - start
        try:
            await slow
        except Exception as exc:  # noqa: BLE001
            return ticked, type(exc).__name__ == "CallTimeout"
        return ticked, False

    try:
        ticked, timed_out = asyncio.run(go())
    finally:
        runner.close()
    assert ticked < 1.0, f"the loop was held {ticked:.2f} s"
    assert timed_out


def test_a_zero_wait_budget_sends_every_call_to_the_threads_without_waiting() -> None:
    runner = Runner(Loaded(lambda x: _name(), {"name": "n", "version": 1, "branch": "main"}),
                    threads=2, wait_budget=0)

    async def go() -> list[bytes]:
        return [(await runner.run(parse(b'{"data": 1}'), 5))[1] for _ in range(8)]

    try:
        answers = asyncio.run(go())
    finally:
        runner.close()
    assert all(b"MainThread" not in a for a in answers)
    assert runner.policy.timed_calls == 8 and not runner.policy.cheap(1)


def test_the_loop_does_not_wait_when_no_thread_is_free() -> None:
    release = threading.Event()

    async def body(lane: threads.Lane) -> tuple[float, str]:
        blocked = lane.call(release.wait, 10).future
        start = time.perf_counter()
        queued = lane.call(_name, wait=5.0)
        held = time.perf_counter() - start
        assert queued.future is not None and not queued.overran
        release.set()
        await blocked
        return held, await queued.future

    held, name = _run(body, size=1)
    assert held < 1.0 and name.startswith("test-")


class _SlowTake:
    """A queue whose get() pauses after taking an item: the moment a thread has
    taken a call but not yet counted itself busy, widened from microseconds."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def put(self, item: Any) -> None:
        self.queue.put(item)

    def qsize(self) -> int:
        return self.queue.qsize()

    def empty(self) -> bool:
        return self.queue.empty()

    def get(self, timeout: float | None = None) -> Any:
        item = self.queue.get(timeout=timeout)
        time.sleep(0.05)
        return item


def test_a_call_queued_while_a_thread_takes_its_own_gets_a_thread_of_its_own() -> None:
    release = threading.Event()

    async def body(lane: threads.Lane) -> str:
        lane._calls = _SlowTake(lane._calls)  # type: ignore[assignment]
        blocked = lane.call(release.wait, 10).future
        await asyncio.sleep(0.01)  # the thread has taken it, and not yet counted itself busy
        second = lane.call(lambda: "second").future
        try:
            return await asyncio.wait_for(asyncio.shield(second), 5)
        finally:
            release.set()
            await blocked

    assert _run(body, size=2) == "second"


def test_stop_iteration_from_a_call_reaches_its_caller_and_spares_the_others() -> None:
    def stops() -> None:
        raise StopIteration

    async def body(lane: threads.Lane) -> list[Any]:
        futures = [lane.call(stops).future, lane.call(_name).future]
        return await asyncio.gather(*futures, return_exceptions=True)

    failed, name = _run(body)
    assert isinstance(failed, RuntimeError) and isinstance(failed.__cause__, StopIteration)
    assert name.startswith("test-")


def test_a_version_whose_calls_sometimes_block_is_waited_for_only_a_few_times() -> None:
    naps = iter([0.05, 0] * 15)

    def sometimes(x: Any) -> Any:
        time.sleep(next(naps, 0))
        return x

    runner = Runner(Loaded(sometimes, {"name": "sometimes", "version": 1, "branch": "main"}), threads=2)
    overruns = 0
    overran = runner.policy.overran

    def counting(rows: int) -> None:
        nonlocal overruns
        overruns += 1
        overran(rows)

    runner.policy.overran = counting  # type: ignore[method-assign]

    async def go() -> None:
        for _ in range(30):
            await runner.run(parse(b'{"data": 1}'), 5)

    try:
        asyncio.run(go())
    finally:
        runner.close()
    assert 1 <= overruns <= 3
    assert not runner.policy.cheap(1)


@pytest.mark.parametrize("error", [asyncio.CancelledError, GeneratorExit, KeyboardInterrupt])
def test_whatever_sync_code_raises_is_its_rows_failure(error: type[BaseException]) -> None:
    def fails_on_two(x: int) -> int:
        if x == 2:
            raise error()
        return x

    runner = Runner(Loaded(fails_on_two, {"name": "f", "version": 1, "branch": "main"}), threads=2)
    body = b'{"data": [[1, 1], [2, 2]], "partial": true}'
    try:
        status, answer = asyncio.run(runner.run(parse(body), 5))
    finally:
        runner.close()
    assert status == 200
    assert answer.startswith(b'{"data":[[1,1]],"errors":[[2,"') and error.__name__.encode() in answer
