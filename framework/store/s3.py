"""The S3-compatible store backend (`store: s3://bucket/prefix`), for many machines.

Layout under `<prefix>/` in the bucket::

    artifacts/<sha256>                                  artifact bytes, stored once
    branches/<branch, %-encoded>/<name>/versions/<N, 10 digits>.json   manifests
    branches/<branch>/<name>/refs.json                  {"latest": N, "aliases": {...}}
    keys.json                                           API keys (their sha256 only)
    docs/<key>                                          small shared documents

Object storage has no rename and no lock, so every change is a conditional
write. A version is claimed by writing its manifest with `If-None-Match: *`
(only one writer can create it; the others get 412, or 409 on some servers, and
try the next number). The artifact is written before its manifest, so any
manifest that exists is a complete version. `refs.json` and `keys.json` change
by compare-and-swap (`If-Match` on the ETag just read, retried on conflict) and
`latest` only moves forward. A publisher killed after claiming version N but
before moving `latest` leaves N complete but not latest: the next publish skips
past it and moves `latest`, and readers move `latest` up to it when they see it.

Refs and keys are re-read with conditional GETs (`If-None-Match`), so a server
polling them every half second mostly gets a bodiless 304. Manifests never
change once written and are kept in memory; artifacts go through a verified
local disk cache (`framework.store.artifact_cache`).

boto3 is imported only when an S3 store first talks to its bucket (`pip install "framework[s3]"`).
Credentials, region and endpoint come from the standard AWS chain (AWS_PROFILE,
AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL for S3-compatible servers, instance roles).
"""

from __future__ import annotations

import hashlib
import random
import time
from typing import Any, Callable
from urllib.parse import quote, unquote, urlsplit

from framework.store import manifest as mf
from framework.store.artifact_cache import SHA_RE, ArtifactCache
from framework.errors import IntegrityError, NotFound, StoreError
from framework.store.names import NAME_RE
from framework.store.s3objects import Bucket
from framework.store.base import Store, check_place, move_alias
from framework.store.names import check_alias, check_branch, check_doc_key

CAS_TRIES = 200  # compare-and-swap rounds before giving up: only reached under a storm of writers
CLAIM_TRIES = 1000  # version numbers tried by one publish
REPAIR_CHECK_S = 5.0  # how often a reader of `latest` looks for a version past it


