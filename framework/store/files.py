"""Files written so that a crash leaves the old content or the new, never half of either."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_atomically(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `path` atomically (a temporary file renamed over it); no temporary file is
    left behind when anything fails."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}"
    try:
        write_synced(tmp, data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
