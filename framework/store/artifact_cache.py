"""A local disk cache of artifacts, by sha256, shared by a machine's server workers.

A remote store (S3) would otherwise send every artifact over the network each
time a worker loads a version. Files are named by the artifact's sha256 and
checked against it before use, so a truncated or altered file is dropped and
fetched again rather than unpickled; they are written to a temporary name and
renamed, so a reader never sees half a file and workers racing to fill the same
entry cannot corrupt it.

Location: $FRAMEWORK_CACHE_DIR/artifacts, else $XDG_CACHE_HOME/framework/artifacts,
else ~/.cache/framework/artifacts (environments live beside it, under `envs/`). In
Kubernetes point $FRAMEWORK_CACHE_DIR at an `emptyDir`.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from framework.store.files import replace_atomically

SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def default_dir() -> Path:
    explicit = os.environ.get("FRAMEWORK_CACHE_DIR")
    if explicit:
        return Path(explicit) / "artifacts"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "framework" / "artifacts"


class ArtifactCache:
    """Verified artifacts on local disk; every failure to use the disk is a miss, never an error."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.dir = Path(directory) if directory else default_dir()

    def __repr__(self) -> str:
        return f"ArtifactCache({str(self.dir)!r})"

    def _path(self, sha256: str) -> Path:
        if not SHA_RE.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.dir / sha256[:2] / sha256

    def get(self, sha256: str) -> bytes | None:
        """The artifact, when cached and still matching its sha256."""
        path = self._path(sha256)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            path.unlink(missing_ok=True)  # damaged on disk: fetch it again
            return None
        return data

    def put(self, sha256: str, data: bytes) -> bool:
        """Keep `data` under its sha256; False (and nothing written) when it does not match
        or the disk refused. A full or read-only disk must not fail a load."""
        if hashlib.sha256(data).hexdigest() != sha256:
            return False
        path = self._path(sha256)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(path, data)
        except OSError:
            return False
        return True