class S3Store(Store):
    """A store in an S3 bucket (AWS, MinIO, Ceph, moto...) that honours conditional writes."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None,
                 cache: ArtifactCache | None = None) -> None:
        self.objects = Bucket(bucket, prefix, client=client)
        self.cache = cache if cache is not None else ArtifactCache()
        self._manifests: dict[tuple[str, str, int], tuple[bytes, str]] = {}  # immutable
        self._repair_checked: dict[str, float] = {}

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise StoreError(f"store {url!r}: write an S3 store as s3://bucket or s3://bucket/prefix")
        return cls(parts.netloc, parts.path)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    @property
    def url(self) -> str:
        return self.objects.url

    @property
    def bucket(self) -> str:
        return self.objects.bucket

    @property
    def client(self) -> Any:
        """The boto3 S3 client (created on first use)."""
        return self.objects.client

    def check_writable(self) -> None:
        self.objects.check_writable()

    # -- versions --------------------------------------------------------------

    def _dep(self, branch: str, name: str) -> str:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise NotFound(
                f"no deployment {name!r}: names use letters, digits, '_' or '-', starting with a "
                "letter or '_'; see GET /v1/ or `framework list`"
            )
        return f"branches/{quote(check_branch(branch), safe='')}/{name}"

    def _refs(self, dep: str) -> tuple[dict[str, Any], str | None]:
        found = self.objects.get(f"{dep}/refs.json", remember=True)
        if found is None:
            return {"latest": 0, "aliases": {}}, None
        return mf.loads(found[0]), found[1]

    def _change_refs(self, dep: str, change: Callable[[dict[str, Any]], bool]) -> None:
        """Compare-and-swap `refs.json`: `change` edits the document in place and
        returns False when there is nothing to write."""
        for attempt in range(CAS_TRIES):
            doc, etag = self._refs(dep)
            if not change(doc):
                return
            written = self.objects.put(f"{dep}/refs.json", mf.dumps(doc), etag=etag, create=etag is None)
            if written is not None:
                self.objects.remember(f"{dep}/refs.json", mf.dumps(doc), written)
                return
            time.sleep(random.uniform(0, min(0.2, 0.005 * 2 ** min(attempt, 6))))
        raise StoreError(f"too many concurrent changes to {dep} in {self.url}; retry")

    def _advance(self, dep: str, version: int) -> None:
        def forward(doc: dict[str, Any]) -> bool:
            if doc.get("latest", 0) >= version:
                return False  # `latest` only moves forward
            doc["latest"] = version
            return True
        self._change_refs(dep, forward)

    def publish(self, branch: str, name: str, artifact: bytes, manifest: dict[str, Any]) -> int:
        return self._publish(branch, name, artifact, manifest, None)[0]

    def publish_changed(self, branch: str, name: str, artifact: bytes, manifest: dict[str, Any],
                        same: Callable[[int], bool]) -> tuple[int, bool]:
        """As `Store.publish_changed`; a version claimed by a racer first is compared with
        this content too, so identical deploys racing publish one version."""
        latest = self.latest(branch, name)
        if latest is not None and same(latest):
            return latest, False
        return self._publish(branch, name, artifact, manifest, same, latest)

    def _publish(self, branch: str, name: str, artifact: bytes, manifest: dict[str, Any],
                 same: Callable[[int], bool] | None, seen: int | None = None) -> tuple[int, bool]:
        """`seen`: the latest version `same` was already checked against, if any."""
        dep = self._dep(branch, name)
        self.objects.check_conditional()
        sha = hashlib.sha256(artifact).hexdigest()
        if manifest.get("sha256") != sha:  # the artifact is found by the manifest's sha256
            raise StoreError(f"the manifest of {name!r} does not match its artifact (sha256); "
                             "package it again (`framework deploy`)")
        # Stored once: promote and rollback republish the same bytes and copy nothing.
        if not self.objects.exists(f"artifacts/{sha}"):
            self.objects.put(f"artifacts/{sha}", artifact, create=True)  # None: a racer stored the same bytes
        latest = self._refs(dep)[0].get("latest", 0)
        # A racer with the same content may have published and moved `latest` meanwhile.
        if same is not None and latest and latest != seen and same(latest):
            return latest, False
        version = latest + 1
        for _ in range(CLAIM_TRIES):
            body = self.sealed_manifest(artifact, manifest, branch, name, version)
            if self.objects.put(_manifest_key(dep, version), body, create=True) is not None:
                break
            # Taken: by a racer, or by a publisher that died before moving `latest`.
            if same is not None and same(version):
                self._advance(dep, version)
                return version, False
            version = max(version + 1, self._refs(dep)[0].get("latest", 0) + 1)
        else:
            raise StoreError(f"could not claim a version of {name!r} in {self.url}; retry the deploy")
        self._advance(dep, version)
        return version, True

    def versions(self, branch: str, name: str) -> list[int]:
        dep = self._dep(branch, name)
        found = sorted(int(k[:-5]) for k in self.objects.keys(f"{dep}/versions/")
                       if k.endswith(".json") and k[:-5].isdigit())
        if found and found[-1] > self._refs(dep)[0].get("latest", 0):
            try:
                self._advance(dep, found[-1])  # a publisher died before moving `latest`
            except StoreError:
                pass  # read-only credentials: a writer will repair it; the listing stands
        return found

    def latest(self, branch: str, name: str) -> int | None:
        dep = self._dep(branch, name)
        latest = self._refs(dep)[0].get("latest", 0)
        if latest == 0:
            # No refs.json: nothing was published (or only a v1 whose publisher died, which
            # the next publish or `framework versions` repairs). Names asked for by URLs
            # that do not exist must cost no listing and no memory here.
            return None
        now = time.monotonic()
        if now >= self._repair_checked.get(dep, 0.0):
            # At most every few seconds: is there a complete version past `latest`?
            self._repair_checked[dep] = now + REPAIR_CHECK_S
            if self.objects.exists(_manifest_key(dep, latest + 1)):
                latest = max(self.versions(branch, name)[-1], latest)
        return latest

    def resolve(self, branch: str, name: str, ref: str) -> int:
        # One conditional GET of refs.json instead of listing every version.
        where = f"deployment {name!r} on branch {branch!r}"
        latest = self.latest(branch, name)
        if latest is None:
            raise NotFound(f"{where} has no versions: deploy it first, or see `framework list` (GET /v1/)")
        if ref == "latest":
            return latest
        if ref.isascii() and ref.isdigit():
            try:
                self._manifest(branch, name, int(ref))
            except NotFound:
                raise NotFound(f"{where} has no version {int(ref)}: see `framework versions {name}`") from None
            return int(ref)
        aliases = self.aliases(branch, name)
        if ref not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise NotFound(f"{where} has no alias {ref!r} (aliases: {known}); use latest, a version "
                           "number or an alias")
        return aliases[ref]

    def _manifest(self, branch: str, name: str, version: int) -> tuple[bytes, str]:
        key = (branch, name, version)
        hit = self._manifests.get(key)
        if hit is None:
            found = self.objects.get(_manifest_key(self._dep(branch, name), version))
            if found is None:
                raise NotFound(f"deployment {name!r} on branch {branch!r} has no version {version}: "
                               f"see `framework versions {name}`")
            sha = mf.loads(found[0]).get("sha256")
            if not isinstance(sha, str) or not SHA_RE.match(sha):
                raise IntegrityError(f"the manifest of {name} v{version} ({branch}) names no valid "
                                     "sha256: the store was changed after deploy; redeploy it")
            hit = (found[0], sha)
            self._manifests[key] = hit  # a version never changes once written
        return hit

    def read_manifest(self, branch: str, name: str, version: int) -> dict[str, Any]:
        return check_place(mf.loads(self._manifest(branch, name, version)[0]), branch, name, version)

    def read_artifact(self, branch: str, name: str, version: int) -> bytes:
        sha = self._manifest(branch, name, version)[1]
        cached = self.cache.get(sha)
        if cached is not None:
            return cached
        found = self.objects.get(f"artifacts/{sha}")
        if found is None:
            raise NotFound(f"the artifact of {name!r} v{version} ({branch}) is missing from "
                           f"{self.url}; redeploy it")
        self.cache.put(sha, found[0])  # kept only when it matches its sha256
        return found[0]

    def branches(self) -> list[str]:
        return sorted(unquote(b) for b in self.objects.keys("branches/", delimiter=True))

    def names(self, branch: str) -> list[str]:
        found = self.objects.keys(f"branches/{quote(check_branch(branch), safe='')}/", delimiter=True)
        return sorted(n for n in found if NAME_RE.match(n))

    def aliases(self, branch: str, name: str) -> dict[str, int]:
        return dict(self._refs(self._dep(branch, name))[0].get("aliases") or {})

    def set_alias(self, branch: str, name: str, alias: str, version: int | None) -> None:
        check_alias(alias)
        dep = self._dep(branch, name)
        if version is not None:
            try:
                self._manifest(branch, name, version)
            except NotFound:
                raise NotFound(
                    f"cannot point alias {alias!r} at version {version}: deployment {name!r} on "
                    f"branch {branch!r} has versions {self.versions(branch, name) or 'none'}"
                ) from None

        def move(doc: dict[str, Any]) -> bool:
            move_alias(doc.setdefault("aliases", {}), name, alias, version)
            return True
        self._change_refs(dep, move)

    # -- API keys ----------------------------------------------------------------

    def read_keys(self) -> dict[str, Any] | None:
        found = self.objects.get("keys.json", remember=True)
        return None if found is None else mf.loads(found[0])

    def update_keys(self, change: Callable[[dict[str, Any]], None]) -> None:
        for attempt in range(CAS_TRIES):
            found = self.objects.get("keys.json", remember=True)
            doc = {} if found is None else mf.loads(found[0])  # a fresh copy for each try
            change(doc)
            data = mf.dumps(doc)
            written = self.objects.put("keys.json", data, etag=found and found[1], create=found is None)
            if written is not None:
                self.objects.remember("keys.json", data, written)
                return
            time.sleep(random.uniform(0, min(0.2, 0.005 * 2 ** min(attempt, 6))))
        raise StoreError(f"too many concurrent changes to the API keys in {self.url}; retry")

    # -- small documents -----------------------------------------------------------

    def read_doc(self, key: str) -> tuple[bytes, str] | None:
        return self.objects.get(f"docs/{check_doc_key(key)}")

    def write_doc(self, key: str, data: bytes, *, etag: str | None = None,
                  create: bool = False) -> str | None:
        return self.objects.put(f"docs/{check_doc_key(key)}", data, etag=etag, create=create)

    def delete_doc(self, key: str) -> None:
        self.objects.delete(f"docs/{check_doc_key(key)}")

    def list_docs(self, prefix: str) -> list[str]:
        return sorted(prefix + k for k in self.objects.keys(f"docs/{prefix}"))


def _manifest_key(dep: str, version: int) -> str:
    return f"{dep}/versions/{version:010d}.json"

