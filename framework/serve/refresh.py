"""The background refresher: what requests are answered with stays fresh without them.

Every `interval` seconds, whatever the traffic, one pass on a thread
re-resolves every name the runtime has remembered (`latest`, aliases) and
re-reads the API keys; the results are applied on the event loop. A ref that
is gone (an alias removed) is dropped, so the next request asks the store and
gets its 404. Requests themselves never read the store for a ref they know:
the first request after an idle spell gets today's answer, not the answer of
the last request before the spell (DESIGN section 8).

A pass that fails or hangs (a hung network mount) only delays the next one;
requests keep the previous view meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

from framework.errors import FrameworkError, NotFound

if TYPE_CHECKING:
    from framework.execute.versions import VersionCache

log = logging.getLogger("framework.serve.refresh")

INTERVAL_S = 0.3

RefKey = tuple[str, str, str]


class KeyRing(Protocol):
    """What the refresher needs of `framework.serve.auth.KeyRing` (not imported: auth sits
    with the app's modules)."""

    background: bool

    def apply(self, doc: dict[str, Any] | None) -> None: ...


class Refresher:
    """Re-resolves the cache's refs and re-reads the key ring on a timer; started and
    stopped by the app's lifespan."""

    def __init__(self, versions: VersionCache, ring: KeyRing, interval: float = INTERVAL_S) -> None:
        self.versions = versions
        self.ring = ring
        self.interval = interval
        self.passes = 0  # completed passes over the refs
        self._tasks: list[asyncio.Task[None]] = []
        self._warned: dict[Any, str] = {}  # what was last logged per ref: once, not every pass

    def start(self) -> None:
        self.versions.background = True
        self.ring.background = True
        # Two timers, so a hung aliases file cannot hold up a key's revocation, nor the reverse.
        self._tasks = [asyncio.ensure_future(self._run(self.refresh_refs)),
                       asyncio.ensure_future(self._run(self.refresh_keys))]

    async def stop(self) -> None:
        self.versions.background = False
        self.ring.background = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _run(self, step: Any) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the timer must outlive any one bad pass
                log.exception("background refresh failed; retrying in %.1f s", self.interval)

    async def refresh_refs(self) -> None:
        """One pass over the refs: read on a thread, apply here on the loop."""
        resolved = await asyncio.to_thread(self._resolve, self.versions.moving_refs())
        for key, outcome in resolved.items():
            self.versions.refreshed(key, outcome)
        self.passes += 1

    async def refresh_keys(self) -> None:
        keys = await asyncio.to_thread(self._keys)
        if keys is not None:
            self.ring.apply(keys[0])

    def _resolve(self, refs: list[RefKey]) -> dict[RefKey, int | None]:
        store = self.versions.store
        resolved: dict[RefKey, int | None] = {}
        for key in refs:
            try:
                resolved[key] = store.resolve(*key)
            except NotFound:
                resolved[key] = None  # gone: forget it, the next request gets the 404
            except FrameworkError as exc:  # unreadable for now: keep what requests have
                self._warn(key, f"cannot re-resolve {key[1]}@{key[2]} (branch {key[0]!r}), "
                                f"keeping the previous answer: {exc}")
            else:
                self._warned.pop(key, None)
        return resolved

    def _keys(self) -> tuple[Any] | None:
        """(the keys document,), or None when it cannot be read now."""
        try:
            keys = (self.versions.store.read_keys(),)
        except (FrameworkError, ValueError) as exc:
            self._warn("keys", f"cannot re-read API keys, keeping the previous ones: {exc}")
            return None
        self._warned.pop("keys", None)
        return keys

    def _warn(self, what: Any, message: str) -> None:
        if self._warned.get(what) != message:
            self._warned[what] = message
            log.error("%s", message)
