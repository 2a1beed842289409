"""The versioned store: an interface, and the local-directory backend.

Everything outside this module talks to `Store` in terms of (branch, name,
version) and bytes, never paths, so an object-storage backend can sit behind
the same methods.

Local layout (`<root>` is the store directory)::

    <root>/branches/<branch, %-encoded>/<name>/<version>/artifact.pkl
                                                        /manifest.json
    <root>/branches/<branch>/<name>/aliases.json
    <root>/keys.json   API keys (their sha256 only), see framework.auth
    <root>/.staging/   versions being written; never read

Publishing writes a version under `.staging`, then renames the directory to
`<name>/<N>`. A rename onto an existing non-empty directory fails, so two
deploys racing for N cannot both win: the loser retries with N+1. A deploy
killed mid-write leaves only a directory under `.staging`.
"""

from __future__ import annotations

import abc
import errno
import hashlib
import fcntl
import importlib
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote, unquote

from framework import manifest as mf
from framework.errors import NotFound, StoreError
from framework.registry import NAME_RE

BRANCH_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
STALE_STAGING_S = 3600


def check_branch(branch: object) -> str:
    # A "." or ".." segment would name a directory other than the branch's own.
    if not isinstance(branch, str) or not BRANCH_RE.match(branch) or any(
        part in (".", "..") for part in branch.split("/")
    ):
        raise NotFound(
            f"invalid branch name {branch!r}: use letters, digits, '.', '_', '-' and '/', with no "
            "'.' or '..' segment (write '/' as '~' in URLs)"
        )
    return branch


def check_alias(alias: object) -> str:
    if not isinstance(alias, str) or alias == "latest" or not ALIAS_RE.match(alias):
        raise StoreError(
            f"invalid alias {alias!r}: an alias starts with a letter or '_', uses letters, digits, "
            "'_', '.' or '-', and cannot be 'latest' or a number"
        )
    return alias


class Store(abc.ABC):
    """What the deployer and the runtime need from a store."""

    @abc.abstractmethod
    def publish(self, branch: str, name: str, artifact: bytes, manifest: dict[str, Any]) -> int:
        """Store a new version atomically; returns its number."""

    @abc.abstractmethod
    def versions(self, branch: str, name: str) -> list[int]:
        """Every version of (branch, name), ascending; [] when there is none."""

    @abc.abstractmethod
    def read_manifest(self, branch: str, name: str, version: int) -> dict[str, Any]: ...

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
            if int(ref) not in versions:
                raise NotFound(f"{where} has no version {int(ref)}: see `framework versions {name}`")
            return int(ref)
        aliases = self.aliases(branch, name)
        if ref not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise NotFound(
                f"{where} has no alias {ref!r} (aliases: {known}); use latest, a version "
                "number or an alias"
            )
        return aliases[ref]


