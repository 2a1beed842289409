"""Thin adapters that run `framework.batch.score.run_partition` over partitions.

Each module has `run(job, parts, on_done, *, workers, address)`: it calls
`run_partition(job, part)` once per partition somewhere, and `on_done(summary)`
on the driver as each finishes. Raising (KeyboardInterrupt included) must stop
every worker it started.
"""

from __future__ import annotations

ENGINES = ("local", "dask", "ray")
