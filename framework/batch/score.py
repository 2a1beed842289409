"""The one engine-neutral function: score a table chunk with a loaded version.

`run_partition(job, part)` is what every engine runs on its workers: it loads
the pinned version (once per process), reads the partition, scores it with
`score_table` and writes the part file. A vectorized deployment gets whole
column chunks (`job.chunk_rows` rows per call); when a chunk raises, its rows
are called one at a time so only the bad rows fail. Others run row by row. A
row's failure is its `error` column; the run never stops for one.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from framework.execute import loading
from framework.batch import io
from framework.errors import FrameworkError, IntegrityError, LoadFailed
from framework.protocol import error_text
from framework.store import open_store

ERROR_COLUMN = "error"
RESULT_COLUMN = "result"
ROW_COLUMN = "row"  # the id column when --id-column is not given: the input's row number


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, resolved on the driver (picklable, no open handles)."""

    store: str
    branch: str
    name: str
    version: int
    sha256: str
    vectorized: bool
    columns: tuple[tuple[str, str], ...]  # (parameter, input column) for each mapped parameter
    id_column: str | None
    chunk_rows: int
    parts_dir: str
    part_suffix: str  # `.parquet` or `.arrow`: see framework.batch.io

    @property
    def pinned(self) -> dict[str, Any]:
        return {"name": self.name, "branch": self.branch, "version": self.version,
                "sha256": self.sha256}

    @property
    def read_columns(self) -> list[str]:
        wanted = [c for _, c in self.columns] + ([self.id_column] if self.id_column else [])
        return list(dict.fromkeys(wanted))


_loaded: dict[tuple[str, str, str, int, str], loading.Loaded] = {}


def load(job: Job) -> loading.Loaded:
    """The job's version, loaded once per process, refused unless its sha256 is the driver's."""
    key = (job.store, job.branch, job.name, job.version, job.sha256)
    if key not in _loaded:
        store = open_store(job.store)
        manifest = store.read_manifest(job.branch, job.name, job.version)
        if manifest.get("sha256") != job.sha256:
            raise IntegrityError(
                f"{job.name} v{job.version} on branch {job.branch!r} has sha256 "
                f"{str(manifest.get('sha256'))[:12]} in the store, but the job was started for "
                f"{job.sha256[:12]}: the version was changed during the job; run it again"
            )
        artifact = store.read_artifact(job.branch, job.name, job.version)
        try:
            _loaded[key] = loading.load(artifact, manifest)
        except FrameworkError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's setup or unpickling failed
            raise LoadFailed(f"{job.name} v{job.version} on branch {job.branch!r} could not be "
                             f"loaded: {error_text(exc)}; fix it and redeploy") from exc
    return _loaded[key]


def run_partition(job: Job, part: io.Partition) -> dict[str, Any]:
    """Score one partition and write its part file; returns its row and failure counts."""
    fn = load(job).fn
    table = io.read_partition(part, job.read_columns)
    out = score_table(job, fn, table, part.first_row)
    failed = out.num_rows - out.column(ERROR_COLUMN).null_count
    io.write_part(job.parts_dir, job.part_suffix, part.index, out, job.pinned)
    return {"index": part.index, "rows": out.num_rows, "failed": failed}


def _caller(fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):
        loop = asyncio.new_event_loop()
        return lambda *a, **kw: loop.run_until_complete(fn(*a, **kw))
    return fn


def _as_list(out: Any, n: int) -> list[Any]:
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()  # numpy arrays, pandas series
    if isinstance(out, (list, tuple)) and len(out) == n:
        return list(out)
    got = f"{len(out)} results" if isinstance(out, (list, tuple)) else f"a {type(out).__name__}"
    raise TypeError(f"vectorized deployment returned {got} for {n} rows; return a list with one "
                    "result per row, in row order")


