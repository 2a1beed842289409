"""Where a version is resolved and kept loaded, for the runtime.

`latest` and aliases are kept fresh by `framework.serve.refresh.Refresher`, which
re-resolves every remembered ref on a timer whatever the traffic, so a running
server sees a new version within about a second without a store read per
request. Without it (an app whose lifespan did not run), a ref is re-read on a
thread once it is `ttl` seconds old, while callers keep the previous answer.
A version number, once seen, never changes: it is cached for good. Loaded
versions live in an LRU bounded in count (`cache_size`) and in bytes
(`cache_bytes`, a version counted at its artifact's size); each is loaded
once even when many requests ask for it at the same time, on a thread pool
of its own (a slow `setup` cannot starve the resolving of other
deployments). An evicted version is closed: its threads or worker processes
end once the calls it already has are done, and its memory is given back to
the system. A version that failed to load is not retried for `FAILED_TTL`
seconds.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import math
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from framework.execute import loading
from framework.execute.environments import Environments, requirements
from framework.errors import (
    CallTimeout,
    EnvironmentBuilding,
    FrameworkError,
    IncompatibleArtifact,
    IntegrityError,
    LoadFailed,
    NotFound,
)
from framework.execute.isolation import ProcessLane
from framework.protocol import error_text
from framework.execute.runner import Runner
from framework.store.base import Store
from framework.store.names import check_branch

Key = tuple[str, str, int]

FAILED_TTL = 5.0
LOAD_THREADS = 4
# After an eviction, memory is given back once the evicted version's last calls are done.
TRIM_AFTER_S = 0.2
# glibc's M_MMAP_THRESHOLD: allocations from this size up get pages of their own, given
# back to the system when freed. Left dynamic, glibc raises it to the largest block freed
# so far, and a model's arrays freed on eviction then stay in the heap.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
# Fixing one threshold fixes both, and M_TRIM_THRESHOLD stays at 128 KiB: a request that
# freed more than that at the top of the heap had it handed back, and the next one faulted
# it in again. Twice the mmap threshold is glibc's own ratio when it moves them;
# malloc_trim on eviction still gives back the rest.
M_TRIM_THRESHOLD = -1
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES


def _malloc_trim() -> Any:
    """glibc's malloc_trim, which hands freed heap back to the system; None elsewhere.
    Fixes the mmap and trim thresholds on the way, for the same reason."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is None:
            return None
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


