"""The local-directory store backend (or a shared filesystem mount).

Local layout (`<root>` is the store directory)::

    <root>/branches/<branch, %-encoded>/<name>/<version>/artifact.pkl
                                                        /manifest.json
    <root>/branches/<branch>/<name>/aliases.json
    <root>/keys.json   API keys (their sha256 only), see framework.serve.auth
    <root>/.staging/   versions being written; never read

Publishing writes a version under `.staging`, then renames the directory to
`<name>/<N>`. A rename onto an existing non-empty directory fails, so two
deploys racing for N cannot both win: the loser retries with N+1. A deploy
killed mid-write leaves only a directory under `.staging`.
"""

from __future__ import annotations

import errno
import hashlib
import fcntl
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote, unquote

from framework.store import manifest as mf
from framework.store.files import fsync_dir, replace_atomically, write_synced
from framework.store.base import Store, check_place, move_alias, os_problem
from framework.errors import NotFound, StoreDamaged, StoreError
from framework.store.names import NAME_RE, check_alias, check_branch, check_doc_key

# Staging directories of a deploy that left no owner lock behind (older versions, or one
# between its mkdir and its lock) are removed only once this old.
STALE_STAGING_S = 3600
OWNER = ".owner"
NEW = ".new"


_ABSENT = object()  # what `LocalStore._read_json` returns for a file that is not there


