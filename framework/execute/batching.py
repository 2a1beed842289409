"""Micro-batching for vectorized deployments: concurrent requests, one call.

Requests hand their rows to a version's `Batcher`; one call at a time runs,
and while it runs the next requests queue up. A call takes queued requests
whole, up to `max_rows` rows (a larger request is split into chunks of that
size), after waiting at most `max_wait` seconds for the call to fill up.
Each request gets back its own rows' outcomes. When a call that mixed several
requests fails, every one of them gets that failure: running them again on
their own would run the function twice over the same rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Awaitable, Callable, Iterator, TypeVar

log = logging.getLogger("framework.runtime")
T = TypeVar("T")

Outcome = tuple[bool, Any]  # (True, result) or (False, "ValueError: ...")
# Runs one call over rows `[id, *args]`: (True, one result per row) or (False, error).
CallRows = Callable[[list[list[Any]]], Awaitable[Outcome]]


class _Job:
    __slots__ = ("rows", "future")

    def __init__(self, rows: list[list[Any]], future: asyncio.Future[Outcome]) -> None:
        self.rows = rows
        self.future = future


class Batcher:
    def __init__(self, call: CallRows, *, max_rows: int, max_wait: float) -> None:
        self.call = call
        self.max_rows = max_rows
        self.max_wait = max_wait
        self._queue: deque[_Job] = deque()
        self._queued_rows = 0
        self._full: asyncio.Future[None] | None = None
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, rows: list[list[Any]]) -> tuple[list[Any], dict[int, str]]:
        """Run `rows` in the next calls: results in row order (None where a row
        failed), and the failed rows' errors by index."""
        loop = asyncio.get_running_loop()
        jobs = [_Job(chunk, loop.create_future()) for chunk in chunked(rows, self.max_rows)]
        self._queue.extend(jobs)
        self._queued_rows += len(rows)
        if self._full is not None and not self._full.done() and self._queued_rows >= self.max_rows:
            self._full.set_result(None)
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        results: list[Any] = []
        failed: dict[int, str] = {}
        try:
            for job in jobs:
                ok, value = await job.future
                if not ok:
                    failed.update(dict.fromkeys(range(len(results), len(results) + len(job.rows)), value))
                    value = [None] * len(job.rows)
                results.extend(value)
        except asyncio.CancelledError:
            # A caller that gave up (timeout) leaves its queued rows unrun.
            for job in jobs:
                job.future.cancel()
            raise
        return results, failed

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            if self.max_wait > 0 and self._queued_rows < self.max_rows:
                self._full = loop.create_future()
                timer = loop.call_later(self.max_wait, _resolve, self._full)
                await self._full
                timer.cancel()
                self._full = None
            jobs = self._take()
            if jobs:
                try:
                    await self._run(jobs)
                except Exception as exc:  # noqa: BLE001 - never leave a caller waiting
                    log.error("micro-batch failed", exc_info=exc)
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)

    def _take(self) -> list[_Job]:
        jobs, popped = take(self._queue, self.max_rows, lambda job: len(job.rows),
                            lambda job: not job.future.done())
        self._queued_rows -= popped
        return jobs

    async def _run(self, jobs: list[_Job]) -> None:
        chunks = [job.rows for job in jobs]
        ok, value = await self.call(joined(chunks))
        for job, share in zip(jobs, shares(chunks, ok, value)):
            if not job.future.done():
                job.future.set_result(share)


# How a call is formed and its outcome shared, here and in a worker (`framework.execute.gathering`).

def chunked(rows: list[T], max_rows: int) -> list[list[T]]:
    """A request's rows in chunks of at most `max_rows`, each run whole by one call."""
    return [rows[i:i + max_rows] for i in range(0, len(rows), max_rows)]


def take(queue: deque[T], max_rows: int, size: Callable[[T], int],
         live: Callable[[T], bool] = lambda _: True) -> tuple[list[T], int]:
    """The front of `queue`, whole, up to `max_rows` rows (always at least one): the live
    items taken, and the rows of all it popped. Items no longer live are dropped unrun."""
    taken: list[T] = []
    rows = popped = 0
    while queue and (not taken or rows + size(queue[0]) <= max_rows):
        item = queue.popleft()
        popped += size(item)
        if live(item):
            taken.append(item)
            rows += size(item)
    return taken, popped


def joined(chunks: list[list[Any]]) -> list[Any]:
    """The rows of one call over `chunks`."""
    return chunks[0] if len(chunks) == 1 else [row for chunk in chunks for row in chunk]


def shares(chunks: list[list[Any]], ok: bool, value: Any) -> Iterator[Outcome]:
    """Each chunk's outcome of the call over `joined(chunks)`: its own results, or the
    call's error for all of them."""
    start = 0
    for chunk in chunks:
        yield (True, value[start:start + len(chunk)]) if ok else (False, value)
        start += len(chunk)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
