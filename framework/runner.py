"""Running a parsed call against one loaded version.

Where a call runs:
- `async def` functions are awaited on the event loop.
- Sync functions run on threads owned by the version (`framework.threads`),
  a whole batch in one hop: a deployment that blocks uses up only its own
  threads, and time limits still fire. Calls measured cheap run on the
  event loop itself, where a watchdog stops any that overruns
  (`framework.inline` decides, `framework.preempt` stops).
- Vectorized functions (`@deployment(vectorized=True)`) get every row of a
  call at once, one list per parameter; concurrent requests are gathered into
  such calls by `framework.batching.Batcher`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from itertools import starmap
from operator import itemgetter
from typing import Any, Awaitable, Callable, Iterator

from framework import encoding
from framework.batching import Batcher, Outcome
from framework.errors import CallTimeout, DeploymentFailed, RowsFailed
from framework.inline import DECLARED_BUDGET, DEFAULT_WAIT_BUDGET, InlinePolicy, LoopInUse
from framework.packaging import Loaded
from framework.preempt import Preempted, Watchdog
from framework.protocol import Binder, Call, error_text
from framework.threads import Lane

log = logging.getLogger("framework.runtime")

# What a deployment may raise and still get an answer: SystemExit and
# KeyboardInterrupt from user code are its failures, not the server's. Not
# BaseException in async code, so asyncio's CancelledError still ends timed-out
# calls; sync code cannot be cancelled, so whatever it raises is its failure,
# except `Preempted`: the watchdog stopping it on the loop, to run it again elsewhere.
USER_ERRORS = (Exception, SystemExit, KeyboardInterrupt)
SYNC_ERRORS = BaseException
_ARG = itemgetter(1)
_ARGS = itemgetter(slice(1, None))


class Runner:
    def __init__(self, loaded: Loaded, *, threads: int, inline_budget: float = 0.0,
                 wait_budget: float = DEFAULT_WAIT_BUDGET, watchdog: Watchdog | None = None) -> None:
        m = loaded.manifest
        self.fn = loaded.fn
        self.manifest = m
        self.label = f"{m['name']} v{m['version']} ({m['branch']})"
        self.version: int = m["version"]
        self.labels = (m["name"], m["branch"], str(m["version"]))  # the metrics' labels
        self.binder = Binder(self.fn)
        self.is_async = inspect.iscoroutinefunction(self.fn)
        self.lane = Lane(threads, f"{m['name']}-v{m['version']}")
        options = m.get("options") or {}
        # The server's budget applies to every version; @deployment(inline=...) overrides it.
        declared = options.get("inline")
        budget = 0.0 if declared is False else inline_budget or (DECLARED_BUDGET if declared else 0.0)
        self.policy = InlinePolicy(self.label, budget, wait_budget, watchdog)
        self.batcher: Batcher | None = None
        if options.get("vectorized"):
            self.signature = inspect.signature(self.fn)
            self.batcher = Batcher(self._vector_call, max_rows=options["max_batch_rows"],
                                   max_wait=options["max_wait_ms"] / 1000)

    def close(self) -> None:
        self.lane.close()

    def _failed(self, exc: BaseException, row_id: Any = None) -> str:
        self.policy.failed(exc)  # may raise LoopInUse, to run the call again on the threads
        where = self.label if row_id is None else f"{self.label} row {row_id!r}"
        log.error("%s raised", where, exc_info=exc)
        return error_text(exc)

    # -- one row at a time ----------------------------------------------------

    def _call_row(self, row: list[Any]) -> Any:
        args, kwargs = self.binder.row(row[1:])
        return self.fn(*args, **kwargs)

    def _calls(self, rows: list[list[Any]]) -> Iterator[Any]:
        """The function applied to each row, iterated in C where the rows allow it."""
        lengths = set(map(len, rows))
        several = self.binder.several
        if len(lengths) == 1 and not (several and 2 in lengths):  # no row is a kwargs dict
            if 2 in lengths:
                return map(self.fn, map(_ARG, rows))
            return starmap(self.fn, map(_ARGS, rows))
        return map(self._call_row, rows)

    def _rows_sync(self, rows: list[list[Any]]) -> tuple[list[Any], dict[int, str]]:
        """Every row's result (None where it failed), and the failures by row index."""
        results: list[Any] = []
        failed: dict[int, str] = {}
        calls = self._calls(rows)
        while len(results) < len(rows):  # each turn adds at least one row
            try:
                results.extend(calls)  # keeps what it got before a row raised
                if len(results) == len(rows):
                    break
                # map() ends early when a row raises StopIteration.
                failed[len(results)] = self._failed(StopIteration(), rows[len(results)][0])
            except Preempted:
                raise
            except SYNC_ERRORS as exc:  # every row runs, whatever the others do
                failed[len(results)] = self._failed(exc, rows[len(results)][0])
            results.append(None)
        return results, failed

    def _single_sync(self, data: Any) -> Outcome:
        try:
            args, kwargs = self.binder.single(data)
            return True, self.fn(*args, **kwargs)
        except Preempted:
            raise
        except SYNC_ERRORS as exc:
            return False, self._failed(exc)

    # -- where a sync call runs -------------------------------------------------

    async def _sync(self, work: Callable[[Any], Any], arg: Any, rows: int,
                    timeout: float | None, may_wait: bool = True) -> Any:
        """`work(arg)` where `framework.inline` places it; `timeout` bounds the wait, if given.
        Without `may_wait`, a cheap call may still run on the loop, but the loop never
        waits for it on a thread."""
        policy = self.policy
        cheap = policy.cheap(rows)
        if cheap and policy.on_loop:
            try:
                return policy.inline(work, arg, rows)
            except Preempted as stop:  # stopped partway: run it again from the start, off the loop
                if not isinstance(stop, LoopInUse):
                    policy.overran(rows)
                cheap = False
                timeout = None if timeout is None else max(timeout - stop.seconds, 0.0)
        if cheap and may_wait:
            wait = policy.wait if timeout is None else min(policy.wait, timeout)
            handoff = self.lane.call(policy.waited, work, arg, rows, wait=wait)
            if handoff.future is None:  # done while the loop waited, within any time limit
                policy.clean()
                return handoff.result()
            if handoff.overran:
                policy.overran(rows)
        else:
            handoff = self.lane.call(policy.timed, work, arg, rows)
        return await (handoff.future if timeout is None else self._limit(handoff.future, timeout))

    async def _limit(self, work: Awaitable[Any], timeout: float) -> Any:
        """`await work`, or CallTimeout after `timeout` seconds.

        What `asyncio.timeout` does, without its bookkeeping: a timer cancels this
        task, and `uncancel` tells that cancellation from any other (a shutdown).
        asyncio.timeout took 22,000 instructions a call, a tenth of a micro-batched
        one-row request; asyncio.wait_for even wraps a coroutine in a task of its own.
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

    async def _one_async(self, args: tuple[Any, ...], kwargs: dict[str, Any], row_id: Any) -> Outcome:
        try:
            return True, await self.fn(*args, **kwargs)
        except USER_ERRORS as exc:
            return False, self._failed(exc, row_id)

    async def _rows_async(self, rows: list[list[Any]]) -> tuple[list[Any], dict[int, str]]:
        calls = []
        for row in rows:
            args, kwargs = self.binder.row(row[1:])
            calls.append(self._one_async(args, kwargs, row[0]))
        return _split(await asyncio.gather(*calls))

    async def _single_async(self, data: Any) -> Outcome:
        args, kwargs = self.binder.single(data)
        return await self._one_async(args, kwargs, None)

    # -- vectorized -------------------------------------------------------------

    def _vector_rows(self, rows: list[list[Any]]) -> tuple[list[list[Any]], dict[int, str]]:
        """Rows as `[id, *every positional argument]`, and the rows that do not fit."""
        width = len(self.signature.parameters) + 1
        if set(map(len, rows)) <= {width}:
            return rows, {}
        good, failed = [], {}
        for index, row in enumerate(rows):
            try:
                args, kwargs = self.binder.row(row[1:])
                bound = self.signature.bind(*args, **kwargs)
                bound.apply_defaults()
                good.append([row[0], *bound.arguments.values()])
            except TypeError as exc:
                failed[index] = self._failed(exc, row[0])
        return good, failed

    async def _vector_call(self, rows: list[list[Any]]) -> Outcome:
        columns = [list(column) for column in zip(*rows)][1:]
        if self.is_async:
            try:
                return self._vector_result(await self.fn(*columns), len(rows))
            except USER_ERRORS as exc:
                return False, self._failed(exc)
        # Requests gather for the next call while one runs, on the loop (their sockets
        # are read after it) or on a thread. The loop waits for a thread only for a
        # large call: waiting on small ones had cancelled micro-batching's gain.
        assert self.batcher is not None
        big = 2 * len(rows) >= self.batcher.max_rows
        # No time limit here: the caller's bounds the whole batch.
        return await self._sync(self._vector_sync, columns, len(rows), None, may_wait=big)

    def _vector_sync(self, columns: list[list[Any]]) -> Outcome:
        n = len(columns[0])
        try:
            return self._vector_result(self.fn(*columns), n)
        except Preempted:
            raise
        except SYNC_ERRORS as exc:
            return False, self._failed(exc)

    def _vector_result(self, out: Any, n: int) -> Outcome:
        if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
            out = out.tolist()  # numpy arrays, pandas series
        if isinstance(out, (list, tuple)) and len(out) == n:
            return True, out
        got = f"{len(out)} results" if isinstance(out, (list, tuple)) else f"a {type(out).__name__}"
        error = (f"TypeError: vectorized deployment {self.label} returned {got} for {n} rows; "
                 "return a list with one result per row, in row order")
        log.error("%s", error)
        return False, error

    async def _vectorized(self, call: Call, timeout: float) -> tuple[list[Any], dict[int, str]]:
        assert self.batcher is not None
        rows = call.rows if call.batch else [[None, *_positional(self.binder.single(call.data))]]
        good, unbound = self._vector_rows(rows)
        results, failed = await self._limit(self.batcher.submit(good), timeout) if good else ([], {})
        if not unbound:
            return results, failed
        # Put the rows that could not be bound back in their places.
        ran = iter(range(len(good)))
        merged, errors = [], {}
        for index in range(len(rows)):
            at = None if index in unbound else next(ran)
            merged.append(None if at is None else results[at])
            if at is None or at in failed:
                errors[index] = unbound[index] if at is None else failed[at]
        return merged, errors

    # -- entry ------------------------------------------------------------------

    async def run(self, call: Call, timeout: float) -> tuple[int, bytes]:
        """Run `call`; returns (status, body) or raises a FrameworkError."""
        if self.batcher is not None:
            results, failed = await self._vectorized(call, timeout)
            if call.batch:
                return 200, self._batch_body(call, results, failed)
            ok, value = (False, failed[0]) if failed else (True, results[0])
        elif call.batch:
            if self.is_async:
                results, failed = await self._limit(self._rows_async(call.rows), timeout)
            else:
                results, failed = await self._sync(self._rows_sync, call.rows, len(call.rows), timeout)
            return 200, self._batch_body(call, results, failed)
        else:
            if self.is_async:
                ok, value = await self._limit(self._single_async(call.data), timeout)
            else:
                ok, value = await self._sync(self._single_sync, call.data, 1, timeout)
        if ok:
            try:
                return 200, encoding.dumps({"data": value})
            except TypeError:
                value = encoding.unencodable(value)
        raise DeploymentFailed(value)

    def _batch_body(self, call: Call, results: list[Any], failed: dict[int, str]) -> bytes:
        ids = call.ids
        if failed:
            data = [(i, v) for n, (i, v) in enumerate(zip(ids, results)) if n not in failed]
            errors = sorted(((ids[n], e) for n, e in failed.items()), key=call.order)
        else:
            data, errors = list(zip(ids, results)), []
        data.sort(key=call.order)  # linear when the ids came in order
        try:
            body = encoding.dumps({"data": data, "errors": errors} if call.partial else {"data": data})
        except TypeError:
            bad = {i: e for i, v in data if (e := encoding.unencodable(v))}
            errors = sorted(errors + list(bad.items()), key=call.order)
            data = [(i, v) for i, v in data if i not in bad]
            body = None
        call.failed = len(errors)
        if errors and not call.partial:
            first_id, first_error = errors[0]
            raise RowsFailed(
                f"{len(errors)} of {len(ids)} rows failed; first failed id "
                f"{first_id!r}:\n{first_error}",
                data,
                errors,
            )
        return body if body is not None else encoding.dumps({"data": data, "errors": errors})


def _split(outcomes: list[Outcome]) -> tuple[list[Any], dict[int, str]]:
    failed = {n: v for n, (ok, v) in enumerate(outcomes) if not ok}
    return [None if n in failed else v for n, (_, v) in enumerate(outcomes)], failed


def _positional(bound: tuple[tuple[Any, ...], dict[str, Any]]) -> list[Any]:
    """A single call's arguments as a row's: keyword arguments travel as one dict."""
    args, kwargs = bound
    return [kwargs] if kwargs else list(args)
