"""Deployments that exercise every rule of the protocol (see tests/test_runtime.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import time
from dataclasses import dataclass

import numpy as np

from framework import deployment


@deployment
def echo(x):
    return x


@deployment
def count_rows(rows: list):
    return len(rows)


@deployment
def greet(name: str, greeting: str = "hello"):
    return f"{greeting} {name}"


@deployment
def fails_on_negative(x: float):
    if x < 0:
        raise ValueError(f"negative input {x}")
    return math.sqrt(x)


@deployment
def sleeper(seconds: float):
    time.sleep(seconds)
    return seconds


@deployment
async def async_doubler(x: int):
    await asyncio.sleep(0.01)
    return 2 * x


@dataclass
class Point:
    x: float
    y: float


class Opaque:
    pass


@deployment
def encodings(kind: str):
    return {
        "numpy_scalar": np.float32(1.5),
        "numpy_int": np.int64(7),
        "numpy_array": np.arange(3),
        "nan": float("nan"),
        "inf": float("inf"),
        "datetime": dt.datetime(2026, 1, 2, 3, 4, 5),
        "date": dt.date(2026, 1, 2),
        "dataclass": Point(1.0, 2.0),
        "opaque": Opaque(),
    }[kind]


def _slow_setup():
    time.sleep(3)


@deployment(setup=_slow_setup)
def slow_to_load(x):
    return x


def _broken_setup():
    raise RuntimeError("weights file missing")


@deployment(setup=_broken_setup)
def fails_to_load(x):
    return x