class LocalStore(Store):
    """A store in a local directory (or a shared filesystem mount)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _dir(self, branch: str, name: str) -> Path:
        if not NAME_RE.match(name):  # asked for by a URL or a command: no such deployment
            raise NotFound(
                f"no deployment {name[:100]!r}: names use letters, digits, '_' or '-', starting with "
                "a letter or '_', at most 100 characters; see GET /v1/ or `framework list`"
            )
        return self.root / "branches" / quote(check_branch(branch), safe="") / name

    def check_writable(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(
                f"the store {self.root} is a file, not a directory; point FRAMEWORK_STORE or "
                "`store:` in deploy.yaml at a directory"
            )
        try:
            (self.root / ".staging").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store at {self.root}: {os_problem(exc)}") from exc
        if not os.access(self.root / ".staging", os.W_OK):
            raise StoreError(
                f"the store at {self.root} is not writable; fix its permissions or point "
                "FRAMEWORK_STORE / `store:` in deploy.yaml elsewhere"
            )

    def _clean_staging(self) -> None:
        """Remove what deploys that are gone left under `.staging`.

        A deploy holds an flock on its staging directory's `.owner` file while it
        writes; the kernel drops it when the process dies, however it dies.
        """
        cutoff = time.time() - STALE_STAGING_S
        for entry in os.scandir(self.root / ".staging"):
            if entry.name.endswith(NEW):  # being set up: its owner has no lock yet, age tells
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        shutil.rmtree(entry.path, ignore_errors=True)
                except FileNotFoundError:
                    pass
                continue
            try:
                with open(os.path.join(entry.path, OWNER), "rb") as owner:
                    try:
                        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # its deploy is still running
                    gone = True
            except (FileNotFoundError, NotADirectoryError):  # no lock (yet, or any more): age tells
                try:
                    gone = entry.stat(follow_symlinks=False).st_mtime < cutoff
                except FileNotFoundError:  # a concurrent deploy just published or cleaned it
                    continue
            except OSError:
                continue
            if gone:
                shutil.rmtree(entry.path, ignore_errors=True)

    def publish(self, branch: str, name: str, artifact: bytes, manifest: dict[str, Any]) -> int:
        target = self._dir(branch, name)
        self.check_writable()
        self._clean_staging()
        stage = self.root / ".staging" / uuid.uuid4().hex
        owner = None
        try:
            # Set up under another name, so that no cleaner finds the directory before its
            # owner lock is held (between creating `.owner` and locking it, say).
            new = stage.with_name(stage.name + NEW)
            new.mkdir()
            owner = open(new / OWNER, "wb")
            fcntl.flock(owner, fcntl.LOCK_EX)
            os.rename(new, stage)
            write_synced(stage / "artifact.pkl", artifact)
            target.mkdir(parents=True, exist_ok=True)
            version = (self.latest(branch, name) or 0) + 1
            (stage / OWNER).unlink()  # not part of the version; the fresh mtime guards it now
            while True:
                write_synced(stage / "manifest.json", self.sealed_manifest(artifact, manifest, branch, name,
                                                                        version))
                try:
                    os.rename(stage, target / str(version))
                    break
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    version = max(version + 1, (self.latest(branch, name) or 0) + 1)
        except OSError as exc:
            raise StoreError(f"cannot publish {name!r} to {self.root}: {os_problem(exc)}") from exc
        finally:
            if owner is not None:
                owner.close()
            shutil.rmtree(stage, ignore_errors=True)
            shutil.rmtree(stage.with_name(stage.name + NEW), ignore_errors=True)
        fsync_dir(target)
        return version

    def publish_changed(self, branch: str, name: str, artifact: bytes, manifest: dict[str, Any],
                        same: Callable[[int], bool]) -> tuple[int, bool]:
        # Under the (branch, name) lock, so that of two identical deploys racing, one
        # publishes and the other finds its version.
        self.check_writable()
        try:
            with self._locked(branch, name):
                latest = self.latest(branch, name)
                if latest is not None and same(latest):
                    return latest, False
                return self.publish(branch, name, artifact, manifest), True
        except OSError as exc:
            raise StoreError(f"cannot publish {name!r} to {self.root}: {os_problem(exc)}") from exc

    def versions(self, branch: str, name: str) -> list[int]:
        try:
            entries = os.listdir(self._dir(branch, name))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StoreError(f"cannot read the versions of {name!r}: {os_problem(exc)}") from exc
        return sorted(int(e) for e in entries if e.isdigit() and len(e) <= 18)

    def _read(self, branch: str, name: str, version: int, file: str) -> bytes:
        try:
            return (self._dir(branch, name) / str(version) / file).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(
                f"deployment {name!r} on branch {branch!r} has no version {version}"
            ) from None
        except OSError as exc:  # no path in the message: it may reach a caller
            raise StoreError(
                f"cannot read {file} of {name} v{version} on branch {branch!r}: {os_problem(exc)}"
            ) from exc

    def read_manifest(self, branch: str, name: str, version: int) -> dict[str, Any]:
        data = self._read(branch, name, version, "manifest.json")
        try:
            manifest = mf.loads(data)
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict):
            raise StoreDamaged(
                f"manifest.json of {name} v{version} on branch {branch!r} is damaged (not a JSON "
                f"object); deploy a new version or roll back (`framework rollback {name}`), and "
                "check the store's disk"
            )
        return check_place(manifest, branch, name, version)

    def read_artifact(self, branch: str, name: str, version: int) -> bytes:
        return self._read(branch, name, version, "artifact.pkl")

    def branches(self) -> list[str]:
        try:
            return sorted(unquote(e) for e in os.listdir(self.root / "branches"))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"cannot list the store's branches: {os_problem(exc)}") from exc

    def names(self, branch: str) -> list[str]:
        base = self.root / "branches" / quote(check_branch(branch), safe="")
        try:
            return sorted(e.name for e in os.scandir(base) if e.is_dir() and NAME_RE.match(e.name))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StoreError(f"cannot list branch {branch!r}: {os_problem(exc)}") from exc

    def _read_json(self, path: Path, what: str) -> Any:
        """The JSON document at `path`: `_ABSENT` if there is none, None if it does not
        parse; a file that cannot be read raises StoreError naming `what`."""
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return _ABSENT
        except OSError as exc:
            raise StoreError(f"cannot read {what}: {os_problem(exc)}") from exc
        try:
            return mf.loads(data)
        except ValueError:
            return None

    def aliases(self, branch: str, name: str) -> dict[str, int]:
        found = self._read_json(self._dir(branch, name) / "aliases.json", f"the aliases of {name!r}")
        if found is _ABSENT:
            return {}
        if not isinstance(found, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in found.values()
        ):
            raise StoreDamaged(
                f"aliases.json of {name} on branch {branch!r} is damaged (not a JSON object of "
                "version numbers); calls by number or latest still work; restore it, or remove "
                f"it and set the aliases again (`framework alias set {name} ALIAS VERSION`)"
            )
        return found

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
        try:
            with self._locked(branch, name) as directory:
                current = self.aliases(branch, name)
                move_alias(current, name, alias, version)
                replace_atomically(directory / "aliases.json", mf.dumps(current))
        except OSError as exc:
            raise StoreError(f"cannot write aliases of {name!r} in {self.root}: {os_problem(exc)}") from exc

    def read_keys(self) -> dict[str, Any] | None:
        doc = self._read_json(self.root / "keys.json", "the store's API keys")
        if doc is _ABSENT:
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys", {}), dict):
            raise StoreDamaged(
                "keys.json (the store's API keys) is damaged (not a JSON object); restore it from "
                "a backup, or remove it and create keys again (`framework keys create`)"
            )
        return doc

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
                replace_atomically(path, data)
        except OSError as exc:
            raise StoreError(f"cannot write document {key!r} in the store: {os_problem(exc)}") from exc
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
        try:
            with open(self.root / ".keys.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                doc = self.read_keys() or {}
                change(doc)
                # Only hashes, but nobody else needs to read them.
                replace_atomically(self.root / "keys.json", mf.dumps(doc), mode=0o600)
        except OSError as exc:
            raise StoreError(f"cannot write API keys in {self.root}: {os_problem(exc)}") from exc