class LocalStore(Store):
    """A store in a local directory (or a shared filesystem mount)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _dir(self, branch: str, name: str) -> Path:
        if not NAME_RE.match(name):  # asked for by a URL or a command: no such deployment
            raise NotFound(
                f"no deployment {name!r}: names use letters, digits, '_' or '-', starting with a "
                "letter or '_'; see GET /v1/ or `framework list`"
            )
        return self.root / "branches" / quote(check_branch(branch), safe="") / name

    def check_writable(self) -> None:
        try:
            (self.root / ".staging").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the store at {self.root}: {exc.strerror}; set FRAMEWORK_STORE or "
                "`store:` in deploy.yaml to a writable directory"
            ) from exc
        if not os.access(self.root / ".staging", os.W_OK):
            raise StoreError(
                f"the store at {self.root} is not writable; fix its permissions or point "
                "FRAMEWORK_STORE / `store:` in deploy.yaml elsewhere"
            )

    def _clean_staging(self) -> None:
        cutoff = time.time() - STALE_STAGING_S
        for entry in os.scandir(self.root / ".staging"):
            try:
                stale = entry.stat(follow_symlinks=False).st_mtime < cutoff
            except FileNotFoundError:  # a concurrent deploy just published or cleaned it
                continue
            if stale:
                shutil.rmtree(entry.path, ignore_errors=True)

    def publish(self, branch: str, name: str, artifact: bytes, manifest: dict[str, Any]) -> int:
        target = self._dir(branch, name)
        self.check_writable()
        self._clean_staging()
        stage = self.root / ".staging" / uuid.uuid4().hex
        try:
            stage.mkdir()
            _write(stage / "artifact.pkl", artifact)
            target.mkdir(parents=True, exist_ok=True)
            version = (self.latest(branch, name) or 0) + 1
            while True:
                _write(stage / "manifest.json", mf.dumps({**manifest, "version": version}))
                try:
                    os.rename(stage, target / str(version))
                    break
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    version = max(version + 1, (self.latest(branch, name) or 0) + 1)
        except OSError as exc:
            raise StoreError(f"cannot publish {name!r} to {self.root}: {exc}") from exc
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        _fsync_dir(target)
        return version

    def versions(self, branch: str, name: str) -> list[int]:
        try:
            entries = os.listdir(self._dir(branch, name))
        except FileNotFoundError:
            return []
        return sorted(int(e) for e in entries if e.isdigit())

    def _read(self, branch: str, name: str, version: int, file: str) -> bytes:
        try:
            return (self._dir(branch, name) / str(version) / file).read_bytes()
        except FileNotFoundError:
            raise NotFound(
                f"deployment {name!r} on branch {branch!r} has no version {version}"
            ) from None

    def read_manifest(self, branch: str, name: str, version: int) -> dict[str, Any]:
        return mf.loads(self._read(branch, name, version, "manifest.json"))

    def read_artifact(self, branch: str, name: str, version: int) -> bytes:
        return self._read(branch, name, version, "artifact.pkl")

    def branches(self) -> list[str]:
        try:
            return sorted(unquote(e) for e in os.listdir(self.root / "branches"))
        except FileNotFoundError:
            return []

    def names(self, branch: str) -> list[str]:
        base = self.root / "branches" / quote(check_branch(branch), safe="")
        try:
            return sorted(e.name for e in os.scandir(base) if e.is_dir() and NAME_RE.match(e.name))
        except FileNotFoundError:
            return []

    def aliases(self, branch: str, name: str) -> dict[str, int]:
        try:
            return mf.loads((self._dir(branch, name) / "aliases.json").read_bytes())
        except FileNotFoundError:
            return {}

    @contextmanager
    def _locked(self, branch: str, name: str) -> Iterator[Path]:
        directory = self._dir(branch, name)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield directory

    def set_alias(self, branch: str, name: str, alias: str, version: int | None) -> None:
        check_alias(alias)
        if version is not None and version not in self.versions(branch, name):
            raise NotFound(
                f"cannot point alias {alias!r} at version {version}: deployment {name!r} on "
                f"branch {branch!r} has versions {self.versions(branch, name) or 'none'}"
            )
        with self._locked(branch, name) as directory:
            current = self.aliases(branch, name)
            if version is None:
                if alias not in current:
                    raise NotFound(f"deployment {name!r} has no alias {alias!r} to remove")
                del current[alias]
            else:
                current[alias] = version
            tmp = directory / f".aliases.{uuid.uuid4().hex}"
            try:
                _write(tmp, mf.dumps(current))
                os.replace(tmp, directory / "aliases.json")
            except OSError as exc:
                raise StoreError(
                    f"cannot write aliases of {name!r} in {self.root}: {exc.strerror}; "
                    "fix the store's permissions"
                ) from exc

    def read_keys(self) -> dict[str, Any] | None:
        try:
            return mf.loads((self.root / "keys.json").read_bytes())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read API keys from {self.root}: {exc.strerror}") from exc

    # -- small documents: <root>/docs/<key>; the etag is the content's sha256 -----

    def _doc_path(self, key: str) -> Path:
        return self.root / "docs" / check_doc_key(key)

    def read_doc(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._doc_path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read document {key!r} in the store: {exc.strerror}") from exc
        return data, hashlib.sha256(data).hexdigest()

    def write_doc(self, key: str, data: bytes, *, etag: str | None = None,
                  create: bool = False) -> str | None:
        path = self._doc_path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.root / "docs" / ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one writer at a time makes the check-and-set atomic
                if create or etag is not None:
                    current = self.read_doc(key)
                    if create and current is not None:
                        return None
                    if etag is not None and (current is None or current[1] != etag):
                        return None
                tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}"
                try:
                    _write(tmp, data)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot write document {key!r} in the store: {exc.strerror}") from exc
        return hashlib.sha256(data).hexdigest()

    def delete_doc(self, key: str) -> None:
        try:
            self._doc_path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot delete document {key!r} in the store: {exc.strerror}") from exc

    def list_docs(self, prefix: str) -> list[str]:
        base = self.root / "docs"
        if not base.is_dir():
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(base)
            for f in filenames:
                if not f.startswith("."):
                    key = f if rel == Path(".") else f"{rel.as_posix()}/{f}"
                    if key.startswith(prefix):
                        found.append(key)
        return sorted(found)

    def update_keys(self, change: Callable[[dict[str, Any]], None]) -> None:
        self.check_writable()
        with open(self.root / ".keys.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            doc = self.read_keys() or {}
            change(doc)
            tmp = self.root / f".keys.{uuid.uuid4().hex}"
            try:
                _write(tmp, mf.dumps(doc))
                os.chmod(tmp, 0o600)  # only hashes, but nobody else needs to read them
                os.replace(tmp, self.root / "keys.json")
            except OSError as exc:
                raise StoreError(
                    f"cannot write API keys in {self.root}: {exc.strerror}; fix the store's permissions"
                ) from exc


DOC_KEY_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


def check_doc_key(key: object) -> str:
    if not isinstance(key, str) or not DOC_KEY_RE.match(key) or any(
        part in (".", "..") for part in key.split("/")
    ):
        raise StoreError(f"invalid document key {key!r}: use '/'-separated [A-Za-z0-9._-] segments")
    return key


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_store(location: str) -> Store:
    """The store named by a `store:` setting or FRAMEWORK_STORE."""
    if location.startswith("s3://"):
        # By name at run time: framework.s3store subclasses Store, and only S3 users need it.
        return importlib.import_module("framework.s3store").S3Store.from_url(location)
    if "://" in location and not location.startswith("file://"):
        raise StoreError(
            f"store {location!r}: use a local directory (or file://path) or s3://bucket/prefix"
        )
    return LocalStore(location.removeprefix("file://"))
