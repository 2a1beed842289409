"""Loading a version: the one place where an artifact is unpickled.

`load` checks the sha256 (and the signature, when a key is set) and the Python
version *before* running any of the pickle's code, then seeds `linecache` with
the project's sources so tracebacks show their lines.
"""

from __future__ import annotations

import io
import linecache
import logging
import pickle
import sys
from dataclasses import dataclass
from typing import Any, Callable

from framework.errors import IncompatibleArtifact
from framework.store import signing

log = logging.getLogger("framework.loading")

# Where the modules of the flat layout (0.x) went: an artifact holds references to them
# (a deployment calling another's `Deployment` object), and must still load.
MOVED = {f"framework.{old}": f"framework.{new}" for old, new in {
    "registry": "build.registry", "packaging": "build.packing", "publish": "build.publish",
    "lifecycle": "build.releases", "s3store": "store.s3", "s3objects": "store.s3objects",
    "artifact_cache": "store.artifact_cache", "signing": "store.signing",
    "manifest": "store.manifest", "cache": "execute.versions", "runner": "execute.runner",
    "calls": "execute.calls", "threads": "execute.threads", "isolation": "execute.isolation",
    "worker": "execute.worker", "batching": "execute.batching",
    "environments": "execute.environments", "app": "serve.app", "server": "serve.server",
    "intake": "serve.intake", "bigbody": "serve.bigbody", "auth": "serve.auth",
    "accesslog": "serve.accesslog", "metrics": "serve.metrics", "observe": "serve.observe",
    "openapi": "serve.openapi", "refresh": "serve.refresh", "jobs": "serve.jobs",
    "webhooks": "serve.webhooks", "links": "serve.links", "leases": "serve.leases",
}.items()}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(MOVED.get(module, module), name)


def unpickle(artifact: bytes) -> Any:
    """`cloudpickle.loads`, with the references of 0.x artifacts to moved modules followed."""
    return _Unpickler(io.BytesIO(artifact)).load()



@dataclass
class Loaded:
    """An unpickled version: the function and its manifest."""

    fn: Callable[..., Any]
    manifest: dict[str, Any]


def check(artifact: bytes, manifest: dict[str, Any]) -> None:
    """Refuse an artifact that does not match its manifest (or signature) or this Python."""
    signing.check_integrity(artifact, manifest, signing.current_key())
    where = signing.named(manifest)
    built = str(manifest.get("python", ""))
    here = ".".join(map(str, sys.version_info[:3]))
    if built.split(".")[:2] != here.split(".")[:2]:
        raise IncompatibleArtifact(
            f"{where} was built with Python {built} and cannot be loaded by Python {here}: "
            f"run the server on Python {'.'.join(built.split('.')[:2])}, or redeploy from Python "
            f"{'.'.join(here.split('.')[:2])}"
        )
    if built != here:
        log.warning("%s was built with Python %s, running on %s", where, built, here)
    for dist, version in (manifest.get("requirements") or {}).get("detected", {}).items():
        import importlib.metadata  # only for versions that record requirements

        try:
            have = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            log.warning("%s needs %s==%s, which is not installed", where, dist, version)
            continue
        if have != version:
            log.warning("%s was built with %s %s, running with %s", where, dist, version, have)


def seed_linecache(manifest: dict[str, Any]) -> None:
    """Make tracebacks show the lines of the project files the version was built from.

    An entry without an mtime is one `linecache.checkcache` leaves alone. Two
    loaded versions with different text for the same file share one entry: the
    last one loaded.
    """
    sources = manifest.get("sources")
    if not isinstance(sources, dict):
        return
    for rel, text in sources.items():
        if isinstance(rel, str) and isinstance(text, str):
            lines = text.splitlines(keepends=True)
            linecache.cache[rel] = (len(text), None, lines, rel)


def load(artifact: bytes, manifest: dict[str, Any]) -> Loaded:
    """Verify, then unpickle, then run the deployment's setup once."""
    check(artifact, manifest)
    seed_linecache(manifest)
    payload = unpickle(artifact)
    if payload.get("setup") is not None:
        payload["setup"]()
    return Loaded(payload["fn"], manifest)
