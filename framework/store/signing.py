"""Signed artifacts: HMAC-SHA256 over an artifact and its manifest.

With $FRAMEWORK_SIGNING_KEY set, `framework deploy` adds a `signed` field to
each manifest, and a runtime with the key set refuses any version whose
signature is missing, made with another key, or no longer matches the bytes,
before a single byte of the pickle is run.

What is signed: the artifact's sha256 (recomputed, never read from the
manifest) and the whole manifest but `signed`, so its name, branch and
version too. The store signs at publish, once it has claimed the version
number (`Store.sealed_manifest`), and refuses a manifest read from another
place than the one it names (`base.check_place`): a signed version copied,
linked or renamed elsewhere in the store is refused like a tampered one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from framework.store import manifest as mf
from framework.errors import ConfigError, IntegrityError

ENV = "FRAMEWORK_SIGNING_KEY"
ALGORITHM = "HMAC-SHA256"
MIN_KEY_CHARS = 16
UNSIGNED_FIELDS = ("signed",)
# Signatures of format 1 left the version out; they cannot bind a version to its place.
FORMAT = 2


def current_key() -> bytes | None:
    """The signing key from $FRAMEWORK_SIGNING_KEY, or None when signing is off."""
    raw = os.environ.get(ENV)
    if not raw:
        return None
    if len(raw) < MIN_KEY_CHARS:
        raise ConfigError(
            f"${ENV} is {len(raw)} characters long; use at least {MIN_KEY_CHARS} random ones, "
            "e.g. the output of  python -c 'import secrets; print(secrets.token_hex(32))'"
        )
    return raw.encode()


def key_id(key: bytes) -> str:
    """A short public name for a key, so an error can say *which* key signed."""
    return hashlib.sha256(b"framework key id\0" + key).hexdigest()[:12]


def _mac(key: bytes, artifact_sha256: str, manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k not in UNSIGNED_FIELDS}
    message = b"framework-artifact-v2\0" + artifact_sha256.encode() + b"\0" + mf.dumps(body)
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(artifact: bytes, manifest: dict[str, Any], key: bytes) -> dict[str, str]:
    """The `signed` field for a manifest (which must not be changed afterwards)."""
    digest = hashlib.sha256(artifact).hexdigest()
    return {"algorithm": ALGORITHM, "format": FORMAT, "key_id": key_id(key),
            "hmac": _mac(key, digest, manifest)}


def signed_with(manifest: dict[str, Any], key: bytes | None) -> bool:
    """Whether a stored manifest carries a signature by `key` (True when signing is off)."""
    if key is None:
        return True
    signed = manifest.get("signed")
    return (isinstance(signed, dict) and signed.get("key_id") == key_id(key)
            and signed.get("format") == FORMAT)


def verify(artifact: bytes, manifest: dict[str, Any], key: bytes) -> None:
    """Raise IntegrityError unless `manifest` carries a valid signature of `artifact` by `key`."""
    where = named(manifest)
    signed = manifest.get("signed")
    if not isinstance(signed, dict) or not isinstance(signed.get("hmac"), str):
        raise IntegrityError(
            f"{where} is not signed, and this server requires signatures (${ENV} is set): "
            f"redeploy it with ${ENV} set to the server's key"
        )
    if signed.get("key_id") != key_id(key):
        raise IntegrityError(
            f"{where} was signed with another key (key id {signed.get('key_id')}, this server's "
            f"is {key_id(key)}): redeploy it with the server's ${ENV}"
        )
    if signed.get("format") != FORMAT:
        raise IntegrityError(
            f"{where} carries a signature of an older format that does not cover its branch, name "
            f"and version: redeploy it with ${ENV} set"
        )
    expected = _mac(key, hashlib.sha256(artifact).hexdigest(), manifest)
    if not hmac.compare_digest(expected, signed["hmac"]):
        raise IntegrityError(
            f"{where} does not match its signature: its artifact or manifest was changed after "
            "deploy; redeploy it from source and check who can write to the store"
        )


def named(manifest: dict[str, Any]) -> str:
    """`name vN on branch 'b'`: how an artifact's errors name it."""
    return f"{manifest.get('name')} v{manifest.get('version')} on branch {manifest.get('branch')!r}"


def check_integrity(artifact: bytes, manifest: dict[str, Any], key: bytes | None) -> None:
    """Refuse an artifact that does not match its manifest, or its signature when `key` is set."""
    if key is not None:
        verify(artifact, manifest, key)
    digest = hashlib.sha256(artifact).hexdigest()
    if digest != manifest.get("sha256"):
        raise IntegrityError(
            f"artifact of {named(manifest)} does not match its manifest (sha256 {digest[:12]} != "
            f"{str(manifest.get('sha256'))[:12]}): the store was changed after deploy; redeploy it"
        )
