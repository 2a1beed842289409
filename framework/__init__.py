"""Plain Python functions as versioned REST inference endpoints (Modelbit's protocol)."""

from __future__ import annotations

__version__ = "0.1.0"

from framework.client import get_inference
from framework.errors import FrameworkError, InferenceError
from framework.publish import deploy
from framework.registry import Deployment, deployment, register

__all__ = [
    "Deployment",
    "FrameworkError",
    "InferenceError",
    "deploy",
    "deployment",
    "get_inference",
    "register",
]
