"""Running a parsed call against one loaded version: where each kind of call runs.

- `async def` functions are awaited on the event loop.
- Sync functions declared `@deployment(inline=True)` run on the event loop:
  the author's promise that they are pure, sub-millisecond and never block.
- Every other sync function runs on the version's own threads
  (`framework.execute.threads`, `concurrency` of them, 1 by default), a whole request
  in one hop, its answer encoded there too; or, with `isolation="process"`,
  in the version's worker processes (`framework.execute.isolation`).
- Vectorized functions (`@deployment(vectorized=True)`) get every row of a
  call at once, one list per parameter; concurrent requests are gathered into
  such calls by `framework.execute.batching.Batcher` on the event loop or,
  with no wait and one thread or worker, where the calls run
  (`framework.execute.gathering`), from their raw bodies.

A call runs at most once: nothing here runs one again.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Awaitable, Callable

from framework.execute.batching import Batcher, Outcome
from framework.execute.calls import (
    Answer,
    Calls,
    Failures,
    batch_answer,
    columns,
    merge_unbound,
    signature_of,
    single_answer,
    vector_answer,
    vector_result,
    vector_rows,
    vector_rows_of,
)
from framework.execute.gathering import Gatherer, gathers_raw
from framework.errors import BadRequest, CallTimeout, DeploymentFailed, PayloadTooLarge, RowsFailed
from framework.protocol import Binder, Call
from framework.execute.threads import Lane

# What an async deployment may raise and still get an answer. Not BaseException:
# asyncio's CancelledError must still end timed-out calls.
USER_ERRORS = (Exception, SystemExit, KeyboardInterrupt)
# Answers with more rows than this are encoded off the event loop.
OFFLOAD_ROWS = 2000
NO_DEADLINE = float("inf")
# What a worker refusing a raw body (`Calls.body`) names, raised here as the server's own.
REFUSED = {cls.__name__: cls for cls in (BadRequest, PayloadTooLarge)}


class Executor:
    """What runs a version's sync calls: `threads.Lane` or `isolation.ProcessLane`."""

    def submit(self, kind: str, arg: Any, deadline: float) -> asyncio.Future[Any]: ...

    def close(self) -> None: ...


