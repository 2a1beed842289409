"""`--engine local`: worker processes on this machine (concurrent.futures).

Workers are forked from a `forkserver` that has imported the scoring code once,
so none inherits the driver's threads (the progress bar's) and none pays for
the imports again; they ignore SIGINT: Ctrl-C reaches the driver, which stops
them itself.
"""

from __future__ import annotations

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


def run(job: Job, parts: list[Partition], on_done: Callable[[dict[str, Any]], None], *,
        workers: int, address: str | None = None) -> None:
    if address:
        raise ConfigError("--address is for --engine dask or ray; the local engine runs here")
    ctx = multiprocessing.get_context("forkserver")
    # pandas too, when installed: pyarrow imports it on the first pa.array() of each process,
    # a cost better paid once here than in every worker (a missing module is skipped).
    ctx.set_forkserver_preload(["framework.batch.score", "pandas"])
    pool = ProcessPoolExecutor(max_workers=min(workers, len(parts)) or 1, mp_context=ctx,
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
