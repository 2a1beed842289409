"""Reading a batch job's input in partitions, and committing its output atomically.

Input is a Parquet file, a directory of Parquet files, or a CSV file (converted
once, streamed, into a Parquet file in the job's staging directory, so every
engine reads row groups the same way). A partition is a run of row groups of
one file, or a slice of one large row group.

Output goes to a staging directory next to the destination: each partition
writes `part-NNNNN.parquet` (to a temporary name, then renamed), so an engine
that runs a partition twice replaces the same file rather than adding rows.
Parts of a single-file output are Arrow IPC files instead (`.arrow`): they are
read back once, to be merged, and IPC skips Parquet's encoding and decoding.
`Output.commit` builds the destination from the parts and renames it into
place; `Output.abort` removes the staging directory, so a failed or
interrupted job leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc  # noqa: F401 - pa.ipc
import pyarrow.parquet as pq

from framework.errors import ConfigError

META_KEY = b"framework"  # the Parquet schema-metadata key holding the job's record
DIR_META = "_framework.json"  # the same record, in a directory output
DICTIONARY_SAMPLE = 10_000  # rows looked at to decide whether a column repeats its values


@dataclass(frozen=True)
class Partition:
    """Rows `offset .. offset+length` of row groups `row_groups` of `path`."""

    index: int
    path: str
    row_groups: tuple[int, ...]
    offset: int
    length: int
    first_row: int  # the input-wide row number of the partition's first row


def kind_of(path: str) -> str:
    """`csv`, `parquet` (one file) or `dir` (a directory of Parquet parts), from the name."""
    lower = path.lower().rstrip("/")
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    return "dir"


def input_files(path: str) -> list[Path]:
    """The Parquet files of a Parquet input (in name order), or the one CSV file."""
    if "://" in path:
        raise ConfigError(f"--input {path}: only local paths are supported so far; give a path")
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet")
                       if not any(part.startswith((".", "_")) for part in f.relative_to(p).parts))
        if not files:
            raise ConfigError(f"--input {path}: the directory holds no .parquet files")
        return files
    if not p.is_file():
        raise ConfigError(f"--input {path}: no such file or directory")
    return [p]


def csv_schema(path: Path) -> pa.Schema:
    """The columns of a CSV file, from its first block (no full read)."""
    try:
        with pacsv.open_csv(path) as reader:
            return reader.schema
    except pa.ArrowInvalid as exc:
        raise ConfigError(f"--input {path}: not a readable CSV file: {exc}") from None


def parquet_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"--input {path}: not a readable Parquet file: {exc}") from None


def csv_to_parquet(src: Path, dst: Path) -> None:
    """Stream a CSV file into a Parquet file, one row group per block read."""
    with pacsv.open_csv(src) as reader:
        with pq.ParquetWriter(dst, reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)


def plan(files: list[Path], partition_rows: int) -> tuple[list[Partition], int]:
    """Partitions of about `partition_rows` rows over `files`, and the total row count."""
    parts: list[Partition] = []
    total = 0

    def add(path: Path, groups: list[int], offset: int, length: int) -> None:
        nonlocal total
        parts.append(Partition(len(parts), str(path), tuple(groups), offset, length, total))
        total += length

    for path in files:
        meta = pq.ParquetFile(path).metadata
        run: list[int] = []
        rows = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if n > 2 * partition_rows:  # too big to be one partition: slice it
                if run:
                    add(path, run, 0, rows)
                    run, rows = [], 0
                for start in range(0, n, partition_rows):
                    add(path, [g], start, min(partition_rows, n - start))
                continue
            run.append(g)
            rows += n
            if rows >= partition_rows:
                add(path, run, 0, rows)
                run, rows = [], 0
        if run:
            add(path, run, 0, rows)
    return parts, total


def read_partition(part: Partition, columns: list[str]) -> pa.Table:
    table = pq.ParquetFile(part.path).read_row_groups(list(part.row_groups), columns=columns)
    if part.offset or part.length != table.num_rows:
        table = table.slice(part.offset, part.length)
    return table


def json_column(values: list[Any]) -> pa.Array:
    """Values as JSON text, for those Arrow cannot type as one column (or CSV cannot hold)."""
    return pa.array([None if v is None else orjson.dumps(v, default=str).decode()
                     for v in values], pa.string())


def _nested(t: pa.DataType) -> bool:
    return pa.types.is_nested(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


class Output:
    """The destination of a job, staged next to it until `commit`."""

    def __init__(self, path: str, *, overwrite: bool) -> None:
        if "://" in path:
            raise ConfigError(f"--output {path}: only local paths are supported so far; give a path")
        self.path = Path(path).absolute()
        self.kind = kind_of(path)
        if (self.path.exists() or self.sidecar.exists()) and not overwrite:
            raise ConfigError(f"--output {path} already exists; remove it or pass --overwrite")
        if not self.path.parent.is_dir():
            raise ConfigError(f"--output {path}: directory {self.path.parent} does not exist")
        # Next to the destination, so the final rename stays on one filesystem.
        self.staging = self.path.parent / f".{self.path.name}.batch-{uuid.uuid4().hex[:12]}"
        self.parts = self.staging / "parts"
        self.parts.mkdir(parents=True)
        self.part_suffix = ".parquet" if self.kind == "dir" else ".arrow"

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + ".meta.json")

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*" + self.part_suffix))

    def _unified(self, files: list[Path]) -> tuple[pa.Schema, list[str]]:
        """One schema for every part, and the columns to turn into JSON text."""
        schemas = [_part_schema(f).remove_metadata() for f in files]
        if not schemas:  # an input without rows: the columns every output has
            schemas = [pa.schema([("row", pa.int64()), ("error", pa.string())])]
        try:
            schema = pa.unify_schemas(schemas, promote_options="permissive")
            as_json: list[str] = []
        except (pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError):
            # Parts typed one column differently (say int here, str there): keep it as text.
            names = list(dict.fromkeys(n for s in schemas for n in s.names))
            as_json = [n for n in names if len({s.field(n).type for s in schemas if n in s.names}) > 1]
            fields = {}
            for s in schemas:
                for f in s:
                    fields.setdefault(f.name, pa.field(f.name, pa.string()) if f.name in as_json else f)
            schema = pa.schema([fields[n] for n in names])
        if self.kind == "csv":
            as_json += [f.name for f in schema if _nested(f.type) and f.name not in as_json]
            schema = pa.schema([pa.field(f.name, pa.string()) if f.name in as_json else f
                                for f in schema])
        return schema, as_json

    def _tables(self, files: list[Path], schema: pa.Schema, as_json: list[str]):
        for f in files:
            t = _read_part(f)
            for name in as_json:
                if name in t.column_names:
                    values = json_column(t.column(name).to_pylist())
                    t = t.set_column(t.column_names.index(name), name, values)
            for field in schema:  # a column every row of this part failed on
                if field.name not in t.column_names:
                    t = t.append_column(field, pa.nulls(t.num_rows, field.type))
            t = t.select(schema.names)
            # A cast is only needed when parts differ (and pulls in pyarrow.compute).
            yield t if t.schema.equals(schema, check_metadata=False) else t.cast(schema)

    def commit(self, record: dict[str, Any], expected_parts: int) -> None:
        """Build the destination from the parts, then rename it into place."""
        files = self._part_files()
        if len(files) != expected_parts:
            raise ConfigError(f"internal: {len(files)} parts written for {expected_parts} partitions")
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        if self.kind == "dir":
            (self.parts / DIR_META).write_text(text)
            if self.path.is_dir():
                shutil.rmtree(self.path)
            elif self.path.exists():
                self.path.unlink()
            os.replace(self.parts, self.path)
            self.abort()
            return
        schema, as_json = self._unified(files)
        tmp = self.staging / ("out." + self.kind)
        if self.kind == "parquet":
            schema = schema.with_metadata({META_KEY: json.dumps(record, sort_keys=True).encode()})
            first = next((t for t in self._tables(files, schema, as_json) if t.num_rows), None)
            with pq.ParquetWriter(tmp, schema, use_dictionary=dictionary_columns(first)) as writer:
                for t in self._tables(files, schema, as_json):
                    writer.write_table(t.replace_schema_metadata(schema.metadata))
        else:
            with pacsv.CSVWriter(tmp, schema) as writer:
                for t in self._tables(files, schema, as_json):
                    writer.write_table(t)
            # The sidecar first: a CSV file that is there always has its record.
            side_tmp = self.staging / "meta.json"
            side_tmp.write_text(text)
            os.replace(side_tmp, self.sidecar)
        os.replace(tmp, self.path)
        self.abort()


def dictionary_columns(table: pa.Table | None) -> list[str]:
    """The flat columns worth dictionary-encoding in Parquet: those repeating values.

    Parquet writers dictionary-encode every column by default; for a column of mostly
    distinct values (the row number, a float score) building the dictionary, which is
    then dropped, is most of the write. So each column is judged on a sample.
    """
    if table is None:
        return []
    sample = table.slice(0, DICTIONARY_SAMPLE)
    wanted = []
    for name, col in zip(sample.column_names, sample.columns):
        if pa.types.is_nested(col.type):
            continue
        values = [v for v in col.to_pylist() if v is not None]
        try:
            repeats = len(set(values)) <= max(1, len(values) // 2)
        except TypeError:  # values Python cannot hash: leave them to the default
            repeats = True
        if repeats or not values:  # all null in the sample: may repeat later
            wanted.append(name)
    return wanted


def _part_schema(path: Path) -> pa.Schema:
    if path.suffix == ".arrow":
        return pa.ipc.open_file(pa.memory_map(str(path))).schema
    return pq.read_schema(path)


def _read_part(path: Path) -> pa.Table:
    if path.suffix == ".arrow":  # mapped, not copied; the map lives as long as the table
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    return pq.read_table(path)


def write_part(parts_dir: str, suffix: str, index: int, table: pa.Table,
               pinned: dict[str, Any]) -> None:
    """Write one partition's result; a second run of the same partition replaces it."""
    final = Path(parts_dir) / f"part-{index:05d}{suffix}"
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    table = table.replace_schema_metadata({META_KEY: json.dumps(pinned, sort_keys=True).encode()})
    if suffix == ".arrow":
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        pq.write_table(table, tmp, use_dictionary=dictionary_columns(table))
    os.replace(tmp, final)
