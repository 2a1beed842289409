"""Plain Python functions as versioned REST inference endpoints (Modelbit's protocol)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from framework.errors import FrameworkError, InferenceError
from framework.build.registry import Deployment, deployment, register

# Loaded on first use: the client pulls in httpx, the deployer cloudpickle and
# git helpers, and `framework serve` starts about 0.4 s sooner without them.
_LAZY = {"get_inference": "framework.client", "deploy": "framework.build.publish"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'framework' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value

__all__ = [
    "Deployment",
    "FrameworkError",
    "InferenceError",
    "deploy",
    "deployment",
    "get_inference",
    "register",
]