class VersionCache:
    def __init__(self, store: Store, *, size: int, max_bytes: int = 0, isolation: str = "thread",
                 worker_nice: int = 0, environments: Environments | None = None,
                 ttl: float = 0.5) -> None:
        self.store = store
        self.size = size
        self.max_bytes = max_bytes  # 0: no bound in bytes
        self.isolation = isolation  # the server's default; @deployment(isolation=...) wins
        self.worker_nice = worker_nice
        self.environments = environments or Environments()
        self.building: dict[Key, str] = {}  # versions whose environment is being built: its key
        self.ttl = ttl
        self.bytes = 0
        self._trim = _malloc_trim()
        self._trim_pending = False
        self.background = False  # a Refresher keeps `_refs` fresh: they never expire
        self._refreshing: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self._refs: dict[tuple[str, str, str], tuple[int, float]] = {}
        self._loaded: OrderedDict[Key, Runner] = OrderedDict()
        self._loading: dict[Key, asyncio.Future[Runner]] = {}
        self._failed: dict[Key, tuple[LoadFailed, float]] = {}
        self._load_pool = ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="load")
        self._warming: set[asyncio.Future[None]] = set()  # kept referenced until done

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
            return
        before = self._refs.get(key)
        self._remember(key, version)
        if before is not None and before[0] != version and (key[0], key[1], before[0]) in self._loaded:
            # It named a version in use: the one it names now will be.
            task = asyncio.ensure_future(self.warm((key[0], key[1], version)))
            self._warming.add(task)
            task.add_done_callback(self._warming.discard)

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
        pending = self._loading.get(key) or self._start_load(key)
        try:  # the load goes on for later callers when this one gives up
            return await asyncio.wait_for(asyncio.shield(pending), timeout)
        except asyncio.TimeoutError:
            if key in self.building:
                raise EnvironmentBuilding(
                    f"the environment of {name} v{version} ({self.building[key]}) is being built; "
                    "retry in a while, or build it ahead with `framework build` or server.prebuild"
                ) from None
            raise CallTimeout(
                f"{name} v{version} did not load within {timeout:g} s; retry in a moment, or "
                'send a larger "timeout_seconds"'
            ) from None

    def _start_load(self, key: Key) -> asyncio.Future[Runner]:
        pending = asyncio.ensure_future(
            asyncio.get_running_loop().run_in_executor(self._load_pool, self._load, key))
        self._loading[key] = pending
        pending.add_done_callback(lambda f: self._loaded_done(key, f))
        return pending

    async def warm(self, key: Key) -> None:
        """Load `key` in the background unless it is loaded, loading or failing: a version
        `latest` or an alias just moved to, so no caller pays its load. One whose
        environment is not built is left to its first call (or server.prebuild)."""
        try:
            manifest = await asyncio.to_thread(self.store.read_manifest, *key)
            if await asyncio.to_thread(self.environments.needs_build, manifest):
                return
        except FrameworkError:
            return  # its first caller gets the error
        failed = self._failed.get(key)
        if key in self._loaded or key in self._loading or (failed and failed[1] > time.monotonic()):
            return
        self._start_load(key)

    def _loaded_done(self, key: Key, fut: asyncio.Future[Runner]) -> None:
        self._loading.pop(key, None)
        if fut.cancelled():
            return
        if fut.exception() is not None:
            if isinstance(fut.exception(), LoadFailed):
                self._failed[key] = (fut.exception(), time.monotonic() + FAILED_TTL)
            return
        runner = fut.result()
        self._loaded[key] = runner
        self.bytes += runner.size_bytes
        evicted = False
        while len(self._loaded) > self.size or (
                self.max_bytes and self.bytes > self.max_bytes and len(self._loaded) > 1):
            _, old = self._loaded.popitem(last=False)
            self.bytes -= old.size_bytes
            old.close()  # calls it already has still run; then its threads or workers end
            evicted = True
        if evicted and not self._trim_pending:
            self._trim_pending = True
            asyncio.get_running_loop().call_later(TRIM_AFTER_S, self._give_back)

    def _give_back(self) -> None:
        """Collect what evicted versions left (model objects in cycles), then hand the
        freed heap back to the system, off the event loop."""
        self._trim_pending = False

        def collect() -> None:
            gc.collect()
            if self._trim is not None:
                self._trim(0)

        try:
            self._load_pool.submit(collect)
        except RuntimeError:  # shutting down
            pass

    def _load(self, key: Key) -> Runner:
        branch, name, version = key
        manifest = self.store.read_manifest(branch, name, version)
        artifact = self.store.read_artifact(branch, name, version)
        options = manifest.get("options") or {}
        concurrency = options.get("concurrency", 1)
        python = None
        if self.environments.needs(manifest):  # not this Python, or packages this one lacks
            self.building[key] = ", ".join(requirements(manifest)) or f"Python {manifest.get('python')}"
            try:
                python = str(self.environments.ensure(manifest))
            finally:
                del self.building[key]
        if python is not None or (options.get("isolation") or self.isolation) == "process":
            label = f"{name} v{version} ({branch})"
            # Unpickled in the worker, not here.
            lane = ProcessLane(concurrency, label, artifact, manifest, python=python or sys.executable,
                               nice=self.worker_nice)
            runner = Runner(manifest, lane, signature=lane.signature)
        else:
            runner = self._load_here(manifest, artifact, concurrency)
        runner.size_bytes = len(artifact)
        return runner

    def _load_here(self, manifest: dict[str, Any], artifact: bytes, concurrency: int) -> Runner:
        name, version, branch = manifest["name"], manifest["version"], manifest["branch"]
        try:
            loaded = loading.load(artifact, manifest)
        except (IntegrityError, IncompatibleArtifact, NotFound):
            raise
        except Exception as exc:  # noqa: BLE001 - unpickling or setup ran user code
            raise LoadFailed(
                f"cannot load {name} v{version} ({branch}); deploy a fixed version or roll back "
                f"(`framework rollback {name}`):\n{error_text(exc)}"
            ) from exc
        return Runner(manifest, fn=loaded.fn, concurrency=concurrency,
                      is_async=asyncio.iscoroutinefunction(loaded.fn))

    def loaded(self) -> list[dict[str, Any]]:
        return [{"branch": b, "name": n, "version": v} for b, n, v in self._loaded]

    def close(self) -> None:
        self._load_pool.shutdown(wait=False, cancel_futures=True)
        for runner in self._loaded.values():
            runner.close()
        self._loaded.clear()
