"""Where a sync call runs: on the event loop itself, or on its version's threads.

Every version's first calls run on its threads, timed. Once its calls have
been found cheap (CPU time under `budget` per call, calls that hardly
waited), calls expected to fit that budget run on the event loop itself:
the fastest way to answer, since handing a call to a thread and back costs
more than a cheap call. A call there that uses more than `wait` of CPU time
(twice the budget) is stopped by the watchdog (`framework.preempt`), run
again on the threads, and counts as a strike. Other calls go to the threads
and the loop moves on at once.

Where no watchdog can run (the loop is not on the main thread), or with
`server.inline_budget_ms: 0`, calls measured cheap go to a thread while the
loop waits for them, blocked for at most `wait`: no second wake-up, yet a
call that turns out slow costs the loop no more than the wait, then finishes
on its own under its time limit. A waited call that overruns is a strike.

A struck version goes back to its threads until measured cheap again; the
`MAX_OVERRUNS`th strike within `OVERRUN_WINDOW` calls keeps it there for the
next `BAR_CALLS` calls, and each later time for twice as many: a version
whose calls block now and then costs the loop a few stalls at most, and one
struck by a passing load (other threads hogging the GIL) comes back.

Only waits the thread chose count (voluntary context switches): under load
the OS takes the CPU away from any call, which says nothing about the
function. Nor does a call's wait for the GIL while the event loop ran (the
loop's CPU time meanwhile is taken off the wait). Other Python threads can
also hold the GIL now and then; the window forgives such rare strikes, where
counting them for the server's whole life eventually sent even a doubler to
its threads for good. Without per-thread counts (not Linux), any wait counts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import threading
import time
from typing import Any, Callable

from framework.config import SERVER_DEFAULTS
from framework.preempt import Preempted, Watchdog

log = logging.getLogger("framework.runtime")

# The budget of a deployment declared `@deployment(inline=True)` on a server
# whose own `inline_budget_ms` is 0.
DECLARED_BUDGET = 0.001
DEFAULT_WAIT_BUDGET = SERVER_DEFAULTS["wait_budget_ms"] / 1000
# How long the loop waits, at most, for a call expected to take `budget`: room
# for an estimate a little low, and still a fraction of a small request's latency.
WAIT_FACTOR = 2.0
WARMUP_CALLS = 3  # calls timed on the pool before any runs inline
# Pooled calls that all waited longer than this block (sleep, I/O, locks).
WAIT_LIMIT_S = 0.02
MAX_OVERRUNS = 3  # calls over budget, within the window, before a version stays on its threads
OVERRUN_WINDOW = 1000  # calls within budget after which past overruns are forgiven
BAR_CALLS = 10_000  # calls a version then makes on its threads (doubling each time) before trying again
_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)


def _usage() -> tuple[float, int]:
    """This thread's CPU seconds and voluntary context switches so far.

    CPU time from `thread_time`: getrusage's user and system times are split
    from sampled ticks and can be off by milliseconds between two calls.
    """
    switches = resource.getrusage(_RUSAGE_THREAD).ru_nvcsw if _RUSAGE_THREAD is not None else 0
    return time.thread_time(), switches


class LoopInUse(Preempted):
    """A call on the event loop raised RuntimeError, as `asyncio.run` does there since an
    event loop is running: it runs again on the version's threads, and the version's
    later calls on the loop run with no event loop running, as on a thread."""


class InlinePolicy:
    """One version's cost estimate, and the decision it drives."""

    def __init__(self, label: str, inline_budget: float, wait_budget: float,
                 watchdog: Watchdog | None = None) -> None:
        """Calls measured cheap run on the event loop itself if `inline_budget` > 0 and
        a watchdog can stop them, else on a thread with the loop waiting, if `wait_budget` > 0."""
        self.label = label
        self.watchdog = watchdog if inline_budget > 0 else None
        self.on_loop = self.watchdog is not None
        self.budget = inline_budget if self.on_loop else wait_budget
        self.wait = WAIT_FACTOR * self.budget
        # CPU seconds per row by call size (`rows.bit_length()`), a cautious estimate
        # (rises at once, falls slowly). Per size: a row of a small call carries more
        # of the call's own cost than one of a large call, so one estimate for every
        # size kept large batches of a cheap function off the loop.
        self.row_costs: dict[int, float] = {}
        # Nothing is cheap before this many timed calls: never without a budget.
        self.gate = WARMUP_CALLS if self.budget > 0 else math.inf
        self.wait_limit = min(WAIT_LIMIT_S, self.budget)  # what pooled calls may wait, and be cheap
        self.bars = 0
        self.timed_calls = 0
        self.pool_wait = math.inf  # a decaying minimum of what pooled calls waited
        self.overruns = 0
        self.clean_calls = 0  # calls within budget since the last overrun
        # Calls on the loop run with no event loop running (`LoopInUse`). Not from the
        # start: unsetting and setting it again are three system calls (getpid) per
        # call, 2-3% of single-row throughput, for the rare function that needs it.
        self.loopless = False

    def cheap(self, rows: int) -> bool:
        """Whether a call of `rows` rows may run inline, or with the loop waiting for it."""
        if self.timed_calls < self.gate or self.pool_wait > self.wait_limit:
            return False
        size = rows.bit_length()
        cost = self.row_costs.get(size)
        if cost is None:  # a size not seen yet: rows of a smaller call cost at least as much
            cost = max(((s, c) for s, c in self.row_costs.items() if s < size), default=(0, math.inf))[1]
        return rows * cost <= self.budget

    def _learn(self, seconds: float, rows: int) -> None:
        if rows == 0:  # an empty batch says nothing of what a row costs
            return
        per_row, size = seconds / rows, rows.bit_length()
        cost = self.row_costs.get(size, 0.0)
        self.row_costs[size] = per_row if per_row > cost else 0.9 * cost + 0.1 * per_row
        self.timed_calls += 1

    def waited(self, work: Callable[[Any], Any], arg: Any, rows: int) -> Any:
        """`work(arg)` on a thread while the loop waits: its wall time is all that
        counts (the loop waits through CPU and I/O alike), and the loop waits on
        the CPU-time syscalls `timed` makes."""
        wall = time.perf_counter()
        out = work(arg)
        self._learn(time.perf_counter() - wall, rows)
        return out

    def timed(self, work: Callable[[Any], Any], arg: Any, rows: int) -> Any:
        """`work(arg)` timed, on one of the version's threads."""
        cpu, switches = _usage()
        loop_cpu = self.watchdog.loop_cpu() if self.watchdog is not None else 0.0
        wall = time.perf_counter()
        out = work(arg)
        wall = time.perf_counter() - wall
        end_cpu, end_switches = _usage()
        cpu = end_cpu - cpu
        self._learn(cpu, rows)
        waited = wall - cpu if end_switches != switches or _RUSAGE_THREAD is None else 0.0
        if waited > 0 and self.watchdog is not None:
            # Not counted: waiting for the GIL while the event loop ran. Under load a
            # function that releases it (each numpy operation does) waits for it at each
            # release, and such waits had kept numpy models on their threads for good.
            waited = max(0.0, waited - (self.watchdog.loop_cpu() - loop_cpu))
        self.pool_wait = min(waited, (self.pool_wait + waited) / 2)
        return out

    def inline(self, work: Callable[[Any], Any], arg: Any, rows: int) -> Any:
        """`work(arg)` on the event loop; raises `Preempted` if it uses more than the wait."""
        assert self.watchdog is not None
        out = (self._loopless if self.loopless else self.watchdog.run)(work, arg, self.wait)
        wall = time.perf_counter() - self.watchdog.wall0
        if wall <= self.budget:
            # Only counted: the estimate that put the call here stands (it falls on the
            # threads), and learning it again cost 4% of a one-row request's instructions.
            self.clean()
            return out
        # Over budget: the CPU time is the call's cost, the rest it waited, on I/O or a
        # lock inside library code the watchdog does not stop, or for the CPU. Counted
        # high where the watchdog did not see all of it: such a call leaves the loop.
        cpu = self.watchdog.cpu_spent()
        self._learn(cpu, rows)
        waited = wall - cpu
        if waited > self.budget:  # measured on the threads again before it comes back
            self.pool_wait = waited
        if waited > self.wait:
            self._strike(wall, rows, f"waited {waited * 1e3:.0f} ms on the event loop")
        else:
            self.clean()
        return out

    def _loopless(self, work: Callable[[Any], Any], arg: Any, wait: float) -> Any:
        """As on a thread, no event loop is running for the call: `asyncio.run` in a sync
        function (a wrapped async client) works the same wherever it runs."""
        assert self.watchdog is not None
        loop = asyncio._get_running_loop()
        asyncio._set_running_loop(None)
        try:
            return self.watchdog.run(work, arg, wait)
        finally:
            asyncio._set_running_loop(loop)

    def failed(self, exc: BaseException) -> None:
        """Raises LoopInUse where `exc`, a RuntimeError from this version's call running
        on the event loop, may come from the event loop running there."""
        wd = self.watchdog
        if (isinstance(exc, RuntimeError) and not self.loopless and wd is not None and wd.running
                and threading.get_ident() == wd.main):
            self.loopless = True
            log.info("%s raised RuntimeError on the event loop; running it again on its threads, "
                     "and its later calls there with no event loop running", self.label)
            raise LoopInUse(time.perf_counter() - wd.wall0) from exc

    def clean(self) -> None:
        """A call ran inline, or was waited for, within its budget."""
        self.clean_calls += 1

    def overran(self, rows: int) -> None:
        """A call the loop waited for was not done within the wait, or one on the loop was stopped."""
        self._strike(self.wait, rows, f"was stopped on the event loop, past its {self.wait * 1e3:g} ms"
                     if self.on_loop else f"ran past the {self.wait * 1e3:g} ms the event loop waits")

    def _strike(self, wall: float, rows: int, what: str) -> None:
        """Not cheap for a while; the `MAX_OVERRUNS`th strike in a window, for a long while."""
        if self.clean_calls >= OVERRUN_WINDOW:  # the earlier strikes are forgiven
            self.overruns = 0
        self.overruns += 1
        self.clean_calls = 0
        size = max(rows, 1).bit_length()
        self.row_costs[size] = max(self.row_costs.get(size, 0.0), wall / max(rows, 1))
        until = "until it is measured cheap again"
        if self.overruns >= MAX_OVERRUNS:
            calls = BAR_CALLS << self.bars
            self.gate = self.timed_calls + calls
            self.bars += 1
            self.overruns = 0
            until = f"for its next {calls:,} calls"
        log.warning("%s %s; running it on its threads without waiting, %s", self.label, what, until)
