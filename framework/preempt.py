"""Stopping a call on the event loop that runs past its limit.

Calls measured cheap run on the event loop itself (`framework.inline`): no
thread handoff, the fastest way to answer. A call that turns out slow for
its input would then hold up every other request until it ended, past every
time limit. So a watchdog thread looks every `PERIOD_S` at the call running
on the loop; once one has used more CPU time than its limit, or has run for
`BLOCKED_S` (it waits on something), the watchdog sends the main thread
SIGALRM, whose handler raises `Preempted` inside the call. The runner then
runs the call again, from the start, on the version's threads. Such a call's
function runs twice (the first time cut short), as it does when a client
retries a 504.

CPU time, not wall time: on a busy machine the OS takes the CPU away from
any call now and then, which says nothing about the call. The watchdog needs
the GIL to look, and the loop gives it up only after one switch interval
(5 ms) when a call holds it, so a call is stopped within about its limit,
plus `PERIOD_S`, plus 5 ms.

What it cannot stop, and neither can a thread: C code that holds the GIL
(`sum(range(10**12))`). Code that catches `BaseException` swallows the stop;
the watchdog sends it again every period until the call ends.

Signals reach Python code on the main thread only: the watchdog exists
where the event loop runs there (as under uvicorn) and SIGALRM is free.
Elsewhere `install` returns None and nothing runs on the loop.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable

PERIOD_S = 0.002
BLOCKED_S = 0.02
DOZE_AFTER_S = 1.0  # with no call on the loop for this long, the watchdog sleeps until one starts

_installed: Watchdog | None = None


class Preempted(BaseException):
    """Raised inside a call on the event loop that ran past its limit.

    A BaseException, so that user code's `except Exception` lets it through.
    """


class Watchdog:
    def __init__(self) -> None:
        self.running = False  # a call is running on the loop
        self.started = 0  # calls started: which call is running, and whether the loop is busy
        self.limit = 0.0  # the running call's CPU seconds
        self.cpu0 = 0.0  # the loop thread's CPU time when the running call started
        self._wall0 = 0.0
        self._target = -1  # the call the last signal was sent to stop
        self._dozing = False
        self._wake = threading.Event()
        self._main = threading.main_thread().ident
        self._clock = time.pthread_getcpuclockid(self._main)
        signal.signal(signal.SIGALRM, self._on_signal)
        threading.Thread(target=self._watch, name="framework-watchdog", daemon=True).start()

    def run(self, fn: Callable[[Any], Any], arg: Any, limit: float) -> Any:
        """`fn(arg)` here, on the loop; raises `Preempted` once it uses `limit` CPU seconds."""
        self.started += 1
        self.limit = limit
        self.cpu0 = time.thread_time()
        self._wall0 = time.perf_counter()
        self.running = True
        # After `started` is counted, so that the watchdog either sees the count or is woken.
        if self._dozing:
            self._wake.set()
        try:
            return fn(arg)
        finally:
            self.running = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Runs on the main thread between two bytecodes: the call is checked here, not
        # when the signal was sent, so that a late signal cannot stop the next call.
        if self.running and self.started == self._target:
            raise Preempted()

    def _watch(self) -> None:
        seen, idle_since = -1, time.perf_counter()
        while True:
            time.sleep(PERIOD_S)
            call, now = self.started, time.perf_counter()
            if self.running and (time.clock_gettime(self._clock) - self.cpu0 >= self.limit
                                 or now - self._wall0 >= BLOCKED_S):
                self._target = call
                signal.pthread_kill(self._main, signal.SIGALRM)
            if self.running or self.started != seen:
                seen, idle_since = self.started, now
            elif now - idle_since >= DOZE_AFTER_S:
                self._wake.clear()
                self._dozing = True
                if self.started == seen:  # no call began since the last look
                    self._wake.wait()
                self._dozing = False


def install() -> Watchdog | None:
    """This process's watchdog, started on first use; None where it cannot work."""
    global _installed
    if _installed is None and hasattr(signal, "pthread_kill") and hasattr(time, "pthread_getcpuclockid") and (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)
    ):
        _installed = Watchdog()
    return _installed
