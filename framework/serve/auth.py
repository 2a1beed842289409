"""API keys: created by `framework keys`, checked by a small ASGI middleware.

Keys are on once the store holds a keys document (the first `framework keys
create`), or from the start with `server.require_api_keys: true`; revoking
every key then locks every call out rather than opening the server again.
The store keeps only each key's sha256: a key is random (256 bits), so a
plain hash is enough, and a leaked store leaks no usable key.

A key reads `fw_<id>_<secret>`. The id is public (in `keys list`, in logs);
the secret is shown once, at creation. Protected: every route but health
(`/healthz`, `/livez`, `/readyz`) and `/metrics`, which stay open so probes
and scrapers need no key. Protection is decided on the path the router
matches, with the ASGI `root_path` taken off as Starlette's router does, so
the app mounted under a prefix (`Mount("/ml", app)`) or served behind a proxy
(`framework serve --root-path /ml`) is protected the same way.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from framework.serve.scope import SCOPE_ERROR, SCOPE_KEY
from framework.errors import (
    Forbidden,
    FrameworkError,
    NotFound,
    StoreDamaged,
    StoreError,
    Unauthorized,
)
from framework.store.names import check_name
from framework.store.base import Store

log = logging.getLogger("framework.serve.auth")

PREFIX = "fw_"
# Compared against when the id is unknown, so a wrong id costs the same time as a wrong secret.
_DUMMY = hashlib.sha256(b"no such key").hexdigest()


@dataclass(frozen=True)
class Key:
    id: str
    sha256: str
    deployments: frozenset[str] | None  # None: every deployment

    def allows(self, name: str) -> bool:
        return self.deployments is None or name in self.deployments


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def _id_of(key: str) -> str:
    head, _, rest = key.removeprefix(PREFIX).partition("_")
    return head if key.startswith(PREFIX) and rest else ""


# -- managing keys (the CLI) -------------------------------------------------


def create_key(store: Store, *, deployments: list[str] | None = None, note: str = "") -> tuple[str, str]:
    """Make a key, store its hash; returns (id, key). The key cannot be shown again."""
    for name in deployments or ():
        check_name(name)
    key_id = secrets.token_hex(4)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"

    def add(doc: dict[str, Any]) -> None:
        doc.setdefault("keys", {})[key_id] = {
            "sha256": _hash(key),
            "deployments": sorted(set(deployments)) if deployments else None,
            "note": note,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "revoked_at": None,
        }

    store.update_keys(add)
    return key_id, key


def list_keys(store: Store) -> list[dict[str, Any]]:
    """Every key ever created (revoked ones included), without hashes."""
    entries = ((store.read_keys() or {}).get("keys") or {}).items()
    return [{"id": k, **{f: v for f, v in e.items() if f != "sha256"}} for k, e in sorted(entries)]


def revoke_key(store: Store, key_or_id: str) -> str:
    """Revoke a key by its id (or the key itself); returns the id."""
    key_id = _id_of(key_or_id) or key_or_id

    def revoke(doc: dict[str, Any]) -> None:
        entry = (doc.get("keys") or {}).get(key_id)
        if entry is None:
            raise NotFound(f"no API key with id {key_id!r}; see `framework keys list`")
        entry["revoked_at"] = entry.get("revoked_at") or dt.datetime.now(
            dt.timezone.utc).isoformat(timespec="seconds")

    store.update_keys(revoke)
    return key_id


# -- checking keys (the runtime) ---------------------------------------------


def _active(doc: dict[str, Any] | None) -> dict[str, Key]:
    out = {}
    for key_id, e in ((doc or {}).get("keys") or {}).items():
        if not e.get("revoked_at"):
            limited = e.get("deployments")
            out[key_id] = Key(key_id, e["sha256"], None if limited is None else frozenset(limited))
    return out


class KeyRing:
    """The store's keys as the runtime sees them.

    Re-read by `framework.serve.refresh.Refresher` on a timer, whatever the traffic;
    without it (an app whose lifespan did not run), at most every `ttl` seconds
    when a request comes.
    """

    def __init__(self, store: Store, *, required: bool, ttl: float = 0.5) -> None:
        self.store = store
        self.required = required
        self.ttl = ttl
        self.background = False  # a Refresher calls `apply`; requests never start a read
        self._reading: asyncio.Future[Any] | None = None
        try:
            doc = store.read_keys()
        except StoreDamaged as exc:  # keys were on: a damaged document must not open the server
            log.error("%s; every protected call is refused until it is fixed", exc)
            doc = {"keys": {}}
        self.apply(doc)
        self._expires = time.monotonic() + ttl

    def apply(self, doc: dict[str, Any] | None) -> None:
        """Take `doc` (the store's keys document, None when there is none) as the keys now."""
        self.enabled = self.required or doc is not None
        self.keys = _active(doc)

    def refresh(self) -> None:
        """Start re-reading the keys on a thread when they are due; callers never wait.

        Requests keep the previous view until the read ends: a hung store cannot
        freeze the server, and a revoked key stops working within ttl + one read.
        """
        now = time.monotonic()
        if self.background or now < self._expires or self._reading is not None:
            return
        self._expires = now + self.ttl
        self._reading = asyncio.ensure_future(asyncio.to_thread(self.store.read_keys))
        self._reading.add_done_callback(self._read)

    def _read(self, done: asyncio.Future[Any]) -> None:
        self._reading = None
        if done.cancelled():  # the server is shutting down
            return
        try:
            doc = done.result()
        except (StoreError, StoreDamaged, ValueError) as exc:
            log.error("cannot re-read API keys, keeping the previous ones: %s", exc)
            return
        self.apply(doc)

    def check(self, header: str | None, name: str | None) -> Key:
        """The caller's key, or Unauthorized / Forbidden. `name` is None for listings."""
        if not header:
            raise Unauthorized(
                "this server requires an API key: send it as the Authorization header "
                "(`Authorization: <key>` or `Authorization: Bearer <key>`); "
                "an operator creates one with `framework keys create`"
            )
        key = header[7:] if header[:7].lower() == "bearer " else header
        key = key.strip()
        found = self.keys.get(_id_of(key))
        matches = hmac.compare_digest(_hash(key), found.sha256 if found else _DUMMY)
        if found is None or not matches:
            raise Unauthorized(
                "invalid or revoked API key; check the Authorization header, or ask an operator "
                "for a key (`framework keys create`)"
            )
        if name is not None and not found.allows(name):
            raise Forbidden(
                f"API key {found.id} is not allowed on deployment {name!r} (it is limited to "
                f"{', '.join(sorted(found.deployments or ()))}); use a key for {name!r}"
            )
        return found


def visible(scope: Scope, name: str) -> bool:
    """Whether the caller's key (if any) may see deployment `name`, for listings."""
    key = scope.get(SCOPE_KEY)
    return key is None or key.allows(name)


OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})


