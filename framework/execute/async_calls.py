"""An `async def` deployment in a worker process (`isolation="process"`).

The worker keeps one event loop for the life of the version and runs each
request on it as the server's event loop runs it (`Runner._async_answer`):
a batch's rows concurrently, each once, their failures their own. A new
loop per call (`asyncio.run`) cost about a third of a millisecond a row,
ran a batch's rows one after the other, and lost whatever a call had left
on its loop (a client session, a background task).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from framework.execute.calls import Calls, Failures, Outcome, columns, vector_result

# The worker's own loop: a deployment's error of any kind is that row's failure, as on a thread.
ERRORS = BaseException


class AsyncCalls(Calls):
    """`Calls` over a coroutine function, run to completion on one loop of its own."""

    def __init__(self, fn: Callable[..., Any], label: str) -> None:
        super().__init__(fn, label)
        self.loop = asyncio.new_event_loop()

    async def _one(self, args: tuple[Any, ...], kwargs: dict[str, Any], row_id: Any,
                   failures: Failures) -> Outcome:
        try:
            return True, await self.fn(*args, **kwargs)
        except ERRORS as exc:
            return False, failures.add(exc, row_id)

    async def _every(self, rows: list[list[Any]], failures: Failures) -> list[Outcome]:
        return await asyncio.gather(*(self._one(*self.binder.row(row[1:]), row[0], failures)
                                      for row in rows))

    def rows(self, rows: list[list[Any]]) -> tuple[list[Any], dict[int, str]]:
        failures = Failures(self.label)
        outcomes = self.loop.run_until_complete(self._every(rows, failures))
        failures.log(len(rows))
        failed = {n: v for n, (ok, v) in enumerate(outcomes) if not ok}
        return [None if n in failed else v for n, (_, v) in enumerate(outcomes)], failed

    def single(self, data: Any) -> Outcome:
        failures = Failures(self.label)
        outcome = self.loop.run_until_complete(self._one(*self.binder.single(data), None, failures))
        failures.log(1)
        return outcome

    def vector(self, rows: list[list[Any]]) -> Outcome:
        failures = Failures(self.label)
        ok, value = self.loop.run_until_complete(self._one(tuple(columns(rows)), {}, None, failures))
        failures.log(len(rows))
        return vector_result(self.label, value, len(rows)) if ok else (False, value)
