"""Where a sync call runs: on its version's threads, with or without the loop waiting for it.

Every sync call is timed on the thread that runs it. Once a version's calls
have been found cheap (CPU time under `budget` per call, calls that hardly
waited), calls expected to fit that budget are handed to a thread while the
event loop waits for them, blocked for at most `wait` seconds: nearly as fast
as running them on the loop, with no second wake-up, yet a call that turns
out slow (whatever its input) costs the loop no more than `wait`, then
finishes on its own under its time limit. Such calls are timed by their wall
time alone, which is what the loop waits for. Other calls go to the threads
and the loop moves on at once. A waited call that overruns is a strike, as
below.

Running calls inline on the event loop itself saves the handoff too, but a
slow one then stalls the whole server past every time limit; it is opt-in
(`server.inline_budget_ms`, `@deployment(inline=True)`). An inline call that
overruns the budget, or waits (sleep, I/O), sends its version back to its
threads until it is measured cheap again; the third such call within
`OVERRUN_WINDOW` inline calls keeps it there.

Only waits the thread chose count (voluntary context switches): under load
the OS takes the CPU away from any call, which says nothing about the
function. A thread can also be made to wait for the GIL by another Python
thread now and then; the window forgives such rare strikes, where counting
them for the server's whole life eventually sent even a doubler to its
threads for good. Without per-thread counts (not Linux), any wait counts.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from typing import Any, Callable

from framework.config import SERVER_DEFAULTS

log = logging.getLogger("framework.runtime")

# The budget of a deployment declared `@deployment(inline=True)` on a server
# whose own `inline_budget_ms` is 0 (the default).
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
_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)


def _usage() -> tuple[float, int]:
    """This thread's CPU seconds and voluntary context switches so far.

    CPU time from `thread_time`: getrusage's user and system times are split
    from sampled ticks and can be off by milliseconds between two calls.
    """
    switches = resource.getrusage(_RUSAGE_THREAD).ru_nvcsw if _RUSAGE_THREAD is not None else 0
    return time.thread_time(), switches


class InlinePolicy:
    """One version's cost estimate, and the decision it drives."""

    def __init__(self, label: str, inline_budget: float, wait_budget: float) -> None:
        """Calls measured cheap run on the event loop itself if `inline_budget` > 0,
        else on a thread with the loop waiting, if `wait_budget` > 0."""
        self.label = label
        self.on_loop = inline_budget > 0
        self.budget = inline_budget if self.on_loop else wait_budget
        self.wait = WAIT_FACTOR * self.budget
        # CPU seconds per row, a cautious estimate (rises at once, falls slowly);
        # infinite once the version is known to block, or when nothing is cheap.
        self.row_cost = 0.0 if self.budget > 0 else math.inf
        self.timed_calls = 0
        self.pool_wait = math.inf  # a decaying minimum of what pooled calls waited
        self.overruns = 0
        self.clean_calls = 0  # calls within budget since the last overrun

    def cheap(self, rows: int) -> bool:
        """Whether a call of `rows` rows may run inline, or with the loop waiting for it."""
        return (self.timed_calls >= WARMUP_CALLS and self.pool_wait <= min(WAIT_LIMIT_S, self.budget)
                and rows * self.row_cost <= self.budget)

    def _learn(self, per_row: float) -> None:
        cost = self.row_cost
        self.row_cost = per_row if per_row > cost else 0.9 * cost + 0.1 * per_row
        self.timed_calls += 1

    def waited(self, work: Callable[[Any], Any], arg: Any, rows: int) -> Any:
        """`work(arg)` on a thread while the loop waits: its wall time is all that
        counts (the loop waits through CPU and I/O alike), and the loop waits on
        the CPU-time syscalls `timed` makes."""
        wall = time.perf_counter()
        out = work(arg)
        self._learn((time.perf_counter() - wall) / max(rows, 1))
        return out

    def timed(self, work: Callable[[Any], Any], arg: Any, rows: int) -> Any:
        """`work(arg)` timed, on one of the version's threads."""
        cpu, switches = _usage()
        wall = time.perf_counter()
        out = work(arg)
        wall = time.perf_counter() - wall
        end_cpu, end_switches = _usage()
        cpu = end_cpu - cpu
        self._learn(cpu / max(rows, 1))
        waited = wall - cpu if end_switches != switches or _RUSAGE_THREAD is None else 0.0
        self.pool_wait = min(waited, (self.pool_wait + waited) / 2)
        return out

    def inline(self, work: Callable[[Any], Any], arg: Any, rows: int) -> Any:
        """`work(arg)` on the event loop; a call over budget is looked at closely."""
        cpu, switches = _usage()
        wall = time.perf_counter()
        out = work(arg)
        wall = time.perf_counter() - wall
        if wall <= self.budget:  # then CPU time and waits are within budget too
            self._learn(wall / max(rows, 1))
            self.clean()
            return out
        end_cpu, end_switches = _usage()
        cpu = end_cpu - cpu
        self._learn(cpu / max(rows, 1))
        blocked = wall - cpu > self.budget and (_RUSAGE_THREAD is None or end_switches != switches)
        if cpu > 4 * self.budget or blocked:  # costlier than measured, or blocking
            self._strike(wall, rows, f"took {wall * 1e3:.1f} ms on the event loop")
        return out

    def clean(self) -> None:
        """A call ran inline, or was waited for, within its budget."""
        self.clean_calls += 1
        if self.clean_calls >= OVERRUN_WINDOW:
            self.overruns = 0

    def overran(self, rows: int) -> None:
        """A call the loop waited for was not done within the wait."""
        self._strike(self.wait, rows, f"ran past the {self.wait * 1e3:g} ms the event loop waits")

    def _strike(self, wall: float, rows: int, what: str) -> None:
        """Not cheap for a while; the `MAX_OVERRUNS`th strike in a window, for good."""
        self.overruns += 1
        self.clean_calls = 0
        self.row_cost = max(self.row_cost, wall / max(rows, 1))
        if self.overruns >= MAX_OVERRUNS:
            self.row_cost = math.inf
        log.warning("%s %s; running it on its threads without waiting%s", self.label, what,
                    " from now on" if self.overruns >= MAX_OVERRUNS else " for a while")