def route_path(scope: Scope) -> str:
    """The path the router matches: `path` without the `root_path` it starts with
    (as `starlette.routing` computes it, whose helper is private)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):]
    return path


def _protected(path: str) -> tuple[bool, str | None]:
    """(needs a key, deployment name or None) for a route path: everything but the
    open paths needs one, so a path this does not know is refused, never opened."""
    if path in OPEN_PATHS:
        return False, None
    if path.startswith("/v1/batches/"):  # any valid key; the route checks the batch's deployment
        return True, None
    if path.startswith("/v1/"):
        return True, path.split("/", 3)[2] or None
    return True, None


class AuthMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): with keys off it costs one attribute check."""

    def __init__(self, app: ASGIApp, ring: KeyRing, on_error: Callable[[FrameworkError], Response]) -> None:
        self.app = app
        self.ring = ring
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.ring.refresh()
            if self.ring.enabled:
                needed, name = _protected(route_path(scope))
                if needed:
                    header = next((v.decode("latin-1") for k, v in scope["headers"]
                                   if k == b"authorization"), None)
                    try:
                        scope[SCOPE_KEY] = self.ring.check(header, name)
                    except FrameworkError as exc:
                        scope[SCOPE_ERROR] = exc
                        await self.on_error(exc)(scope, receive, send)
                        return
        await self.app(scope, receive, send)
