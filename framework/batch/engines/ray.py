"""`--engine ray`: Ray Data `map_batches` over the partitions, with a callable class
that loads the pinned version once per worker (actor).

A local Ray (no `--address`) is started on loopback only: Ray otherwise
replaces 127.0.0.1 with the machine's own address, so it is given a loopback
node address, no dashboard and no usage reporting.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from framework.batch.io import Partition
from framework.batch.score import Job, load, run_partition
from framework.errors import ConfigError

LOOPBACK_NODE = "127.0.0.2"


class _Scorer:
    """One per Ray worker: loads the version in its constructor, then scores partitions."""

    def __init__(self, job: Job, parts: list[Partition]) -> None:
        self.job = job
        self.parts = {p.index: p for p in parts}
        load(job)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[int]]:
        done = [run_partition(self.job, self.parts[int(i)]) for i in batch["index"]]
        return {key: [d[key] for d in done] for key in ("index", "rows", "failed")}


def run(job: Job, parts: list[Partition], on_done: Callable[[dict[str, Any]], None], *,
        workers: int, address: str | None = None) -> None:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError("--engine ray needs Ray Data: pip install 'framework[ray]'") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(_node_ip_address=LOOPBACK_NODE, include_dashboard=False, num_cpus=workers,
                     log_to_driver=False, configure_logging=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours is the one progress bar
        ds = ray.data.from_items([{"index": p.index} for p in parts],
                                 override_num_blocks=len(parts))
        scored = ds.map_batches(_Scorer, fn_constructor_args=(job, parts), batch_size=1,
                                batch_format="numpy", concurrency=max(1, min(workers, len(parts))),
                                num_cpus=1)
        for row in scored.iter_rows():
            on_done({k: int(v) for k, v in row.items()})
    finally:
        if started:
            ray.shutdown()
