"""`response_format: "links"`: answers kept in the store, served by signed URLs.

A link reads `<base>/v1/<deployment>/links/<expires>.<token>?sig=<hmac>`.
The signature (HMAC-SHA256 over the deployment and the link id, which holds
the expiry time) is made with a secret kept in the store, created once by
whichever replica needs it first, so any replica serves any replica's link.
The expiry is in the document's key too, so expired answers are cleaned up
from a listing alone.

A store that can hand out presigned GET URLs (an object store) offers
`presign_doc(key, seconds) -> str`; its URL is given instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from typing import Any

from framework.errors import Forbidden, Gone, StoreError
from framework.store.base import Store

log = logging.getLogger("framework.serve.links")

SECRET_KEY = "secrets/link-key"
PREFIX = "links/"


class Links:
    def __init__(self, store: Store, *, ttl: float, base_url: str = "") -> None:
        self.store = store
        self.ttl = ttl
        self.base_url = base_url.rstrip("/")
        self._secret: bytes | None = None

    def secret(self) -> bytes:
        """The signing secret, made on first use; blocking (the store)."""
        if self._secret is None:
            found = self.store.read_doc(SECRET_KEY)
            if found is None:
                # create=True: when two replicas race, one secret wins and both read it back.
                self.store.write_doc(SECRET_KEY, secrets.token_hex(32).encode(), create=True)
                found = self.store.read_doc(SECRET_KEY)
                if found is None:
                    raise StoreError("the link-signing secret vanished from the store right after "
                                     "it was written; check the store")
            self._secret = found[0]
        return self._secret

    def _sign(self, name: str, link_id: str) -> str:
        message = f"framework-link-v1\0{name}\0{link_id}".encode()
        return hmac.new(self.secret(), message, hashlib.sha256).hexdigest()

    def base(self, scope: dict[str, Any]) -> str:
        """Where this request reached the server, unless `server.link_base_url` says otherwise."""
        if self.base_url:
            return self.base_url
        host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), None)
        if host is None:
            server = scope.get("server") or ("127.0.0.1", 80)
            host = f"{server[0]}:{server[1]}"
        return f"{scope.get('scheme', 'http')}://{host}"

    def publish(self, base: str, name: str, payload: bytes) -> str:
        """Keep `payload` and return its URL; blocking (the store)."""
        link_id = f"{int(time.time() + self.ttl)}.{secrets.token_urlsafe(18)}"
        key = PREFIX + link_id
        self.store.write_doc(key, payload, create=True)
        presign = getattr(self.store, "presign_doc", None)
        if presign is not None:
            return str(presign(key, self.ttl))
        return f"{base}/v1/{name}/links/{link_id}?sig={self._sign(name, link_id)}"

    def read(self, name: str, link_id: str, sig: str) -> bytes:
        """The answer behind a link; Forbidden if it was altered, Gone once expired."""
        expires, _, token = link_id.partition(".")
        if not (expires.isascii() and expires.isdigit() and token) or not hmac.compare_digest(
                self._sign(name, link_id), sig):
            raise Forbidden("this link's signature does not match: it was altered or cut short; "
                            "use the URL exactly as the server answered it")
        if time.time() > int(expires):
            raise Gone("this link has expired; make the call again for a new one "
                       "(links last server.link_ttl_seconds)")
        found = self.store.read_doc(PREFIX + link_id)
        if found is None:
            raise Gone("this link's answer is no longer kept; make the call again for a new one")
        return found[0]

    def cleanup(self) -> int:
        """Delete expired answers; returns how many. Blocking (the store)."""
        now, removed = time.time(), 0
        for key in self.store.list_docs(PREFIX):
            expires = key[len(PREFIX):].partition(".")[0]
            if expires.isdigit() and int(expires) < now:
                self.store.delete_doc(key)
                removed += 1
        return removed

    async def publish_async(self, base: str, name: str, payload: bytes) -> str:
        return await asyncio.to_thread(self.publish, base, name, payload)
