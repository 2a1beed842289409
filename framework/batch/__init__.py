"""Offline batch scoring: one pinned version over a whole table (DESIGN section 9).

`framework batch NAME@REF --input ... --output ...` resolves REF once, splits the
input into partitions, and has an engine (`local`, `dask`, `ray`) run
`score.run_partition` on each: every worker loads the same version number, checks
its sha256, scores its rows and writes one part file. `io.Output` commits the
parts atomically at the end. Needs the `batch` extra (pyarrow).
"""
