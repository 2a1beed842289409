"""The store's interface: what the deployer and the runtime need from a backend.

Everything outside `framework.store` talks to `Store` in terms of (branch, name,
version) and bytes, never paths, so a local directory and object storage sit
behind the same methods.
"""

from __future__ import annotations

import abc
import errno
from typing import Any, Callable

from framework.store import manifest as mf
from framework.store import signing
from framework.errors import NotFound, StoreDamaged

def os_problem(exc: OSError) -> str:
    """What an OSError means for the store, and what to do: a full disk is not a permission."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk holding the store is full (or over quota); free some space and retry"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{exc.strerror}; fix the store's permissions, or point FRAMEWORK_STORE elsewhere"
    if exc.errno == errno.ENOTDIR:
        return ("a part of its path is a file, not a directory; point FRAMEWORK_STORE or `store:` "
                "in deploy.yaml at a writable directory")
    return f"{exc.strerror or exc}; check the store's disk and that it is a writable directory"


def check_place(manifest: dict[str, Any], branch: str, name: str, version: int) -> dict[str, Any]:
    """`manifest` when it describes the place it was read from; StoreDamaged naming both otherwise.

    A version directory copied, linked or renamed elsewhere in the store keeps the
    identity it was published (and signed) with, which is how it is caught.
    """
    found = (manifest.get("branch"), manifest.get("name"), manifest.get("version"))
    if found != (branch, name, version):
        raise StoreDamaged(
            f"the store holds, at {name} v{version} on branch {branch!r}, a version published as "
            f"{found[1]} v{found[2]} on branch {found[0]!r}: it was copied, linked or renamed "
            f"there, and is refused; remove it and deploy (or `framework rollback {name}`)"
        )
    return manifest


def move_alias(aliases: dict[str, int], name: str, alias: str, version: int | None) -> None:
    """Point `alias` at `version` in `aliases`, or remove it when `version` is None."""
    if version is None:
        if alias not in aliases:
            raise NotFound(f"deployment {name!r} has no alias {alias!r} to remove")
        del aliases[alias]
    else:
        aliases[alias] = version


class Store(abc.ABC):
    """What the deployer and the runtime need from a store."""

    @abc.abstractmethod
    def publish(self, branch: str, name: str, artifact: bytes, manifest: dict[str, Any]) -> int:
        """Store a new version atomically; returns its number."""

    @abc.abstractmethod
    def versions(self, branch: str, name: str) -> list[int]:
        """Every version of (branch, name), ascending; [] when there is none."""

    @abc.abstractmethod
    def read_manifest(self, branch: str, name: str, version: int) -> dict[str, Any]:
        """The manifest, checked with `check_place`; StoreDamaged when unreadable or elsewhere."""

    @abc.abstractmethod
    def read_artifact(self, branch: str, name: str, version: int) -> bytes: ...

    @abc.abstractmethod
    def branches(self) -> list[str]: ...

    @abc.abstractmethod
    def names(self, branch: str) -> list[str]: ...

    @abc.abstractmethod
    def aliases(self, branch: str, name: str) -> dict[str, int]: ...

    @abc.abstractmethod
    def set_alias(self, branch: str, name: str, alias: str, version: int | None) -> None:
        """Point `alias` at `version`, or remove it when `version` is None."""

    @abc.abstractmethod
    def read_keys(self) -> dict[str, Any] | None:
        """The API keys document (hashes only), or None when no key was ever created."""

    @abc.abstractmethod
    def update_keys(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Run `change` on the keys document under a lock, then replace it atomically."""

    # -- small shared documents (jobs, leases, results, secrets), by key ---------
    # A key is '/'-separated segments of [A-Za-z0-9._-] (no '.' or '..' segment),
    # such as "jobs/<id>.json". An etag is an opaque string that changes whenever
    # the document does; it is what compare-and-swap is conditioned on
    # (`If-Match` on S3), and `create=True` is `If-None-Match: *`.

    @abc.abstractmethod
    def read_doc(self, key: str) -> tuple[bytes, str] | None:
        """The document's bytes and etag, or None when there is no such document."""

    @abc.abstractmethod
    def write_doc(self, key: str, data: bytes, *, etag: str | None = None,
                  create: bool = False) -> str | None:
        """Write `key` atomically; returns its new etag, or None when the condition failed:
        with `create`, the document already existed; with `etag`, it had changed (or was gone)."""

    @abc.abstractmethod
    def delete_doc(self, key: str) -> None:
        """Remove `key`; no error when it is already gone."""

    @abc.abstractmethod
    def list_docs(self, prefix: str) -> list[str]:
        """The keys under `prefix` (a key prefix such as "jobs/"), sorted."""

    def sealed_manifest(self, artifact: bytes, manifest: dict[str, Any], branch: str, name: str,
                        version: int) -> bytes:
        """The manifest to store as `version` of (branch, name), which it records, signed
        when $FRAMEWORK_SIGNING_KEY is set.

        Called by `publish` once per number it tries to claim: the signature covers
        the version (and branch, name), so the version cannot be signed any earlier.
        """
        final = {**manifest, "branch": branch, "name": name, "version": version}
        key = signing.current_key()
        if key is not None:
            final.pop("signed", None)
            final["signed"] = signing.sign(artifact, final, key)
        return mf.dumps(final)

    def publish_changed(self, branch: str, name: str, artifact: bytes, manifest: dict[str, Any],
                        same: Callable[[int], bool]) -> tuple[int, bool]:
        """Publish unless the latest version already holds this content (`same(latest)`):
        returns (version, whether it is new). Backends that can, make check and publish one
        step, so identical deploys racing publish one version."""
        latest = self.latest(branch, name)
        if latest is not None and same(latest):
            return latest, False
        return self.publish(branch, name, artifact, manifest), True

    def check_writable(self) -> None:
        """Raise StoreError now if `publish` could not write, so a deploy fails before packaging.

        A backend that cannot tell cheaply leaves it to `publish`.
        """

    def deployments(self) -> list[tuple[str, str, int]]:
        """(branch, name, latest version) of every deployment with a version."""
        found = []
        for branch in self.branches():
            for name in self.names(branch):
                latest = self.latest(branch, name)
                if latest is not None:
                    found.append((branch, name, latest))
        return found

    def latest(self, branch: str, name: str) -> int | None:
        found = self.versions(branch, name)
        return found[-1] if found else None

    def resolve(self, branch: str, name: str, ref: str) -> int:
        """Turn `latest`, a number or an alias into a version number."""
        where = f"deployment {name!r} on branch {branch!r}"
        versions = self.versions(branch, name)
        if not versions:
            raise NotFound(f"{where} has no versions: deploy it first, or see `framework list` (GET /v1/)")
        if ref == "latest":
            return versions[-1]
        if ref.isascii() and ref.isdigit():  # str.isdigit() also accepts "²", which int() refuses
            if len(ref) > 18 or int(ref) not in versions:  # int() refuses over 4,300 digits
                shown = int(ref) if len(ref) <= 18 else ref[:20] + "..."
                raise NotFound(f"{where} has no version {shown}: see `framework versions {name}`")
            return int(ref)
        aliases = self.aliases(branch, name)
        if ref not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise NotFound(
                f"{where} has no alias {ref!r} (aliases: {known}); use latest, a version "
                "number or an alias"
            )
        return aliases[ref]
