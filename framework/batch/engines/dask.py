"""`--engine dask`: a dask.distributed scheduler (`--address`), or a LocalCluster on loopback.

Partitions are idempotent (each writes one part file by name), so Dask may
retry or duplicate a task freely. The scheduler's workers must see the same
store, input and output paths as the driver.
"""

from __future__ import annotations

from typing import Any, Callable

from framework.batch.io import Partition
from framework.batch.score import Job, run_partition
from framework.errors import ConfigError


def run(job: Job, parts: list[Partition], on_done: Callable[[dict[str, Any]], None], *,
        workers: int, address: str | None = None) -> None:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ConfigError("--engine dask needs dask.distributed: pip install 'framework[dask]'"
                          ) from None
    cluster = None
    if address:
        client = Client(address)
    else:
        # Loopback only, no dashboard: nothing listens beyond this machine.
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address=None)
        client = Client(cluster)
    try:
        futures = client.map(run_partition, [job] * len(parts), parts, retries=2, pure=False)
        try:
            for future in as_completed(futures):
                on_done(future.result())
        except BaseException:
            client.cancel(futures)
            raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
