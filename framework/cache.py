"""Where a version is resolved and kept loaded, for the runtime.

`latest` and aliases are kept fresh by `framework.refresh.Refresher`, which
re-resolves every remembered ref on a timer whatever the traffic, so a running
server sees a new version within about a second without a store read per
request. Without it (an app whose lifespan did not run), a ref is re-read on a
thread once it is `ttl` seconds old, while callers keep the previous answer.
A version number, once seen, never changes: it is cached for good. Loaded
versions live in a bounded LRU; each is loaded once even when many requests
ask for it at the same time, on a thread pool of its own (a slow `setup`
cannot starve the resolving of other deployments). A version that failed to
load is not retried for `FAILED_TTL` seconds.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from framework import packaging
from framework.errors import (
    CallTimeout,
    FrameworkError,
    IncompatibleArtifact,
    IntegrityError,
    LoadFailed,
    NotFound,
)
from framework.inline import DEFAULT_WAIT_BUDGET
from framework.preempt import Watchdog
from framework.protocol import error_text
from framework.runner import Runner
from framework.store import Store, check_branch

Key = tuple[str, str, int]
FAILED_TTL = 5.0
LOAD_THREADS = 4


class VersionCache:
    def __init__(self, store: Store, *, size: int, threads: int, inline_budget: float = 0.0,
                 wait_budget: float = DEFAULT_WAIT_BUDGET,
                 ttl: float = 0.5) -> None:
        self.store = store
        self.size = size
        self.threads = threads
        self.inline_budget = inline_budget
        self.wait_budget = wait_budget
        self.ttl = ttl
        self.watchdog: Watchdog | None = None  # set at startup, on the event loop's thread
        self.background = False  # a Refresher keeps `_refs` fresh: they never expire
        self._refreshing: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self._refs: dict[tuple[str, str, str], tuple[int, float]] = {}
        self._loaded: OrderedDict[Key, Runner] = OrderedDict()
        self._loading: dict[Key, asyncio.Future[Runner]] = {}
        self._failed: dict[Key, tuple[LoadFailed, float]] = {}
        self._load_pool = ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="load")

    def cached(self, branch: str, name: str, ref: str) -> Runner | None:
        """The loaded version `ref` names, where both are in memory and fresh: the
        path of most requests, with no coroutine to await."""
        hit = self._refs.get((branch, name, ref))
        if hit is None or (not self.background and hit[1] <= time.monotonic()):
            return None  # `resolve` reads it, or starts its refresh
        return self._used((branch, name, hit[0]))

    def _used(self, key: Key) -> Runner | None:
        """The loaded version, now the most recently used; None if not loaded."""
        found = self._loaded.get(key)
        if found is not None:
            self._loaded.move_to_end(key)
        return found

    async def resolve(self, branch: str, name: str, ref: str) -> int:
        if ref.isascii() and ref.isdigit():
            if len(ref) > 18:  # no such version, and int() refuses over 4,300 digits
                raise NotFound(f"deployment {name!r} on branch {branch!r} has no version "
                               f"{ref[:20]}...: see `framework versions {name}`")
            ref = str(int(ref))  # "01" and "1" share one entry, so URLs cannot grow the cache
        key = (branch, name, ref)
        hit = self._refs.get(key)
        if hit is not None:
            if (not self.background and hit[1] <= time.monotonic()
                    and key not in self._refreshing):
                # Re-read on a thread while callers keep the previous answer: neither a
                # hung store nor the thread handoff ever holds up a request.
                self._refreshing[key] = asyncio.ensure_future(self._refresh(key))
            return hit[0]
        check_branch(branch)
        return self._remember(key, await asyncio.to_thread(self.store.resolve, branch, name, ref))

    def _remember(self, key: tuple[str, str, str], version: int) -> int:
        # A number is immutable once it exists; names move, so they expire.
        self._refs[key] = (version, math.inf if key[2].isdigit() else time.monotonic() + self.ttl)
        return version

    def moving_refs(self) -> list[tuple[str, str, str]]:
        """The remembered refs that can move (`latest`, aliases), for the refresher."""
        return [key for key in self._refs if not key[2].isdigit()]

    def refreshed(self, key: tuple[str, str, str], version: int | None) -> None:
        """What the refresher read for `key`: its version now, or None when it is gone."""
        if version is None:
            self._refs.pop(key, None)
        else:
            self._remember(key, version)

    async def _refresh(self, key: tuple[str, str, str]) -> None:
        try:
            self._remember(key, await asyncio.to_thread(self.store.resolve, *key))
        except FrameworkError:  # gone (an alias removed) or unreadable: the next caller asks afresh
            self._refs.pop(key, None)
        finally:
            del self._refreshing[key]

    async def runner(self, branch: str, name: str, version: int, timeout: float) -> Runner:
        """The loaded version; loading it may take at most `timeout` seconds of this call."""
        key = (branch, name, version)
        found = self._used(key)
        if found is not None:
            return found
        failed = self._failed.get(key)
        if failed is not None and failed[1] > time.monotonic():
            raise failed[0]
        pending = self._loading.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = asyncio.ensure_future(loop.run_in_executor(self._load_pool, self._load, key))
            self._loading[key] = pending
            pending.add_done_callback(lambda f: self._loaded_done(key, f))
        try:  # the load goes on for later callers when this one gives up
            return await asyncio.wait_for(asyncio.shield(pending), timeout)
        except asyncio.TimeoutError:
            raise CallTimeout(
                f"{name} v{version} did not load within {timeout:g} s; retry in a moment, or "
                'send a larger "timeout_seconds"'
            ) from None

    def _loaded_done(self, key: Key, fut: asyncio.Future[Runner]) -> None:
        self._loading.pop(key, None)
        if fut.cancelled():
            return
        if fut.exception() is not None:
            if isinstance(fut.exception(), LoadFailed):
                self._failed[key] = (fut.exception(), time.monotonic() + FAILED_TTL)
            return
        self._loaded[key] = fut.result()
        # An evicted version is only dropped, not closed: requests may still be
        # running or queued on its threads. Its threads exit once idle for a while
        # (`framework.threads.IDLE_EXIT_S`).
        while len(self._loaded) > self.size:
            self._loaded.popitem(last=False)

    def _load(self, key: Key) -> Runner:
        branch, name, version = key
        manifest = self.store.read_manifest(branch, name, version)
        artifact = self.store.read_artifact(branch, name, version)
        try:
            loaded = packaging.load(artifact, manifest)
        except (IntegrityError, IncompatibleArtifact, NotFound):
            raise
        except Exception as exc:  # noqa: BLE001 - unpickling or setup ran user code
            raise LoadFailed(
                f"cannot load {name} v{version} ({branch}); deploy a fixed version or roll back "
                f"(`framework rollback {name}`):\n{error_text(exc)}"
            ) from exc
        return Runner(loaded, threads=self.threads, inline_budget=self.inline_budget,
                      wait_budget=self.wait_budget, watchdog=self.watchdog)

    def loaded(self) -> list[dict[str, Any]]:
        return [{"branch": b, "name": n, "version": v} for b, n, v in self._loaded]

    def close(self) -> None:
        self._load_pool.shutdown(wait=False, cancel_futures=True)
        for runner in self._loaded.values():
            runner.close()
        self._loaded.clear()
