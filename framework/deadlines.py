"""The time limit on receiving a request body (`server.body_timeout_seconds`).

uvicorn bounds no request body's time, so a sender that stalls mid-body would
keep its connection and its buffers for ever. One timer for all the bodies
being read, firing every `tick` seconds, cancels the reads that are past
their deadline, rather than a timer per request: under uvloop arming and
cancelling one costs about as much as the rest of reading a small body.
A read is thus stopped between `timeout` and `timeout + tick` seconds after
it began.
"""

from __future__ import annotations

import asyncio


class BodyDeadlines:
    """The tasks reading a body, each with its deadline, in the order they began."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.tick = max(0.01, min(0.5, timeout / 4))
        self.reading: dict[asyncio.Task[object], float] = {}
        self.expired: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the timer's

    def watch(self, task: asyncio.Task[object]) -> None:
        loop = task.get_loop()
        self.reading[task] = loop.time() + self.timeout
        if self._timer is None or self._loop is not loop:  # none yet, or one on a loop now gone
            self._loop = loop
            self._timer = loop.call_later(self.tick, self._sweep, loop)

    def done(self, task: asyncio.Task[object]) -> bool:
        """Stops watching `task`; True if its read was cancelled for being past its deadline."""
        self.reading.pop(task, None)
        if task in self.expired:
            self.expired.discard(task)
            return True
        return False

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        # All share one timeout, so deadlines grow in the order reads began: stop at the first
        # one still running.
        late = []
        for task, deadline in self.reading.items():
            if deadline > now:
                break
            late.append(task)
        for task in late:
            del self.reading[task]
            self.expired.add(task)
            task.cancel()
        self._timer = loop.call_later(self.tick, self._sweep, loop) if self.reading else None
