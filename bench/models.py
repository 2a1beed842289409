"""A numpy model served twice: row by row, and vectorized.

A small multilayer perceptron over four features, as a scikit-learn or torch
model would be: most of a one-row call is numpy's per-call overhead, which a
vectorized call pays once for all its rows.
"""

from __future__ import annotations

import numpy as np

from framework import deployment

_rng = np.random.default_rng(0)
LAYERS = [(_rng.normal(size=(a, b)) / np.sqrt(a), np.zeros(b)) for a, b in [(4, 16), (16, 16), (16, 1)]]


def _score(x: np.ndarray) -> np.ndarray:
    for i, (w, b) in enumerate(LAYERS):
        x = x @ w + b
        if i < len(LAYERS) - 1:
            x = np.maximum(x, 0.0)
    return 1.0 / (1.0 + np.exp(-x[..., 0]))


@deployment(name="mlp_rows")
def mlp_rows(a: float, b: float, c: float, d: float) -> float:
    return float(_score(np.array([a, b, c, d])))


@deployment(name="mlp_vectorized", vectorized=True, max_batch_rows=1024, max_wait_ms=0)
def mlp_vectorized(a: list[float], b: list[float], c: list[float], d: list[float]) -> list[float]:
    return _score(np.column_stack([a, b, c, d])).tolist()
