"""Leases in the store: which replica works on a job, and until when.

A lease is a small document `leases/<name>` holding its owner and its
expiry time. It is claimed with a create-only write, renewed and taken over
with writes conditioned on its etag, so two replicas can never both believe
they hold it; one that stops renewing (a dead replica) loses it once it
expires. Expiry is wall-clock time, compared across replicas: their clocks
must agree to well within a lease's length.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from typing import Any

import orjson

from framework.store.base import Store

log = logging.getLogger("framework.serve.jobs")


class Leases:
    def __init__(self, store: Store, seconds: float) -> None:
        self.store = store
        self.seconds = seconds
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"

    def _doc(self) -> bytes:
        return orjson.dumps({"owner": self.owner, "expires": time.time() + self.seconds})

    def claim(self, name: str) -> str | None:
        """The lease's etag when this replica now holds it, else None. Blocking (the store)."""
        key = f"leases/{name}"
        etag = self.store.write_doc(key, self._doc(), create=True)
        if etag is not None:
            return etag
        found = self.store.read_doc(key)
        if found is None:  # released in between: the next scan claims it
            return None
        if orjson.loads(found[0]).get("expires", 0) > time.time():
            return None  # another replica's, still alive
        return self.store.write_doc(key, self._doc(), etag=found[1])  # a dead one's: taken over

    def release(self, name: str, etag: str) -> None:
        """Give the lease up, unless another replica holds it by now. Blocking (the store)."""
        found = self.store.read_doc(f"leases/{name}")
        if found is not None and found[1] == etag:
            self.store.delete_doc(f"leases/{name}")

    async def keep(self, name: str, held: dict[str, Any], work: asyncio.Task[Any]) -> None:
        """Renew the lease in `held["etag"]` until cancelled; cancel `work` if it is lost."""
        while True:
            await asyncio.sleep(self.seconds / 3)
            try:
                etag = await asyncio.to_thread(self.store.write_doc, f"leases/{name}", self._doc(),
                                               etag=held["etag"])
            except Exception as exc:  # a store hiccup: the lease holds until it expires
                log.warning("job %s: cannot renew its lease (%s); trying again", name, exc)
                continue
            if etag is None:
                log.warning("job %s: lease lost to another replica; leaving the job to it", name)
                held["lost"] = True
                work.cancel()
                return
            held["etag"] = etag
