"""A small realistic model: a softmax classifier over the four iris measurements.

It is trained at import time with numpy (gradient descent on a fixed,
seeded synthetic sample around the three species' mean measurements) and
captured as a global, so the trained weights travel inside the artifact.
"""

from __future__ import annotations

import numpy as np

from framework import deployment

SPECIES = ["setosa", "versicolor", "virginica"]
# Mean (sepal length, sepal width, petal length, petal width) per species, in cm.
MEANS = np.array([[5.01, 3.43, 1.46, 0.25], [5.94, 2.77, 4.26, 1.33], [6.59, 2.97, 5.55, 2.03]])
SPREAD = np.array([[0.35, 0.38, 0.17, 0.11], [0.52, 0.31, 0.47, 0.20], [0.64, 0.32, 0.55, 0.27]])


def _train(steps: int = 500, lr: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(m, s, size=(200, 4)) for m, s in zip(MEANS, SPREAD)])
    y = np.repeat(np.arange(3), 200)
    mu, sigma = x.mean(axis=0), x.std(axis=0)
    z = (x - mu) / sigma
    w, b = np.zeros((4, 3)), np.zeros(3)
    onehot = np.eye(3)[y]
    for _ in range(steps):
        logits = z @ w + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        w -= lr * z.T @ (p - onehot) / len(z)
        b -= lr * (p - onehot).mean(axis=0)
    return w, b, mu, sigma


WEIGHTS, BIAS, MU, SIGMA = _train()


def probabilities(features: np.ndarray) -> np.ndarray:
    logits = ((features - MU) / SIGMA) @ WEIGHTS + BIAS
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


@deployment
def iris_species(sepal_length: float, sepal_width: float, petal_length: float, petal_width: float):
    """The most likely species and the probability of each."""
    p = probabilities(np.array([sepal_length, sepal_width, petal_length, petal_width], dtype=float))
    return {"species": SPECIES[int(p.argmax())], "probabilities": dict(zip(SPECIES, p.round(4)))}
