"""A version's threads, and the two ways the event loop hands them a call.

`loop.run_in_executor` pays per call for a `concurrent.futures.Future` (with
its own condition variable) and a `call_soon_threadsafe` that writes to the
loop's self-pipe to wake it. Worse, under load the loop thread and the pool
thread then fight over the GIL at every hop, which tripled p99 latency
against running the call on the loop.

So a `Lane` hands calls over through a `SimpleQueue`, and either:
- waits for a call measured cheap, blocked on a lock for at most `wait`
  seconds: the GIL goes straight to the thread and the answer straight back,
  with no wake-up of the loop. A call that overruns is left to finish on its
  own, so the loop is never held longer than `wait` whatever the call does;
- or returns an asyncio future, resolved from a deque the loop drains in one
  callback: results that finish while a drain is pending ride along with it.

Up to `size` threads run at once, so a call that blocks holds one thread and
the others go on; threads left idle for `IDLE_EXIT_S` exit, which is how an
evicted version gives its threads back.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from queue import Empty, SimpleQueue
from typing import Any, Callable

IDLE_EXIT_S = 30.0


class Handoff:
    """One call handed to a lane: finished (`future` is None) or still running."""

    __slots__ = ("fn", "args", "future", "waiter", "ok", "value", "overran")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.future: asyncio.Future[Any] | None = None  # set when the caller stops waiting
        self.waiter: Any = None  # a held lock the caller waits on, while it waits
        self.ok: bool | None = None  # None until the call has run
        self.value: Any = None
        self.overran = False  # the caller waited the whole time it was given

    def result(self) -> Any:
        if self.ok:
            return self.value
        raise self.value


class Lane:
    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.name = name
        self._calls: SimpleQueue[Handoff | None] = SimpleQueue()
        self._results: deque[Handoff] = deque()
        self._lock = threading.Lock()
        self._threads = 0
        self._waiting = 0  # threads waiting for a call, or about to
        self._drain_pending = False

    def call(self, fn: Callable[..., Any], *args: Any, wait: float = 0.0) -> Handoff:
        """`fn(*args)` on one of the lane's threads, the loop blocked up to `wait` s for it.

        Returns the handoff: `.result()` if it finished within `wait`, else
        `.future` to await. The loop does not wait when no thread is free.
        """
        handoff = Handoff(fn, args)
        loop = asyncio.get_running_loop()
        if wait > 0:
            handoff.waiter = threading.Lock()
            handoff.waiter.acquire()
        else:
            handoff.future = loop.create_future()
        try:
            free = self._submit(handoff)
        except RuntimeError:
            handoff.waiter = None
            handoff.future = handoff.future or loop.create_future()
            handoff.future.cancel()  # never run it: its caller gets the error
            raise
        if handoff.waiter is not None:
            done = free and handoff.waiter.acquire(timeout=wait)
            if not done:
                with self._lock:  # from now on the thread answers through a future
                    if handoff.ok is None:
                        handoff.waiter = None
                        handoff.future = loop.create_future()
                        handoff.overran = free
        return handoff

    def close(self) -> None:
        """Let every thread exit once the calls queued so far are done."""
        for _ in range(self.size):
            self._calls.put(None)

    def _submit(self, handoff: Handoff) -> bool:
        """Queue `handoff`; whether a thread is free to take it at once."""
        self._calls.put(handoff)
        with self._lock:
            if self._calls.qsize() <= self._waiting:
                return True
            number = self._reserve()
        if not number:
            return False  # it queues behind the running calls
        if self._start(number):
            return True
        if self._threads:
            return False
        raise RuntimeError(f"cannot start a thread for {self.name}; the system is out of threads")

    def _reserve(self) -> int:
        """With the lock held: count in one more thread if calls are queued beyond
        the waiting threads and there is room; its number, else 0."""
        if self._calls.qsize() <= self._waiting or self._threads >= self.size:
            return 0
        self._threads += 1
        self._waiting += 1
        return self._threads

    def _start(self, number: int) -> bool:
        try:
            threading.Thread(target=self._work, name=f"{self.name}-{number}", daemon=True).start()
            return True
        except RuntimeError:  # can't start new thread
            with self._lock:
                self._threads -= 1
                self._waiting -= 1
            return False

    def _work(self) -> None:
        while True:
            try:
                handoff = self._calls.get(timeout=IDLE_EXIT_S)
            except Empty:
                with self._lock:
                    if self._calls.empty():  # else a call came in just now
                        self._waiting -= 1
                        self._threads -= 1
                        return
                continue
            if handoff is None:  # closed
                return
            with self._lock:
                self._waiting -= 1
                # A call queued while this thread was taking its own must not wait behind it.
                number = self._reserve()
            if number:
                self._start(number)
            if handoff.future is None or not handoff.future.cancelled():  # else its caller gave up
                try:
                    value, ok = handoff.fn(*handoff.args), True
                except BaseException as exc:  # noqa: BLE001 - handed to the caller, who re-raises
                    value, ok = exc, False
                    if isinstance(exc, StopIteration):  # asyncio refuses it as a future's exception
                        value = RuntimeError(f"{self.name} call raised StopIteration")
                        value.__cause__ = exc
                self._answer(handoff, ok, value)
            with self._lock:
                self._waiting += 1

    def _answer(self, handoff: Handoff, ok: bool, value: Any) -> None:
        with self._lock:
            handoff.ok, handoff.value = ok, value
            if handoff.waiter is not None:
                handoff.waiter.release()
                return
            self._results.append(handoff)
            if self._drain_pending:
                return
            self._drain_pending = True
            assert handoff.future is not None
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
            future = handoff.future
            assert future is not None
            if future.cancelled():
                continue
            if handoff.ok:
                future.set_result(handoff.value)
            else:
                future.set_exception(handoff.value)
