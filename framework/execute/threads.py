"""A version's threads: at most `size` of them call its function at once.

`size` is the deployment's `concurrency` (1 by default), so a model object
that is not thread-safe is never called from two threads at once. Calls
reach the threads through a `SimpleQueue`; answers come back through a
deque that the event loop drains in one callback, so every call that
finishes while a drain is pending is answered in the same wake-up of the
loop. That keeps concurrency 1 fast under many connections: the calls that
queued while one ran are taken in turn by the same thread, with no thread
switch and one loop wake-up for all of them.

A lane given a `Gatherer` (a vectorized version with no wait, one thread)
takes every call queued when its thread comes for one, raw bodies mostly,
and lets the gatherer parse them and form micro-batches on the thread, as a
worker process does (`framework.execute.gathering`): the event loop then
only reads bodies and writes answers.

A call whose caller gave up (time limit, disconnect) before it started is
never run. Threads left idle for `IDLE_EXIT_S` exit; a closed lane's threads
exit as soon as its queue is empty, which is how an evicted version gives
its threads back.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from queue import Empty, SimpleQueue
from typing import Any, Callable, Protocol

IDLE_EXIT_S = 30.0
CLOSED_IDLE_S = 0.05


class Gathers(Protocol):
    """`framework.execute.gathering.Gatherer`, as a lane calls it."""

    def run(self, items: Any, send: Callable[[tuple[Any, ...]], None],
            one: Callable[[str, Any, float], tuple[Any, ...]]) -> None: ...


class _Handoff:
    __slots__ = ("kind", "arg", "deadline", "future", "ok", "value")

    def __init__(self, kind: str, arg: Any, deadline: float, future: asyncio.Future[Any]) -> None:
        self.kind = kind
        self.arg = arg
        self.deadline = deadline
        self.future = future
        self.ok = False
        self.value: Any = None


def settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    """Give `future` its result (`ok`) or exception, unless its caller gave up meanwhile."""
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class Answers:
    """Hands finished calls back to the event loop, many in one wake-up."""

    def __init__(self) -> None:
        self._results: deque[_Handoff] = deque()
        self._lock = threading.Lock()
        self._drain_pending = False

    def _answer(self, handoff: _Handoff) -> None:
        with self._lock:
            self._results.append(handoff)
            if self._drain_pending:
                return  # rides along with the drain already asked for
            self._drain_pending = True
            loop = handoff.future.get_loop()
        try:
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            with self._lock:
                self._drain_pending = False
                self._results.clear()

    def _drain(self) -> None:
        with self._lock:
            self._drain_pending = False
            done = list(self._results)
            self._results.clear()
        for handoff in done:
            settle(handoff.future, handoff.ok, handoff.value)


class Lane(Answers):
    """Runs `getattr(target, kind)(arg)` on up to `size` threads of its own."""

    def __init__(self, size: int, name: str, target: Any, gatherer: Gathers | None = None) -> None:
        super().__init__()
        self.size = size
        self.name = name
        self.target = target
        self.gatherer = gatherer
        self.closed = False
        self._calls: SimpleQueue[_Handoff | None] = SimpleQueue()
        self._queued = 0  # calls in the queue (not the wake-ups of close())
        self._threads = 0
        self._idle = 0  # threads waiting for a call, or about to

    def submit(self, kind: str, arg: Any, deadline: float) -> asyncio.Future[Any]:
        """The future of `target.<kind>(arg)`, run unless it is past `deadline` (monotonic)
        or cancelled before a thread takes it."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            self._calls.put(_Handoff(kind, arg, deadline, future))
            self._queued += 1
            number = self._reserve()
        if number:
            self._start(number)
        return future

    def close(self) -> None:
        """Let the threads exit once the calls queued so far are done."""
        self.closed = True
        for _ in range(self.size):
            self._calls.put(None)

    @property
    def threads(self) -> int:
        return self._threads

    def _reserve(self) -> int:
        """With the lock held: count in one more thread if calls are queued beyond the
        idle threads and there is room; its number, else 0."""
        if self._queued <= self._idle or self._threads >= self.size:
            return 0
        self._threads += 1
        self._idle += 1
        return self._threads

    def _start(self, number: int) -> None:
        try:
            threading.Thread(target=self._work, name=f"{self.name}-{number}", daemon=True).start()
        except RuntimeError as exc:  # can't start new thread: fail what waits, if nobody will run it
            with self._lock:
                self._threads -= 1
                self._idle -= 1
                orphaned = self._threads == 0
            if orphaned:
                self._fail_queued(RuntimeError(f"cannot start a thread for {self.name}: {exc}"))

    def _fail_queued(self, exc: BaseException) -> None:
        while True:
            try:
                handoff = self._calls.get_nowait()
            except Empty:
                return
            if handoff is not None:
                with self._lock:
                    self._queued -= 1
                handoff.value = exc
                self._answer(handoff)

    def _work(self) -> None:
        while True:
            try:
                handoff = self._calls.get(timeout=CLOSED_IDLE_S if self.closed else IDLE_EXIT_S)
            except Empty:
                handoff = None
            if handoff is None:  # idle, or woken by close(): exit unless calls came in meanwhile
                with self._lock:
                    if self._queued == 0:
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            with self._lock:
                self._queued -= 1
                self._idle -= 1
                # A call queued while this thread took its own must not wait behind it.
                number = self._reserve()
            if number:
                self._start(number)
            if self.gatherer is None:
                self._run(handoff)
            else:
                self._gather([handoff, *self._more()])
            with self._lock:
                self._idle += 1

    def _more(self) -> list[_Handoff]:
        """Every call queued behind the one taken, up to a wake-up of close()."""
        more: list[_Handoff] = []
        while True:
            try:
                handoff = self._calls.get_nowait()
            except Empty:
                return more
            if handoff is None:  # close(): left for the loop in _work to see
                self._calls.put(None)
                return more
            with self._lock:
                self._queued -= 1
            more.append(handoff)

    def _gather(self, taken: list[_Handoff]) -> None:
        """`taken` through the gatherer, which answers them in order (`worker` messages)."""
        pending = iter(taken)

        def send(message: tuple[Any, ...]) -> None:
            if message[0] == "group":  # which calls one micro-batch holds: a worker's concern
                return
            handoff = next(pending)
            if message[0] == "done":  # else "expired": its caller has given up
                _, handoff.ok, handoff.value = message
                self._answer(handoff)

        def one(kind: str, arg: Any, deadline: float) -> tuple[Any, ...]:
            if time.monotonic() >= deadline:
                return ("expired",)
            return ("done", *self._call(kind, arg))

        # Read as the gatherer reaches each one: a caller may give up meanwhile.
        items = ((h.kind, h.arg, -1.0 if h.future.cancelled() else h.deadline) for h in taken)
        try:
            self.gatherer.run(items, send, one)  # type: ignore[union-attr]
        except BaseException as exc:  # noqa: BLE001 - ours, not the user's: fail what waits, once
            for handoff in pending:
                handoff.value = exc
                self._answer(handoff)

    def _run(self, handoff: _Handoff) -> None:
        if handoff.future.cancelled() or time.monotonic() >= handoff.deadline:
            return  # its caller has given up, or will have by the time it could answer
        handoff.ok, handoff.value = self._call(handoff.kind, handoff.arg)
        self._answer(handoff)

    def _call(self, kind: str, arg: Any) -> tuple[bool, Any]:
        """(True, `target.<kind>(arg)`), or (False, what it raised)."""
        try:
            return True, getattr(self.target, kind)(arg)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who re-raises
            if isinstance(exc, StopIteration):  # asyncio refuses it as a future's exception
                error = RuntimeError(f"{self.name} call raised StopIteration")
                error.__cause__ = exc
                return False, error
            return False, exc
