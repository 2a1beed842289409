"""Running a parsed call against one loaded version.

Where a call runs:
- `async def` functions are awaited on the event loop.
- Sync functions run on a thread pool owned by the version, a whole batch in
  one hop: a deployment that blocks uses up only its own threads, and time
  limits still fire. A hop costs about 0.1 ms, more than a small function, so
  once a version's calls have been timed on its pool and found cheap (CPU
  time under `inline_budget` per call, and some calls that hardly waited),
  calls expected to fit that budget run inline on the event loop. An inline
  call that overruns it, or waits (sleep, I/O), sends its version back to the
  pool until it is measured cheap again; the third overrun keeps it there.
- Vectorized functions (`@deployment(vectorized=True)`) get every row of a
  call at once, one list per parameter; concurrent requests are gathered into
  such calls by `framework.batching.Batcher`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import starmap
from operator import itemgetter
from typing import Any, Callable, Iterator

from framework import encoding
from framework.batching import Batcher, Outcome
from framework.errors import CallTimeout, DeploymentFailed, RowsFailed
from framework.packaging import Loaded
from framework.protocol import Binder, Call, error_text, sort_key

log = logging.getLogger("framework.runtime")

WARMUP_CALLS = 3  # calls timed on the pool before any runs inline
# A pooled call's wall time minus its CPU time is what it waited: for the GIL
# (a few ms under load), or on sleep and I/O. Calls that all wait longer block.
WAIT_LIMIT_S = 0.02
MAX_OVERRUNS = 3  # inline calls over budget before a version stays on its pool
# Voluntary context switches tell a call that waited (sleep, I/O, locks) from one
# the OS preempted; without per-thread counts, any wait counts as blocking.
_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)


def _switches() -> int:
    return resource.getrusage(_RUSAGE_THREAD).ru_nvcsw if _RUSAGE_THREAD is not None else 0


# What a deployment may raise and still get an answer: SystemExit and
# KeyboardInterrupt from user code are its failures, not the server's. Not
# BaseException, so asyncio's CancelledError still ends timed-out calls.
USER_ERRORS = (Exception, SystemExit, KeyboardInterrupt)
_ARG = itemgetter(1)
_ARGS = itemgetter(slice(1, None))


class Runner:
    def __init__(self, loaded: Loaded, *, threads: int, inline_budget: float = 0.001) -> None:
        m = loaded.manifest
        self.fn = loaded.fn
        self.manifest = m
        self.label = f"{m['name']} v{m['version']} ({m['branch']})"
        self.binder = Binder(self.fn)
        self.is_async = inspect.iscoroutinefunction(self.fn)
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix=f"{m['name']}-v{m['version']}")
        self.inline_budget = inline_budget
        # CPU seconds per row, a cautious estimate (rises at once, falls slowly);
        # infinite once the version is known to block.
        self.row_cost = math.inf if inline_budget <= 0 else 0.0
        self.timed_calls = 0
        self.pool_wait = math.inf  # a decaying minimum of what pooled calls waited
        self.overruns = 0
        options = m.get("options") or {}
        self.batcher: Batcher | None = None
        if options.get("vectorized"):
            self.signature = inspect.signature(self.fn)
            self.batcher = Batcher(self._vector_call, max_rows=options["max_batch_rows"],
                                   max_wait=options["max_wait_ms"] / 1000)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _failed(self, exc: BaseException, row_id: Any = None) -> str:
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
            except USER_ERRORS as exc:  # every row runs, whatever the others do
                failed[len(results)] = self._failed(exc, rows[len(results)][0])
            results.append(None)
        return results, failed

    def _single_sync(self, data: Any) -> Outcome:
        try:
            args, kwargs = self.binder.single(data)
            return True, self.fn(*args, **kwargs)
        except USER_ERRORS as exc:
            return False, self._failed(exc)

    # -- where a sync call runs -------------------------------------------------

    def _timed(self, work: Callable[[Any], Any], arg: Any, rows: int, inline: bool) -> Any:
        switches = _switches() if inline else 0
        wall, cpu = time.perf_counter(), time.thread_time()
        out = work(arg)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        per_row = cpu / max(rows, 1)
        cost = self.row_cost
        self.row_cost = per_row if per_row > cost else 0.9 * cost + 0.1 * per_row
        self.timed_calls += 1
        waited = wall - cpu
        if inline and (cpu > 4 * self.inline_budget or (
                waited > self.inline_budget
                and (_RUSAGE_THREAD is None or _switches() != switches))):
            # Costlier than measured, or blocking: a strike, and back to the pool.
            self.overruns += 1
            self.row_cost = max(self.row_cost, wall / max(rows, 1))
            log.warning("%s took %.1f ms on the event loop; running it on its threads%s",
                        self.label, wall * 1e3,
                        " from now on" if self.overruns >= MAX_OVERRUNS else " for a while")
        elif not inline:
            self.pool_wait = min(waited, (self.pool_wait + waited) / 2)
        if self.overruns >= MAX_OVERRUNS:
            self.row_cost = math.inf
        return out

    def _cheap(self, rows: int) -> bool:
        return (self.timed_calls >= WARMUP_CALLS and self.pool_wait <= WAIT_LIMIT_S
                and rows * self.row_cost <= self.inline_budget)

    async def _sync(self, work: Callable[[Any], Any], arg: Any, rows: int, timeout: float) -> Any:
        if self._cheap(rows):
            return self._timed(work, arg, rows, True)
        pooled = asyncio.get_running_loop().run_in_executor(
            self.executor, self._timed, work, arg, rows, False)
        return await self._limit(pooled, timeout)

    async def _limit(self, work: Any, timeout: float) -> Any:
        try:
            return await asyncio.wait_for(work, timeout)
        except asyncio.TimeoutError:
            raise CallTimeout(
                f"{self.label} did not answer within {timeout:g} s; send a larger "
                '"timeout_seconds" or a smaller batch'
            ) from None

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
        n = len(rows)
        if self._cheap(n):
            return self._timed(self._vector_sync, columns, n, True)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._timed, self._vector_sync, columns, n, False)

    def _vector_sync(self, columns: list[list[Any]]) -> Outcome:
        n = len(columns[0])
        try:
            return self._vector_result(self.fn(*columns), n)
        except USER_ERRORS as exc:
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
        elif self.is_async:
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
            bad = {i for i, v in data if encoding.unencodable(v)}
            errors = sorted(
                errors + [(i, encoding.unencodable(v)) for i, v in data if i in bad],
                key=lambda e: sort_key(e[0]),
            )
            data = [(i, v) for i, v in data if i not in bad]
            body = None
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
