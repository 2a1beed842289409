"""The function both servers run: the seed's doubler (and `bumped`, redeployed
by the harness to time a deploy). No numpy here: the bare app imports this."""

from __future__ import annotations

from typing import Callable

from framework import deployment


@deployment(name="doubler")
def doubler(foo: int) -> int:
    return 2 * foo


@deployment(name="bumped")
def bumped(foo: int) -> int:
    return 2 * foo


def make_bumped(step: int) -> Callable[[int], int]:
    """A new version of `bumped`, told apart by its answer: 2 * foo + step."""

    def bumped(foo: int) -> int:
        return 2 * foo + step

    return bumped
