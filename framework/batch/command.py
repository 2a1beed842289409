"""`framework batch NAME[@REF] --input PATH --output PATH`: the driver.

It resolves REF once to a version number, checks that every parameter has a
column before any work, plans the partitions, has the engine score them, and
commits the output with the job's record (name, branch, version, sha256,
start and end, rows, failed rows). Progress goes to a rich bar on a terminal;
`--json` prints a one-line summary instead of the sentence.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import click

from framework.batch.engines import ENGINES
from framework.errors import ConfigError, DeploymentFailed, FrameworkError

INTERRUPTED = 130  # the shell's code for a command ended by SIGINT
F = TypeVar("F", bound=Callable[..., Any])


def options(f: F) -> F:
    """The command's argument and options, as click decorators (the CLI defines the command)."""
    for decorator in reversed((
        click.argument("target", metavar="NAME[@REF]"),
        click.option("--input", required=True, metavar="PATH",
                     help="a Parquet file, a directory of them, or a CSV"),
        click.option("--output", required=True, metavar="PATH",
                     help="NAME.parquet, NAME.csv, or a directory of Parquet parts"),
        click.option("--branch", metavar="BRANCH", help="the branch to read",
                     show_default="deploy.yaml's branch, else main"),
        click.option("--map", multiple=True, metavar="PARAM=COLUMN",
                     help="take PARAM from COLUMN (repeatable)",
                     show_default="the column named PARAM"),
        click.option("--id-column", metavar="COLUMN",
                     help="input column copied to the output as each row's id",
                     show_default="a `row` column, the input's row number"),
        click.option("--chunk-rows", type=int, default=10_000,
                     help="rows per call of a vectorized deployment"),
        click.option("--partition-rows", type=int, default=100_000,
                     help="rows per partition, the unit of work and of output"),
        click.option("--engine", type=click.Choice(ENGINES), default="local",
                     help="where partitions are scored"),
        click.option("--workers", type=int, metavar="N", help="worker processes",
                     show_default="CPU count"),
        click.option("--address", metavar="ADDRESS", help="dask scheduler or Ray cluster address",
                     show_default="start one on this machine, on loopback"),
        click.option("--overwrite", is_flag=True, help="replace an existing --output"),
        click.option("--json", is_flag=True, help="print a one-line JSON summary on stdout"),
    )):
        f = decorator(f)
    return f


def _need_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ConfigError("framework batch needs pyarrow: pip install 'framework[batch]'") from None


