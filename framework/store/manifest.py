"""The manifest: a JSON description stored beside every artifact."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import orjson

FORMAT = 1


def framework_version() -> str:
    from framework import __version__

    return __version__


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


def loads(data: bytes) -> dict[str, Any]:
    return orjson.loads(data)


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# Where GitHub Actions and GitLab CI name the branch of a detached checkout.
CI_BRANCH_VARS = ("GITHUB_HEAD_REF", "GITHUB_REF_NAME", "CI_COMMIT_REF_NAME")


def now() -> str:
    """A manifest timestamp: UTC, to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_info(root: Path) -> dict[str, Any] | None:
    """Commit, branch and author of the checkout at `root`, or None outside git."""
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return None
    branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
    if branch == "HEAD":
        # Detached HEAD, as CI checkouts of a pull request are: ask the CI instead.
        branch = next((os.environ[k] for k in CI_BRANCH_VARS if os.environ.get(k)), None)
    return {
        "commit": commit,
        "branch": branch,
        "author": _git(root, "log", "-1", "--format=%an <%ae>"),
        "dirty": bool(_git(root, "status", "--porcelain", "--untracked-files=no")),
    }


def build(
    *,
    name: str,
    branch: str,
    artifact: bytes,
    content_sha256: str,
    signature: dict[str, Any],
    source: str | None,
    options: dict[str, Any],
    requirements: dict[str, Any],
    by_value_modules: list[str],
    root: Path,
) -> dict[str, Any]:
    """Everything DESIGN.md section 4 asks for; `version` is set when published."""
    return {
        "format": FORMAT,
        "name": name,
        "branch": branch,
        "version": None,
        "created_at": now(),
        "sha256": hashlib.sha256(artifact).hexdigest(),
        "size": len(artifact),
        "content_sha256": content_sha256,
        "python": ".".join(map(str, sys.version_info[:3])),
        "cloudpickle": cloudpickle.__version__,
        "framework": framework_version(),
        "requirements": requirements,
        "by_value_modules": by_value_modules,
        "signature": signature,
        "options": options,
        "source": source,
        "git": git_info(root),
    }
