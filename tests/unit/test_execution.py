"""Where calls run, in process: a version's threads, the event loop (inline=True), and limits."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable

import orjson
import pytest

from framework import deployment
from framework.errors import CallTimeout, RegistryError, RowsFailed
from framework.protocol import parse
from framework.execute.runner import Runner
from framework.execute.threads import Lane


def _runner(fn: Callable[..., Any], **options: Any) -> Runner:
    manifest = {"name": fn.__name__, "version": 1, "branch": "main", "options": options}
    return Runner(manifest, fn=fn, concurrency=options.get("concurrency", 1),
                  is_async=asyncio.iscoroutinefunction(fn))


def _answers(runner: Runner, bodies: list[bytes], timeout: float = 30) -> list[Any]:
    """Every body's answer, all sent at once (exceptions as they were raised)."""
    async def go() -> list[Any]:
        return await asyncio.gather(*(runner.run(parse(b), timeout) for b in bodies),
                                    return_exceptions=True)
    try:
        return asyncio.run(go())
    finally:
        runner.close()


def where(x: Any) -> str:
    return threading.current_thread().name


def test_sync_calls_run_off_the_event_loop_by_default_and_on_it_when_declared_inline() -> None:
    plain = _answers(_runner(where), [b'{"data": 1}'] * 8)
    assert all(status == 200 and b"MainThread" not in body for status, body in plain), plain
    inline = _answers(_runner(where, inline=True), [b'{"data": 1}'] * 8)
    assert all(body == b'{"data":"MainThread"}' for _, body in inline), inline


def test_a_version_is_called_by_one_thread_at_a_time_by_default() -> None:
    inside, most = 0, 0
    lock = threading.Lock()

    def model(x: int) -> int:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.001)  # lets another thread in, if any were allowed
        with lock:
            inside -= 1
        return x

    answers = _answers(_runner(model), [b'{"data": [[1, 1], [2, 2]]}'] * 50 + [b'{"data": 3}'] * 50)
    assert all(a[0] == 200 for a in answers)
    assert most == 1


def test_concurrency_n_lets_n_threads_call_a_version_at_once_and_no_more() -> None:
    inside, most = 0, 0
    lock = threading.Lock()
    release = threading.Event()

    def blocking(x: int) -> int:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        release.wait(10)
        with lock:
            inside -= 1
        return x

    runner = _runner(blocking, concurrency=3)

    async def go() -> list[Any]:
        calls = [asyncio.ensure_future(runner.run(parse(b'{"data": 1}'), 30)) for _ in range(8)]
        for _ in range(500):  # bounded: until three are inside
            if inside == 3:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        release.set()
        return await asyncio.gather(*calls)

    try:
        answers = asyncio.run(go())
    finally:
        runner.close()
    assert most == 3 and runner.executor.threads <= 3
    assert answers == [(200, b'{"data":1}')] * 8


def test_a_call_whose_time_limit_passes_while_queued_never_starts() -> None:
    started: list[float] = []

    def slow(seconds: float) -> float:
        started.append(seconds)
        time.sleep(seconds)
        return seconds

    runner = _runner(slow)

    async def go() -> tuple[Any, Any]:
        first = asyncio.ensure_future(runner.run(parse(b'{"data": 0.6}'), 30))
        await asyncio.sleep(0.1)  # the first one runs; the second queues behind it
        second = asyncio.ensure_future(runner.run(parse(b'{"data": 0.01}'), 0.2))
        return await asyncio.gather(first, second, return_exceptions=True)

    try:
        first, second = asyncio.run(go())
        time.sleep(0.3)  # the thread is free again: the timed-out call must not run now
    finally:
        runner.close()
    assert first == (200, b'{"data":0.6}')
    assert isinstance(second, CallTimeout)
    assert started == [0.6]


def test_a_call_that_times_out_while_running_answers_504_and_runs_once() -> None:
    ran: list[int] = []

    def slow(x: int) -> int:
        ran.append(x)
        time.sleep(0.5)
        return x

    [answer] = _answers(_runner(slow), [b'{"data": 7}'], timeout=0.1)
    assert isinstance(answer, CallTimeout) and "did not answer within 0.1 s" in str(answer)
    time.sleep(0.6)
    assert ran == [7]