def _mapping(pairs: list[str], params: list[str], name: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        param, sep, column = pair.partition("=")
        if not sep or not param or not column:
            raise ConfigError(f"--map {pair!r}: write it as PARAM=COLUMN")
        if param not in params:
            raise ConfigError(f"--map {pair!r}: {name} has no parameter {param!r}; its "
                              f"parameters are {params}")
        out[param] = column
    return out


def _columns(manifest: dict[str, Any], mapping: dict[str, str], have: list[str], where: str
             ) -> tuple[tuple[str, str], ...]:
    """(parameter, column) pairs; a required parameter without its column is named here."""
    pairs = []
    for p in manifest["signature"]["parameters"]:
        if p["kind"] in ("VAR_POSITIONAL", "VAR_KEYWORD"):
            continue
        column = mapping.get(p["name"], p["name"])
        if column in have:
            pairs.append((p["name"], column))
        elif p["default"] is None or p["name"] in mapping:
            raise ConfigError(
                f"{where} has no column {column!r} for parameter {p['name']!r} of "
                f"{manifest['name']}; its columns are {have}. Rename with --map "
                f"{p['name']}=COLUMN"
            )
    return tuple(pairs)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Progress:
    """A rich progress bar on a terminal (rows, rows/s, ETA); nothing otherwise."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.bar = None
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)
        except ImportError:
            return
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("rows {task.fields[speed]} rows/s"), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)
        self.task = self.bar.add_task(label, total=total, speed="-")
        self.start = time.monotonic()
        self.bar.start()

    def advance(self, rows: int, done: int) -> None:
        if self.bar is not None:
            speed = done / max(time.monotonic() - self.start, 1e-9)
            self.bar.update(self.task, advance=rows, speed=f"{speed:,.0f}")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run(args: Any, cfg: Any) -> int:
    """The `batch` command; `args` holds the options by name, `cfg` is the loaded
    `framework.config.Config`."""
    _need_pyarrow()
    from framework.batch import io
    from framework.batch.score import Job

    for option in ("chunk_rows", "partition_rows", "workers"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ConfigError(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    name, _, ref = args.target.partition("@")
    branch = args.branch or cfg.branch
    store = cfg.open_store()
    version = store.resolve(branch, name, ref or "latest")  # once: the job is pinned to it
    manifest = store.read_manifest(branch, name, version)
    params = [p["name"] for p in manifest["signature"]["parameters"]]
    mapping = _mapping(args.map, params, name)
    files = io.input_files(args.input)
    is_csv = io.kind_of(str(files[0])) == "csv"
    schemas = [io.csv_schema(files[0])] if is_csv else [io.parquet_schema(f) for f in files]
    columns: tuple[tuple[str, str], ...] = ()
    for f, schema in zip(files, schemas):
        columns = _columns(manifest, mapping, schema.names, f"--input {f}")
        if args.id_column and args.id_column not in schema.names:
            raise ConfigError(f"--id-column {args.id_column!r}: --input {f} has no such column; "
                              f"its columns are {schema.names}")
    workers = args.workers or os.cpu_count() or 1
    engine: Callable[..., None] = importlib.import_module(f"framework.batch.engines.{args.engine}").run
    output = io.Output(args.output, overwrite=args.overwrite)  # from here on, abort() on failure
    job = Job(store=cfg.store, branch=branch, name=name, version=version,
              sha256=manifest["sha256"], vectorized=bool(manifest["options"].get("vectorized")),
              columns=columns, id_column=args.id_column, chunk_rows=args.chunk_rows,
              parts_dir=str(output.parts), part_suffix=output.part_suffix)
    started, t0 = _now(), time.monotonic()
    progress = None
    counts = {"rows": 0, "failed": 0}
    try:
        if is_csv:  # streamed into Parquet once, so every engine reads row groups
            converted = output.staging / "input.parquet"
            io.csv_to_parquet(files[0], converted)
            files = [converted]
        parts, total = io.plan(files, args.partition_rows)
        progress = _Progress(total, f"{name} v{version}", sys.stderr.isatty() and not args.json)

        def on_done(summary: dict[str, Any]) -> None:
            counts["rows"] += summary["rows"]
            counts["failed"] += summary["failed"]
            progress.advance(summary["rows"], counts["rows"])

        if parts:
            try:
                engine(job, parts, on_done, workers=workers, address=args.address)
            except (FrameworkError, KeyboardInterrupt):
                raise
            except Exception as exc:  # the engine's own failure: rows never raise this far
                from framework.protocol import error_text

                raise DeploymentFailed(f"--engine {args.engine} failed scoring {name} "
                                       f"v{version}: {error_text(exc)}") from exc
        progress.stop()
        record = {**job.pinned, "started": started, "ended": _now(), "rows": counts["rows"],
                  "failed_rows": counts["failed"], "input": str(args.input),
                  "engine": args.engine}
        output.commit(record, len(parts))
    except KeyboardInterrupt:
        if progress is not None:
            progress.stop()
        output.abort()
        print(f"interrupted: no output written to {args.output}", file=sys.stderr)
        return INTERRUPTED
    except BaseException:
        if progress is not None:
            progress.stop()
        output.abort()
        raise
    seconds = time.monotonic() - t0
    summary = {**record, "output": str(args.output), "seconds": round(seconds, 3),
               "rows_per_second": round(counts["rows"] / seconds) if seconds else None}
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print(f"scored {counts['rows']} rows of {args.input} with {name} v{version} on branch "
              f"{branch!r} ({counts['failed']} failed) in {seconds:.1f} s -> {args.output}",
              file=sys.stderr)
    return 0
