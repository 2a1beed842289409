"""Stopping a call on the event loop that runs past its limit.

Calls measured cheap run on the event loop itself (`framework.inline`): no
thread handoff, the fastest way to answer. A call that turns out slow for
its input would then hold up every other request until it ended, past every
time limit. So a watchdog thread looks every `PERIOD_S` at the call running
on the loop; once one has used more CPU time than its limit since the
watchdog first saw it, or has run for `BLOCKED_S` (it waits on something),
the watchdog sends the main thread
SIGALRM, whose handler raises `Preempted` inside the call. The runner then
runs the call again, from the start, on the version's threads. Such a call's
function runs twice (the first time cut short), as it does when a client
retries a 504.

A stop lands only in the deployment's own code: between two of its
bytecodes, in a sleep it calls, or in a C function it calls that checks for
signals (as on Ctrl-C). Never in the standard library, an installed package
or this framework, where it could leave a lock taken (`logging` takes its
handler's lock just before its `try`) or their state half-changed: while
the call is in such code the signal does nothing, and the watchdog sends it
again every period. System calls the signal arrives in are resumed rather
than failed (a socket write is not left half done). Code of the
deployment's own that takes a lock outside a `with` block, or keeps state
across calls, can still be cut short between two statements.

CPU time, not wall time: on a busy machine the OS takes the CPU away from
any call now and then, which says nothing about the call. The watchdog reads
the loop thread's CPU clock itself, from the first look that finds a call
running: reading it at the start of every call was a system call per
request, 3% of single-row throughput. The watchdog needs the GIL to look,
and the loop gives it up only after one switch interval (5 ms) when a call
holds it, so a call is stopped within about its limit plus two `PERIOD_S`,
plus 5 ms, and at the latest after `BLOCKED_S` plus 5 ms.

What it cannot stop, and neither can a thread: C code that holds the GIL
(`sum(range(10**12))`). Nor a call that waits or computes inside library
code (a database driver, `requests`, one long numpy operation), or catches
`BaseException` and goes on: the loop waits for those to end, and
`framework.inline` then sends the version back to its threads.

Signals reach Python code on the main thread only: the watchdog exists
where the event loop runs there (as under uvicorn) and SIGALRM is free.
Elsewhere `install` returns None and nothing runs on the loop.
"""

from __future__ import annotations

import os
import signal
import site
import sysconfig
import threading
import time
from types import FrameType
from typing import Any, Callable

PERIOD_S = 0.01  # each look takes the GIL from the loop: looking every 2 ms cost 2-4% of throughput
BLOCKED_S = 0.02  # a call on the loop this long, whatever its CPU time, waits on something
DOZE_AFTER_S = 1.0  # with no call on the loop for this long, the watchdog sleeps until one starts

# Where a stop never lands: the standard library, installed packages, this framework.
_LIBRARIES = tuple(os.path.join(path, "") for path in
                   {sysconfig.get_path(p) for p in ("stdlib", "platstdlib", "purelib", "platlib")}
                   | {*site.getsitepackages(), site.getusersitepackages(), os.path.dirname(__file__)})

_installed: Watchdog | None = None


class Preempted(BaseException):
    """Raised inside a call on the event loop that ran past its limit.

    A BaseException, so that user code's `except Exception` lets it through.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds  # how long the call had run


class Watchdog:
    def __init__(self) -> None:
        self.running = False  # a call is running on the loop
        self.started = 0  # calls started: which call is running, and whether the loop is busy
        self.limit = 0.0  # the running call's CPU seconds
        self.wall0 = 0.0  # perf_counter() when the running call started
        # The call the watchdog last found running, first found at this perf_counter()
        # and loop thread CPU time.
        self.sighted = (0, 0.0, 0.0)
        self._target = -1  # the call the last signal was sent to stop
        self._dozing = False
        self._wake = threading.Event()
        self.main = threading.main_thread().ident  # the thread the loop, and its calls, run on
        self._clock = time.pthread_getcpuclockid(self.main)
        signal.signal(signal.SIGALRM, self._on_signal)
        # System calls the signal arrives in are resumed, not failed with EINTR: C code
        # that does not retry, and a socket write half done, stay whole.
        signal.siginterrupt(signal.SIGALRM, False)
        threading.Thread(target=self._watch, name="framework-watchdog", daemon=True).start()

    def run(self, fn: Callable[[Any], Any], arg: Any, limit: float) -> Any:
        """`fn(arg)` here, on the loop; raises `Preempted` once it uses `limit` CPU seconds
        (counted from the watchdog's first look at it) or runs `BLOCKED_S`."""
        self.started += 1
        # After `started` is counted, so that the watchdog either sees the count or is woken.
        if self._dozing:
            self._wake.set()
        self.limit = limit
        self.wall0 = time.perf_counter()
        try:
            self.running = True
            return fn(arg)
        finally:
            self.running = False

    def loop_cpu(self) -> float:
        """The CPU seconds the event loop's thread has used so far, read from any thread."""
        return time.clock_gettime(self._clock)

    def cpu_spent(self) -> float:
        """On the loop's thread, after a call: no less than the CPU seconds it used. Its
        CPU time since the watchdog first found it running, and all of its time before
        that; its wall time where the watchdog never saw it."""
        wall = time.perf_counter() - self.wall0
        call, seen_at, cpu = self.sighted
        if call != self.started:
            return wall
        return min(wall, seen_at - self.wall0 + time.thread_time() - cpu)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs on the main thread between two bytecodes: the call is checked here, not
        # when the signal was sent, so that a late signal cannot stop the next call.
        if self.running and self.started == self._target and frame is not None and _stoppable(frame):
            raise Preempted(time.perf_counter() - self.wall0)

    def _watch(self) -> None:
        seen, idle_since = -1, time.perf_counter()
        while True:
            time.sleep(PERIOD_S)
            call, now, running = self.started, time.perf_counter(), self.running
            if running:
                cpu = self.loop_cpu()
                if self.sighted[0] != call:
                    self.sighted = (call, now, cpu)
                if cpu - self.sighted[2] >= self.limit or now - self.wall0 >= BLOCKED_S:
                    self._target = call
                    if signal.getsignal(signal.SIGALRM) == self._on_signal:  # not replaced by user code
                        signal.pthread_kill(self.main, signal.SIGALRM)
            if running or self.started != seen:
                seen, idle_since = self.started, now
            elif now - idle_since >= DOZE_AFTER_S:
                self._wake.clear()
                self._dozing = True
                if self.started == seen:  # no call began since the last look
                    self._wake.wait()
                self._dozing = False


def _stoppable(frame: FrameType) -> bool:
    """Whether `frame` runs the deployment's own code, where a stop may land."""
    name = frame.f_code.co_filename
    return not name.startswith(_LIBRARIES) and not name.startswith("<frozen ")


def install() -> Watchdog | None:
    """This process's watchdog, started on first use, for a loop on this thread;
    None where it cannot work."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return None  # the signal would stop the main thread, not this loop's call
    if _installed is None and hasattr(signal, "pthread_kill") and hasattr(time, "pthread_getcpuclockid") and (
        signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)
    ):
        _installed = Watchdog()
    return _installed