def test_a_bare_except_around_a_slow_computation_returns_the_computed_value() -> None:
    def careful(n: int) -> int:
        try:
            total = 0
            for i in range(n):
                total += i
            return total
        except:  # noqa: E722 - what user code does; nothing may land inside it
            return -1

    answers = _answers(_runner(careful), [b'{"data": 2000000}', b'{"data": 10}'])
    assert answers == [(200, b'{"data":%d}' % (2000000 * 1999999 // 2)), (200, b'{"data":45}')]


@pytest.mark.parametrize("error", [ValueError, SystemExit, KeyboardInterrupt, StopIteration])
def test_whatever_sync_code_raises_is_its_rows_failure(error: type[BaseException]) -> None:
    def picky(x: int) -> int:
        if x == 2:
            raise error("two")
        return x

    [answer] = _answers(_runner(picky), [b'{"data": [[1, 1], [2, 2], [3, 3]], "partial": true}'])
    status, body = answer
    assert status == 200
    assert body.startswith(b'{"data":[[1,1],[3,3]],"errors":[[2,"' + error.__name__.encode())


def test_failures_anywhere_among_the_rows_fail_those_rows_only_and_each_runs_once() -> None:
    ran: list[int] = []

    def picky(x: int) -> int:
        ran.append(x)
        if x % 5 == 0:
            raise ValueError(f"five {x}")
        if x % 7 == 0:
            raise StopIteration
        return x

    body = b'{"data": [%s], "partial": true}' % b",".join(b"[%d, %d]" % (i, i) for i in range(40))
    [answer] = _answers(_runner(picky), [body])
    status, payload = answer
    got = orjson.loads(payload)
    assert status == 200 and sorted(ran) == list(range(40))
    assert got["data"] == [[i, i] for i in range(40) if i % 5 and i % 7]
    assert [e[0] for e in got["errors"]] == [i for i in range(40) if not (i % 5 and i % 7)]
    assert got["errors"][0] == [0, "ValueError: five 0"] and got["errors"][1] == [5, "ValueError: five 5"]
    assert [7, "StopIteration"] in got["errors"]


def test_failed_rows_are_logged_once_per_request_with_a_few_tracebacks(
        caplog: pytest.LogCaptureFixture) -> None:
    def fails(x: int) -> int:
        raise ValueError(f"bad {x % 2}")

    body = b'{"data": [%s]}' % b",".join(b"[%d, %d]" % (i, i) for i in range(5000))
    with caplog.at_level("ERROR", logger="framework.runtime"):
        [answer] = _answers(_runner(fails), [body])
    assert isinstance(answer, RowsFailed) and len(answer.errors) == 5000
    records = [r for r in caplog.records if r.name == "framework.runtime"]
    assert len(records) == 1
    text = records[0].getMessage()
    assert "5000 of 5000 row(s) failed; first failed id 0" in text
    assert text.count("Traceback") == 2  # two distinct failures, each shown once
    assert len(text) < 10_000


def test_async_deployments_are_awaited_on_the_loop() -> None:
    async def hello(x: int) -> str:
        await asyncio.sleep(0)
        return f"{x} on {threading.current_thread().name}"

    answers = _answers(_runner(hello), [b'{"data": [[1, 1], [2, 2]]}'])
    assert answers == [(200, b'{"data":[[1,"1 on MainThread"],[2,"2 on MainThread"]]}')]


def test_time_limits_answer_timeouts_and_let_other_cancellations_through() -> None:
    runner = _runner(where)

    async def go() -> None:
        with pytest.raises(CallTimeout, match="did not answer within 0.05 s"):
            await runner._limit(asyncio.sleep(5), 0.05)
        assert await runner._limit(asyncio.sleep(0, "done"), 0.05) == "done"
        await asyncio.sleep(0.1)  # the finished call's timer never fires into this task
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        waiting = asyncio.ensure_future(runner._limit(asyncio.sleep(5), 1))
        await asyncio.sleep(0.01)
        waiting.cancel()  # a cancellation from elsewhere (a shutdown) stays one
        with pytest.raises(asyncio.CancelledError):
            await waiting

    try:
        asyncio.run(go())
    finally:
        runner.close()


class _Target:
    def __init__(self) -> None:
        self.ran: list[Any] = []

    def echo(self, x: Any) -> Any:
        self.ran.append(x)
        return x


def test_a_closed_lanes_threads_exit_and_a_late_call_still_runs() -> None:
    target = _Target()
    lane = Lane(2, "t", target)

    async def go() -> list[Any]:
        first = await lane.submit("echo", 1, float("inf"))
        lane.close()
        for _ in range(200):  # bounded: until its threads are gone
            if lane.threads == 0:
                break
            await asyncio.sleep(0.01)
        assert lane.threads == 0
        late = await lane.submit("echo", 2, float("inf"))
        return [first, late]

    assert asyncio.run(go()) == [1, 2]
    assert target.ran == [1, 2]


def test_execution_options_are_checked_at_decoration_time() -> None:
    with pytest.raises(RegistryError, match="inline must be True or False"):
        deployment(inline="yes")
    with pytest.raises(RegistryError, match="concurrency must be a whole number >= 1"):
        deployment(concurrency=0)
    with pytest.raises(RegistryError, match="isolation must be one of"):
        deployment(isolation="container")
    with pytest.raises(RegistryError, match="cannot be combined"):
        deployment(inline=True, isolation="process")
    described = deployment(concurrency=4, isolation="process")(where).options.describe()
    assert (described["concurrency"], described["isolation"]) == (4, "process")
    assert "inline" not in deployment(where).options.describe()


OPTION_BODIES = [
    b'{"data": [[1, 2]], "batch": true}',
    b'{"data": [[1, 2]], "partial": true}',
    b'{"data": [[1, 2]], "timeout_seconds": 1}',
    b'{"data": [[1, 2]], "response_webhook": "http://127.0.0.1:9/"}',
    b'{"data": [[1, 2]], "response_format": "links"}',
    b'{"data": [[1, 2]], "\\u0062atch": false}',  # "batch", escaped
    b'{"data": [[1, 2]], "p\\u0061rtial": true}',
]


def test_only_bodies_that_cannot_name_an_option_are_left_to_a_worker_to_parse() -> None:
    from framework.protocol import only_data

    for body in OPTION_BODIES:
        assert not only_data(body), body
    plain = [b'{"data": [[1, 2]]}', b'{"data": 10}', b'{"data": [["batches", "timeout"]]}',
             b'{"data": [[1, 2]], "other": 1}']
    for body in plain:
        assert only_data(body), body
        call = parse(body)
        assert (call.partial, call.timeout, call.webhook, call.response_format) == (False, None, None, None)


def test_a_raw_body_is_answered_as_its_parsed_call_and_refusals_are_named() -> None:
    from framework.execute.calls import Calls

    def fn(x: Any, y: int = 0) -> Any:
        if x == "bad":
            raise ValueError("bad")
        return [x, y]

    calls = Calls(fn, "fn v1 (main)")
    for body in [b'{"data": 3}', b'{"data": [[2, 1], [1, "bad"], [3, {"x": 1, "y": 2}]]}',
                 b'{"data": [[2, 1], [1, 5]]}', b'{"data": "bad"}']:
        call = parse(body)
        answer, batch, rows = calls.body((body, None))
        assert answer == calls.answer(call) and batch == call.batch
        assert rows == (len(call.ids) if call.batch else 1)
    assert calls.body((b'{"data": [[1, 1], [1, 2]]}', None))[:2] == (None, "BadRequest")
    assert calls.body((b"not json", None))[:2] == (None, "BadRequest")
    refused = calls.body((b'{"data": [[1, 1], [2, 2], [3, 3]]}', 2))
    assert refused[:2] == (None, "PayloadTooLarge") and "server.max_rows" in refused[2]


def test_a_worker_gathers_raw_bodies_in_order_and_announces_each_call_of_several() -> None:
    from framework.execute.calls import Calls
    from framework.execute.gathering import Gatherer, gathers_raw

    sizes: list[int] = []

    def double(x: list[int]) -> list[int]:
        sizes.append(len(x))
        return [2 * v for v in x]

    never = float("inf")
    items = [("body", (b'{"data": [[1, 1], [2, 2]]}', None), never),
             ("body", (b'{"data": 5}', None), never),
             ("body", (b'{"data": [[1, 1], [2, 2], [3, 3], [4, 4], [5, 5], [6, 6]]}', None), never),
             ("body", (b'{"data": [[1, 1}', None), never),  # refused: answered in its place
             ("body", (b'{"data": [[9, 9]]}', None), 0.0),  # expired: never run
             ("vector", [[1, 3]], never),  # a call of its own, after all before it
             ("body", (b'{"data": [[1, 7]]}', None), never),
             ("body", (b'{"data": [[1, 8]], "x": 1}', 2), never)]
    out: list[tuple] = []
    Gatherer(Calls(double, "double"), 4).run(items, out.append, lambda *item: ("own", item[0]))
    kinds = [m[0] if m[0] != "done" else ("refused" if m[2][0] is None else m[2][0][0]) for m in out]
    assert kinds == ["group", 200, 200, 200, "refused", "expired", "own", "group", 200, 200]
    assert out[0] == ("group", 2) and out[7] == ("group", 2)
    assert out[3][2][0][1] == b'{"data":[[1,2],[2,4],[3,6],[4,8],[5,10],[6,12]]}'
    assert out[2][2] == ((200, b'{"data":10}', 0), False, 1)
    assert sizes == [3, 4, 2, 2]  # whole requests up to 4 rows; the 6-row one in chunks
    assert gathers_raw({"vectorized": True, "max_wait_ms": 0, "max_batch_rows": 4})
    assert not gathers_raw({"vectorized": True, "max_wait_ms": 2, "max_batch_rows": 4})
    assert not gathers_raw({"vectorized": True, "max_wait_ms": 0, "concurrency": 2})


def test_a_vectorized_version_with_no_wait_gathers_raw_bodies_on_its_thread() -> None:
    """Decided once, at load: the loop hands such a version raw bodies, and the requests
    queued while its thread was busy are parsed and gathered there into one call."""
    from framework.protocol import Call

    gate = threading.Event()
    calls: list[tuple[str, list[int]]] = []

    def double(x: list[int]) -> list[int]:
        calls.append((threading.current_thread().name, list(x)))
        gate.wait(10)
        return [2 * v for v in x]

    vectorized = {"vectorized": True, "max_batch_rows": 1024}
    runner = _runner(double, **vectorized, max_wait_ms=0)
    assert runner.parses_bodies
    assert not _runner(double, **vectorized, max_wait_ms=1).parses_bodies  # the loop's Batcher
    assert not _runner(double, **vectorized, max_wait_ms=0, inline=True).parses_bodies

    async def go() -> list[Any]:
        def send(body: bytes, timeout: float = 30) -> asyncio.Task[Any]:
            stand_in = Call(False, None, [], [], False, None)
            return asyncio.ensure_future(runner.run_body(body, None, timeout, stand_in))

        first = send(b'{"data": [[1, 1]]}')
        while not calls:  # the thread holds the first call
            await asyncio.sleep(0.01)
        behind = [send(b'{"data": [[1, 2], [2, 3]]}'), send(b'{"data": [[1, 4]]}', 0.05),
                  send(b'{"data": [[1, 5]]}'), send(b'{"data": [[1, 6]')]
        await asyncio.sleep(0.2)  # the second times out, queued
        gate.set()
        return await asyncio.gather(first, *behind, return_exceptions=True)

    try:
        first, two, late, five, bad = asyncio.run(go())
    finally:
        runner.close()
    assert first == (200, b'{"data":[[1,2]]}') and two == (200, b'{"data":[[1,4],[2,6]]}')
    assert five == (200, b'{"data":[[1,10]]}')
    assert isinstance(late, CallTimeout) and type(bad).__name__ == "BadRequest"
    assert [rows for _, rows in calls] == [[1], [2, 3, 5]]  # the timed-out one never ran
    assert {name for name, _ in calls} == {"double-v1-1"}