def _vectorized(job: Job, fn: Callable[..., Any], table: pa.Table
                ) -> tuple[list[Any], list[str | None]]:
    call = _caller(fn)
    params = inspect.signature(fn).parameters
    mapped = dict(job.columns)
    # A parameter with no column gets its default on every row, as a REST call would.
    fixed = {p.name: p.default for p in params.values()
             if p.name not in mapped and p.default is not p.empty}
    results: list[Any] = []
    errors: list[str | None] = []
    for start in range(0, table.num_rows, job.chunk_rows):
        chunk = table.slice(start, job.chunk_rows)
        n = chunk.num_rows
        cols = {p: chunk.column(c).to_pylist() for p, c in job.columns}
        try:
            results += _as_list(call(**cols, **{p: [d] * n for p, d in fixed.items()}), n)
            errors += [None] * n
            continue
        except Exception:  # noqa: BLE001 - some row is bad: find which, one row at a time
            pass
        for i in range(n):
            try:
                results += _as_list(call(**{p: [v[i]] for p, v in cols.items()},
                                         **{p: [d] for p, d in fixed.items()}), 1)
                errors.append(None)
            except Exception as exc:  # noqa: BLE001 - the row's failure is its error column
                results.append(None)
                errors.append(error_text(exc))
    return results, errors


def _per_row(job: Job, fn: Callable[..., Any], table: pa.Table
             ) -> tuple[list[Any], list[str | None]]:
    call = _caller(fn)
    order = list(inspect.signature(fn).parameters.values())
    names = [p for p, _ in job.columns]
    cols = [table.column(c).to_pylist() for _, c in job.columns]
    errors: list[str | None] = [None] * table.num_rows
    results: list[Any] = []
    append = results.append
    # The common case, columns for the leading parameters in order, passes them by position:
    # building keyword arguments for every row costs as much as a small function itself.
    # The loops below are spelled out per case, as any work per row (an enumerate, a tuple
    # to unpack) is paid on every row; a failed row's index is the results so far.
    if names == [p.name for p in order[:len(names)]] and all(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in order[:len(names)]):
        if len(cols) == 1:
            for x in cols[0]:
                try:
                    append(call(x))
                except Exception as exc:  # noqa: BLE001 - the row's failure is its error column
                    errors[len(results)] = error_text(exc)
                    append(None)
        else:  # several columns, or none (every parameter taking its default)
            for row in zip(*cols) if cols else [()] * table.num_rows:
                try:
                    append(call(*row))
                except Exception as exc:  # noqa: BLE001 - the row's failure is its error column
                    errors[len(results)] = error_text(exc)
                    append(None)
        return results, errors
    for values in zip(*cols):
        try:
            append(call(**dict(zip(names, values))))
        except Exception as exc:  # noqa: BLE001 - the row's failure is its error column
            errors[len(results)] = error_text(exc)
            append(None)
    return results, errors


def result_columns(results: list[Any], taken: set[str]) -> list[tuple[str, pa.Array]]:
    """Results as Arrow columns: a dict result's keys each become a column."""
    try:
        arr = pa.array(results)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError,
            ValueError, OverflowError):
        return [(RESULT_COLUMN, io.json_column(results))]
    if not pa.types.is_struct(arr.type):
        return [(RESULT_COLUMN, arr)]
    # Parent nulls (failed rows) are pushed down into each field by flatten().
    fields = arr.flatten()
    return [(f.name if f.name not in taken else f"{RESULT_COLUMN}.{f.name}", col)
            for f, col in zip(arr.type, fields)]


def score_table(job: Job, fn: Callable[..., Any], table: pa.Table, first_row: int) -> pa.Table:
    """The id column, the result column(s) and the error column for every row of `table`."""
    score = _vectorized if job.vectorized else _per_row
    results, errors = score(job, fn, table)
    if job.id_column:
        ids = (job.id_column, table.column(job.id_column))
    else:
        ids = (ROW_COLUMN, pa.array(range(first_row, first_row + table.num_rows), pa.int64()))
    columns = [ids, *result_columns(results, {ids[0], ERROR_COLUMN}),
               (ERROR_COLUMN, pa.array(errors, pa.string()))]
    return pa.table({name: col for name, col in columns})