def _stand_in(signature: inspect.Signature | None) -> Callable[..., Any]:
    """A function with `signature`, to bind rows for a function that lives in another process."""
    def stand_in(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("never called")

    if signature is not None:
        stand_in.__signature__ = signature  # type: ignore[attr-defined]
    return stand_in


class Runner:
    def __init__(self, manifest: dict[str, Any], executor: Executor | None = None, *,
                 fn: Callable[..., Any] | None = None, signature: inspect.Signature | None = None,
                 is_async: bool = False, concurrency: int = 1) -> None:
        """`fn` is the loaded function when it lives in this process, run on threads of its
        own unless `executor` is given; else `signature` is its, and `executor` runs it."""
        m = manifest
        self.manifest = m
        self.label = f"{m['name']} v{m['version']} ({m['branch']})"
        self.version: int = m["version"]
        self.labels = (m["name"], m["branch"], str(m["version"]))  # the metrics' labels
        self.size_bytes = 0  # what the cache counts against server.cache_bytes
        self.fn = fn
        self.is_async = is_async
        self.calls = Calls(fn, self.label) if fn is not None else None
        options = m.get("options") or {}
        self.inline = bool(options.get("inline")) and self.calls is not None and not is_async
        # A vectorized sync version with no wait and one thread or worker gathers its raw
        # bodies where it runs: the loop then neither parses them nor forms the calls.
        gathers = gathers_raw(options) and not self.inline and not is_async
        if executor is None:
            assert self.calls is not None, "a Runner needs a function or an executor"
            gatherer = Gatherer(self.calls, options["max_batch_rows"]) if gathers else None
            executor = Lane(concurrency, f"{m['name']}-v{m['version']}", self.calls, gatherer)
        self.executor = executor
        if fn is not None:
            signature = signature_of(fn)
        self.binder = Binder(fn if fn is not None else _stand_in(signature))
        self.batcher: Batcher | None = None
        if options.get("vectorized"):
            self.signature = signature
            self.batcher = Batcher(self._vector_call, max_rows=options["max_batch_rows"],
                                   max_wait=options["max_wait_ms"] / 1000)
        # A function in another process parses the bodies of its plain requests itself:
        # pickling the parsed rows to it, and unpickling them there, cost more than parsing.
        self.parses_bodies = gathers or (fn is None and self.batcher is None)
        # `inline=True` and not vectorized: the whole request, here on the event loop.
        self._on_loop = self.calls.answer if self.inline and self.batcher is None else None

    def close(self) -> None:
        self.executor.close()

    async def _limit(self, work: Awaitable[Any], timeout: float) -> Any:
        """`await work`, or CallTimeout after `timeout` seconds.

        A timer cancels this task, and `uncancel` tells that cancellation from
        any other (a shutdown). Cancelling the awaited future is what keeps a
        queued call from ever starting.
        """
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        fired = False

        def expire() -> None:
            nonlocal fired
            fired = True
            task.cancel()

        timer = task.get_loop().call_later(timeout, expire)
        try:
            return await work
        except asyncio.CancelledError:
            if fired and task.uncancel() <= cancelling:
                raise CallTimeout(
                    f"{self.label} did not answer within {timeout:g} s; send a larger "
                    '"timeout_seconds" or a smaller batch'
                ) from None
            raise
        finally:
            timer.cancel()

    # -- async ------------------------------------------------------------------

    async def _one_async(self, args: tuple[Any, ...], kwargs: dict[str, Any], row_id: Any,
                         failures: Failures) -> Outcome:
        assert self.fn is not None
        try:
            return True, await self.fn(*args, **kwargs)
        except USER_ERRORS as exc:
            return False, failures.add(exc, row_id)

    async def _async_answer(self, call: Call) -> Answer:
        failures = Failures(self.label)
        if not call.batch:
            args, kwargs = self.binder.single(call.data)
            answer = single_answer(*await self._one_async(args, kwargs, None, failures))
            failures.log(1)
            return answer
        outcomes = await asyncio.gather(*(self._one_async(*self.binder.row(row[1:]), row[0], failures)
                                          for row in call.rows))
        failures.log(len(call.rows))
        failed = {n: v for n, (ok, v) in enumerate(outcomes) if not ok}
        results = [None if n in failed else v for n, (_, v) in enumerate(outcomes)]
        return await self._batch_answer(call, results, failed)

    async def _batch_answer(self, call: Call, results: list[Any], failed: dict[int, str]) -> Answer:
        if len(results) > OFFLOAD_ROWS:  # a large answer is encoded off the loop
            return await asyncio.to_thread(batch_answer, call, results, failed)
        return batch_answer(call, results, failed)

    # -- vectorized -------------------------------------------------------------

    async def _vector_call(self, rows: list[list[Any]]) -> Outcome:
        if self.is_async:
            assert self.fn is not None
            try:
                return vector_result(self.label, await self.fn(*columns(rows)), len(rows))
            except USER_ERRORS as exc:
                failures = Failures(self.label)
                text = failures.add(exc, None)
                failures.log(len(rows))
                return False, text
        if self.inline:
            assert self.calls is not None
            return self.calls.vector(rows)
        # No time limit here: each caller's bounds its own wait for the batch.
        return await self.executor.submit("vector", rows, NO_DEADLINE)

    async def _vectorized(self, call: Call, timeout: float) -> Answer:
        assert self.batcher is not None
        rows = vector_rows_of(self.binder, call)
        good, unbound = vector_rows(self.binder, self.signature, self.label, rows)
        results, failed = await self._limit(self.batcher.submit(good), timeout) if good else ([], {})
        results, failed = merge_unbound(len(rows), unbound, results, failed)
        if call.batch and len(results) > OFFLOAD_ROWS:  # a large answer is encoded off the loop
            return await asyncio.to_thread(vector_answer, call, results, failed)
        return vector_answer(call, results, failed)

    # -- entry ------------------------------------------------------------------

    async def run_body(self, body: bytes, max_rows: int | None, timeout: float,
                       call: Call) -> tuple[int, bytes]:
        """`run` of the request `body`, parsed in the worker; `call` is a stand-in that gets
        what the metrics read of it (batch, ids, failed)."""
        future = self.executor.submit("body", (body, max_rows), time.monotonic() + timeout)
        answer, batch, rows = await self._limit(future, timeout)
        if answer is None:
            raise REFUSED[batch](rows)
        if batch:
            call.batch, call.ids = True, [None] * rows
        return self._answered(answer, call)

    async def run(self, call: Call, timeout: float) -> tuple[int, bytes]:
        """Run `call`; returns (status, body) or raises a FrameworkError."""
        if self._on_loop is not None:  # first: the path whose every step shows
            answer = self._on_loop(call)
        elif self.batcher is not None:
            answer = await self._vectorized(call, timeout)
        elif self.is_async:
            answer = await self._limit(self._async_answer(call), timeout)
        else:
            future = self.executor.submit("answer", call, time.monotonic() + timeout)
            answer = await self._limit(future, timeout)
        status, value, extra = answer
        if status == 200:
            call.failed = extra
            return 200, value
        return self._answered(answer, call)

    def _answered(self, answer: Answer, call: Call) -> tuple[int, bytes]:
        status, value, extra = answer
        if status == 200:
            call.failed = extra
            return 200, value
        if extra is None:
            raise DeploymentFailed(value)
        call.failed = len(extra)
        raise RowsFailed(value, [], extra)

