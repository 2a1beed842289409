"""Reading a request body, within `server.max_body_bytes` and `server.body_timeout_seconds`.

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

from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope

from framework.errors import BodyTimeout, PayloadTooLarge


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


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"request body is over the {limit}-byte limit; split the batch into smaller requests"
    )


async def read_body(scope: Scope, receive: Receive, limit: int, deadlines: BodyDeadlines) -> bytes:
    """The whole body, or BodyTimeout once `deadlines` says it is late."""
    # From the ASGI scope and messages directly: Starlette's `Headers` and its
    # `Request.stream()` async generator are a measurable part of a small request's cost.
    length = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    task = asyncio.current_task()
    assert task is not None
    deadlines.watch(task)
    try:
        while True:  # one message per turn, until the last one or a disconnect
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunk if len(chunks) == 1 else b"".join(chunks)
    except asyncio.CancelledError:
        if not deadlines.done(task):
            raise
        task.uncancel()
        raise BodyTimeout(
            f"the request body was not complete after {deadlines.timeout:g} s "
            f"(server.body_timeout_seconds; {size} bytes arrived); send the whole body at once, "
            "or raise the limit for slow links"
        ) from None
    finally:
        deadlines.done(task)
