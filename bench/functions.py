"""The functions the servers run: the seed's doubler, in each of our execution
modes (`bumped` is redeployed by the harness to time a deploy), and a CPU-bound
pure-Python call to run beside them. No numpy here: the bare apps import this."""

from __future__ import annotations

from typing import Callable

from framework import deployment


@deployment(name="doubler")
def doubler(foo: int) -> int:
    return 2 * foo


# The same function under our other two execution modes: on the event loop (the
# author's promise that it is pure and never blocks), and in a warm worker process.
@deployment(name="doubler_inline", inline=True)
def doubler_inline(foo: int) -> int:
    return 2 * foo


@deployment(name="doubler_process", isolation="process")
def doubler_process(foo: int) -> int:
    return 2 * foo


def _spin(n: int) -> int:
    """Pure Python that holds the GIL throughout: `n` loop steps."""
    total = 0
    for i in range(n):
        total += i & 7
    return total


# One function twice: in a worker process, and on a thread of the server, to show what
# isolation changes for the deployments served beside it.
@deployment(name="spin_process", isolation="process")
def spin_process(n: int) -> int:
    return _spin(n)


@deployment(name="spin_thread")
def spin_thread(n: int) -> int:
    return _spin(n)


@deployment(name="bumped")
def bumped(foo: int) -> int:
    return 2 * foo


def make_bumped(step: int) -> Callable[[int], int]:
    """A new version of `bumped`, told apart by its answer: 2 * foo + step."""

    def bumped(foo: int) -> int:
        return 2 * foo + step

    return bumped
