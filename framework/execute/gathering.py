"""Micro-batching where the calls run, over requests that came as raw bodies.

A vectorized sync version with no wait for its calls to fill
(`max_wait_ms=0`) and one thread (`concurrency=1`) or one worker process
gets its plain requests' raw bodies, as any isolated version does
(`framework.execute.isolation`). The requests that queued while a call ran
reach its thread together (`framework.execute.threads.Lane`) or its worker
in one message; here they are parsed and gathered into calls as
`framework.execute.batching` gathers them on the event loop: whole requests,
in the order they came, up to `max_batch_rows` rows a call, a larger request
in chunks of that size. The event loop then neither parses nor gathers.

Before a call that holds more than one request runs, a worker says so
with `("group", n)`: the server then knows which requests the call holds,
so a crash or a time limit fails all of them and no other, and none of them
is ever sent again.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

from framework.errors import BadRequest, PayloadTooLarge
from framework.execute.batching import chunked, joined, shares, take
from framework.execute.calls import (
    Calls,
    merge_unbound,
    signature_of,
    vector_answer,
    vector_rows,
    vector_rows_of,
)
from framework.protocol import Call, parse

Send = Callable[[tuple[Any, ...]], None]


def gathers_raw(options: dict[str, Any]) -> bool:
    """Whether a vectorized version's thread or worker gathers raw bodies itself (one of
    them, no wait); with a wait, or several, the server's `Batcher` gathers parsed rows."""
    return (bool(options.get("vectorized")) and options.get("max_wait_ms") == 0
            and options.get("concurrency", 1) == 1)


class _Request:
    """One request of a message: its answer once ready, or its rows still to run."""

    __slots__ = ("ready", "call", "n", "unbound", "results", "failed", "left")

    def __init__(self, ready: tuple[Any, ...] | None = None) -> None:
        self.ready = ready  # the message that answers it, once known
        self.call: Call | None = None
        self.n = 0
        self.unbound: dict[int, str] = {}
        self.results: list[Any] = []
        self.failed: dict[int, str] = {}
        self.left = 0  # its chunks not run yet


class Gatherer:
    def __init__(self, calls: Calls, max_rows: int) -> None:
        self.calls = calls
        self.max_rows = max_rows
        self.signature = signature_of(calls.fn)

    def run(self, items: list[tuple[str, Any, float]], send: Send,
            one: Callable[[str, Any, float], tuple[Any, ...]]) -> None:
        """Answer every `(kind, arg, deadline)` of a message, in order, through `send`;
        `one` answers a call that is not a raw body."""
        waiting: deque[_Request] = deque()  # unanswered, in the message's order
        jobs: deque[tuple[_Request, list[list[Any]]]] = deque()  # chunks still to run
        queued = 0  # rows in `jobs`
        for kind, arg, deadline in items:
            if kind != "body":  # a call of its own: after everything before it
                queued = self._drain(jobs, waiting, send, queued)
                send(one(kind, arg, deadline))
                continue
            request, good = self._prepare(arg, deadline)
            waiting.append(request)
            if request.ready is None:
                chunks = chunked(good, self.max_rows)
                request.left = len(chunks)
                jobs.extend((request, chunk) for chunk in chunks)
                queued += len(good)
            # A call is formed once its rows are known to be all it can take.
            queued = self._drain(jobs, waiting, send, queued, keep=self.max_rows)
        self._drain(jobs, waiting, send, queued)

    def _prepare(self, arg: tuple[bytes, int | None],
                 deadline: float) -> tuple[_Request, list[list[Any]]]:
        """The request of a raw body, and its rows bound to the function."""
        if time.monotonic() >= deadline:  # its caller has given up: never started
            return _Request(("expired",)), []
        body, max_rows = arg
        try:
            call = parse(body, max_rows)
        except (BadRequest, PayloadTooLarge) as exc:  # the server answers them as its own
            return _Request(("done", True, (None, type(exc).__name__, str(exc)))), []
        rows = vector_rows_of(self.calls.binder, call)
        request = _Request()
        request.call = call
        request.n = len(rows)
        good, request.unbound = vector_rows(self.calls.binder, self.signature, self.calls.label, rows)
        if not good:  # no row fits the function: answered without a call
            self._finish(request)
        return request, good

    def _drain(self, jobs: deque[tuple[_Request, list[list[Any]]]], waiting: deque[_Request],
               send: Send, queued: int, keep: int | None = None) -> int:
        """Run calls while at least `keep` rows are queued (all of them, with None); returns
        the rows still queued. Answers what is ready at the front of `waiting`."""
        self._answer(waiting, send)
        while jobs and (keep is None or queued >= keep):
            taken, rows = take(jobs, self.max_rows, lambda job: len(job[1]))
            queued -= rows
            self._call(taken, send)
            self._answer(waiting, send)
        return queued

    def _call(self, taken: list[tuple[_Request, list[list[Any]]]], send: Send) -> None:
        held = list(dict.fromkeys(request for request, _ in taken))
        if len(held) > 1:
            send(("group", len(held)))
        chunks = [chunk for _, chunk in taken]
        ok, value = self.calls.vector(joined(chunks))
        for (request, chunk), (_, share) in zip(taken, shares(chunks, ok, value)):
            if not ok:  # `share` is the call's error
                at = len(request.results)
                request.failed.update(dict.fromkeys(range(at, at + len(chunk)), share))
                share = [None] * len(chunk)
            request.results.extend(share)
            request.left -= 1
            if request.left == 0:
                self._finish(request)

    def _finish(self, request: _Request) -> None:
        assert request.call is not None
        results, failed = merge_unbound(request.n, request.unbound, request.results, request.failed)
        call = request.call
        answer = vector_answer(call, results, failed)
        request.ready = ("done", True, (answer, call.batch, len(call.ids) if call.batch else 1))

    @staticmethod
    def _answer(waiting: deque[_Request], send: Send) -> None:
        while waiting and waiting[0].ready is not None:
            send(waiting.popleft().ready)
