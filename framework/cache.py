"""Where a version is resolved and kept loaded, for the runtime.

`latest` and aliases are re-read from the store at most every `ttl` seconds,
so a running server sees a new version within about a second without a disk
read per request. A version number, once seen, never changes: it is cached
for good. Loaded versions live in a bounded LRU; each is loaded once even when
many requests ask for it at the same time.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any

from framework import packaging
from framework.errors import IncompatibleArtifact, IntegrityError, LoadFailed, NotFound
from framework.runner import Runner
from framework.store import Store, check_branch

Key = tuple[str, str, int]


class VersionCache:
    def __init__(self, store: Store, *, size: int, threads: int, inline_budget: float = 0.001,
                 ttl: float = 0.5) -> None:
        self.store = store
        self.size = size
        self.threads = threads
        self.inline_budget = inline_budget
        self.ttl = ttl
        self._refs: dict[tuple[str, str, str], tuple[int, float]] = {}
        self._loaded: OrderedDict[Key, Runner] = OrderedDict()
        self._loading: dict[Key, asyncio.Future[Runner]] = {}

    async def resolve(self, branch: str, name: str, ref: str) -> int:
        key = (branch, name, ref)
        hit = self._refs.get(key)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        check_branch(branch)
        version = await asyncio.to_thread(self.store.resolve, branch, name, ref)
        # A number is immutable once it exists; names move, so they expire.
        self._refs[key] = (version, float("inf") if ref.isdigit() else now + self.ttl)
        return version

    async def runner(self, branch: str, name: str, version: int) -> Runner:
        key = (branch, name, version)
        found = self._loaded.get(key)
        if found is not None:
            self._loaded.move_to_end(key)
            return found
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self._load, key))
            self._loading[key] = pending
            pending.add_done_callback(lambda f: self._loaded_done(key, f))
        return await asyncio.shield(pending)

    def _loaded_done(self, key: Key, fut: asyncio.Future[Runner]) -> None:
        self._loading.pop(key, None)
        if fut.cancelled() or fut.exception() is not None:
            return
        self._loaded[key] = fut.result()
        while len(self._loaded) > self.size:
            _, evicted = self._loaded.popitem(last=False)
            evicted.close()

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
                f"cannot load {name} v{version} ({branch}): {type(exc).__name__}: {exc}"
            ) from exc
        return Runner(loaded, threads=self.threads, inline_budget=self.inline_budget)

    def loaded(self) -> list[dict[str, Any]]:
        return [{"branch": b, "name": n, "version": v} for b, n, v in self._loaded]

    def close(self) -> None:
        for runner in self._loaded.values():
            runner.close()
        self._loaded.clear()
