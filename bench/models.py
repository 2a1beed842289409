"""A numpy model served twice: row by row, and vectorized.

A multilayer perceptron over four standardized features with four hidden
layers of 64 units, in float32: the size and the arithmetic of a small
tabular torch model. Called on one row it costs about 25 us, most of it
numpy's per-call overhead (about fifteen array operations), which dwarfs the
framework's own cost per row; a vectorized call pays that overhead once for
all its rows and spends the rest in matrix products. A model cheaper than the
JSON around its rows would show only what parsing costs, not what vectorizing
gains.
"""

from __future__ import annotations

import numpy as np

from framework import deployment

_rng = np.random.default_rng(0)
MEAN = np.array([5.8, 3.0, 3.8, 1.2], np.float32)
SCALE = np.array([0.8, 0.4, 1.8, 0.8], np.float32)
LAYERS = [((_rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32), np.zeros(b, np.float32))
          for a, b in [(4, 64), (64, 64), (64, 64), (64, 64), (64, 1)]]


def _score(x: np.ndarray) -> np.ndarray:
    x = (np.asarray(x, np.float32) - MEAN) / SCALE
    for w, b in LAYERS[:-1]:
        x = x @ w
        # In place: a fresh array per step would cost more than the product on a large batch.
        x += b
        np.maximum(x, 0.0, out=x)
    w, b = LAYERS[-1]
    return 1.0 / (1.0 + np.exp(-(x @ w[:, 0] + b[0])))


def _rows(a: float, b: float, c: float, d: float) -> float:
    return float(_score(np.array([a, b, c, d])))


def _vectorized(a: list[float], b: list[float], c: list[float], d: list[float]) -> list[float]:
    return _score(np.column_stack([a, b, c, d])).tolist()


# One function for each way of calling the model, served in several modes.
mlp_rows = deployment(name="mlp_rows")(_rows)
# No wait (max_wait_ms=0): with many clients, requests queue up on their own while
# a call runs, and a wait would only add latency. 1,024 rows bound one call's time.
VECTORIZED = {"vectorized": True, "max_batch_rows": 1024, "max_wait_ms": 0}
mlp_vectorized = deployment(name="mlp_vectorized", **VECTORIZED)(_vectorized)
# The same on the event loop: not how this model should be served (a call takes about half a
# millisecond), but what the vectorized gain is without the hop to the version's thread.
mlp_vectorized_inline = deployment(name="mlp_vectorized_inline", inline=True, **VECTORIZED)(_vectorized)
# Both in a worker process each: the CPU-heavy mode, whose calls share no GIL with the
# server's event loop (docs/execution.md).
mlp_rows_process = deployment(name="mlp_rows_process", isolation="process")(_rows)
mlp_vectorized_process = deployment(name="mlp_vectorized_process", isolation="process", **VECTORIZED)(_vectorized)
