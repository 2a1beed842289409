"""`--engine local`: worker processes on this machine (concurrent.futures).

Workers are forked from the driver when it runs no other thread: they start
at once, with its imports (pyarrow, the scoring code) already done. With a
thread running (the progress bar's on a terminal), a fork could copy a lock
that thread holds, so the workers are forked from a `forkserver` instead,
which imports the scoring code once. Either way the version is loaded once per
worker. Workers ignore SIGINT: Ctrl-C reaches the driver, which stops them.
"""

from __future__ import annotations

import importlib
import multiprocessing
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from framework.batch.io import Partition
from framework.batch.score import Job, run_partition
from framework.errors import ConfigError, DeploymentFailed


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# pandas too, when installed: pyarrow imports it on the first pa.array() of each process,
# a cost better paid once before the workers start than in every one of them.
PRELOAD = ["framework.batch.score", "pandas"]


def _context() -> multiprocessing.context.BaseContext:
    # A fork started with only this thread copies no lock another thread holds. (The pool
    # forks all its workers on the first submit, before it starts a thread of its own.)
    if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
        for module in PRELOAD:
            try:
                importlib.import_module(module)
            except ImportError:
                pass
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # a missing module is skipped
    return ctx


def run(job: Job, parts: list[Partition], on_done: Callable[[dict[str, Any]], None], *,
        workers: int, address: str | None = None) -> None:
    if address:
        raise ConfigError("--address is for --engine dask or ray; the local engine runs here")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(parts)) or 1, mp_context=_context(),
                               initializer=_ignore_sigint)
    # Ctrl-C sets a flag that the loop below acts on between waits: a KeyboardInterrupt
    # raised anywhere (inside `submit`, or `wait` holding the futures' locks) could leave a
    # lock taken, and the shutdown below hanging on it.
    interrupted = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        pending: set[Future[dict[str, Any]]] = {pool.submit(run_partition, job, p) for p in parts}
        while pending:
            if interrupted.is_set():
                raise KeyboardInterrupt
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    on_done(future.result())
                except BrokenProcessPool as exc:
                    raise DeploymentFailed(
                        f"a worker process died while scoring {job.name} v{job.version} ({exc}); "
                        "the deployment ended its process (os._exit, a crash, out of memory): "
                        "fix it, or give fewer --workers if memory ran out"
                    ) from None
        if interrupted.is_set():
            raise KeyboardInterrupt
    except BaseException:
        # concurrent.futures cannot stop a running task; end its processes (by PID) instead.
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            proc.terminate()
        for proc in processes:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    pool.shutdown()
