"""`framework batch`: a real store, real Parquet and CSV files, real worker processes.

The local and Dask engines run by default; Ray's test is opt-in
(FRAMEWORK_TEST_RAY=1), as it needs about 750 MB and half a minute to start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")  # in the dev extra: CI always has it
import pyarrow.csv as pacsv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from conftest import cli_env, run_cli, stop_process  # noqa: E402
from framework.batch import io  # noqa: E402
from framework.batch.score import Job, run_partition, score_table  # noqa: E402

ROWS = 200_000
NULL_ROWS = (17, 123_456)

MODULE = '''
import os
import time

from framework import deployment


@deployment(vectorized=True)
def vec(x, y=1):
    return [a * VERSION + b for a, b in zip(x, y)]


@deployment
def row(x, name):
    return {"double": x * 2, "label": name.upper()}


@deployment
def slow(x):
    time.sleep(0.002)
    return x * (VERSION - 1)


@deployment
def parity(x):
    return "odd" if x % 2 else "even"


@deployment
def crash(x):
    if x == 1500:
        os._exit(3)  # a deployment that ends its own process
    return x
'''


def write_project(project: Path, version: int) -> None:
    (project / "models.py").write_text(textwrap.dedent(MODULE).replace("VERSION", str(version)))
    (project / "deploy.yaml").write_text("modules: [models]\n")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding v1 of each deployment, and a 200,000-row table with two null rows."""
    root = tmp_path_factory.mktemp("batch")
    write_project(root, 2)
    run_cli("deploy", store=root / "store", cwd=root)
    x = list(range(ROWS))
    for i in NULL_ROWS:
        x[i] = None
    table = pa.table({"x": pa.array(x, pa.int64()), "y": [i % 7 for i in range(ROWS)],
                      "name": [f"n{i}" for i in range(ROWS)], "key": [f"k{i}" for i in range(ROWS)]})
    pq.write_table(table, root / "in.parquet", row_group_size=25_000)
    pacsv.write_csv(table.rename_columns(["value", "y", "name", "key"]), root / "in.csv")
    return root


def batch(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cli("batch", *args, store=project / "store", cwd=project, check=check, timeout=300)


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".batch-" in p.name]


def record_of(path: Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[io.META_KEY])


def manifest(project: Path, name: str, version: int) -> dict:
    return json.loads((project / "store" / "branches" / "main" / name / str(version)
                       / "manifest.json").read_text())


def test_local_vectorized_scores_every_row_and_records_the_version(project: Path) -> None:
    out = project / "local.parquet"
    proc = batch(project, "vec", "--input", "in.parquet", "--output", str(out), "--workers", "2",
                 "--partition-rows", "50000", "--chunk-rows", "4096", "--json")
    summary = json.loads(proc.stdout)
    assert (summary["rows"], summary["failed_rows"], summary["version"]) == (ROWS, 2, 1)
    got = pq.read_table(out).to_pydict()
    assert got["row"] == list(range(ROWS))  # every row once, in input order
    for i in range(ROWS):
        if i in NULL_ROWS:
            assert got["result"][i] is None and got["error"][i].startswith("TypeError"), i
        else:
            assert (got["result"][i], got["error"][i]) == (i * 2 + i % 7, None), i
    record = record_of(out)
    m = manifest(project, "vec", 1)
    assert {k: record[k] for k in ("name", "branch", "version", "sha256", "rows", "failed_rows")} \
        == {"name": "vec", "branch": "main", "version": 1, "sha256": m["sha256"], "rows": ROWS,
            "failed_rows": 2}
    assert record["started"] <= record["ended"]
    assert leftovers(project) == []


def test_dask_per_row_with_dict_results(project: Path) -> None:
    out = project / "dask.parquet"
    proc = batch(project, "row@1", "--input", "in.parquet", "--output", str(out),
                 "--engine", "dask", "--workers", "2", "--json")
    assert json.loads(proc.stdout)["engine"] == "dask"
    got = pq.read_table(out).to_pydict()
    assert list(got) == ["row", "double", "label", "error"]
    assert got["row"] == list(range(ROWS))
    for i in range(ROWS):
        if i in NULL_ROWS:
            assert got["double"][i] is None and "NoneType" in got["error"][i], i
        else:
            assert (got["double"][i], got["label"][i], got["error"][i]) == (2 * i, f"N{i}", None)
    record = record_of(out)
    assert (record["version"], record["failed_rows"], record["sha256"]) == (
        1, 2, manifest(project, "row", 1)["sha256"])
    assert leftovers(project) == []


def test_csv_in_and_out_with_map_and_id_column(project: Path) -> None:
    out = project / "scored.csv"
    batch(project, "row", "--input", "in.csv", "--output", str(out), "--map", "x=value",
          "--id-column", "key", "--workers", "2")
    got = pacsv.read_csv(out, convert_options=pacsv.ConvertOptions(
        strings_can_be_null=True)).to_pydict()
    assert list(got) == ["key", "double", "label", "error"]
    assert got["key"] == [f"k{i}" for i in range(ROWS)]
    for i in range(ROWS):
        if i in NULL_ROWS:
            assert got["error"][i].startswith("TypeError"), i
        else:
            assert (got["double"][i], got["label"][i], got["error"][i]) == (2 * i, f"N{i}", None)
    record = json.loads((project / "scored.csv.meta.json").read_text())
    assert (record["name"], record["version"], record["rows"], record["failed_rows"]) == (
        "row", 1, ROWS, 2)
    assert leftovers(project) == []


def test_a_parquet_output_dictionary_encodes_only_the_columns_that_repeat(project: Path) -> None:
    """A per-row function of one column, its failing rows, and the merged file's encodings."""
    out = project / "parity.parquet"
    batch(project, "parity", "--input", "in.parquet", "--output", str(out), "--workers", "2",
          "--partition-rows", "40000")
    got = pq.read_table(out).to_pydict()
    assert got["row"] == list(range(ROWS))
    for i in range(ROWS):
        if i in NULL_ROWS:
            assert got["result"][i] is None and got["error"][i].startswith("TypeError"), i
        else:
            assert (got["result"][i], got["error"][i]) == ("odd" if i % 2 else "even", None), i
    meta = pq.ParquetFile(out).metadata
    encodings = {meta.schema.column(c).name: meta.row_group(0).column(c).encodings
                 for c in range(meta.num_columns)}
    assert "RLE_DICTIONARY" in encodings["result"], encodings  # two values: a dictionary
    assert "RLE_DICTIONARY" not in encodings["row"], encodings  # all distinct: plain


def _table_job() -> Job:
    return Job(store="unused", branch="main", name="t", version=1, sha256="", vectorized=False,
               columns=(), id_column=None, chunk_rows=10, parts_dir="", part_suffix=".arrow")


def test_every_shape_of_per_row_call_puts_each_failure_on_its_row() -> None:
    """One column by position, several by position, by keyword, and none (all defaults)."""
    table = pa.table({"x": [1, None, 3, 4], "y": [10, 20, None, 40]})

    def one(x):
        return x * 2

    def two(x, y):
        return x + y

    def keywords(*, y, x):
        return x - y

    def defaults(z=5):
        return z

    cases = [
        (one, (("x", "x"),), [2, None, 6, 8], [1]),
        (two, (("x", "x"), ("y", "y")), [11, None, None, 44], [1, 2]),
        (keywords, (("y", "y"), ("x", "x")), [-9, None, None, -36], [1, 2]),
        (defaults, (), [5, 5, 5, 5], []),
    ]
    for fn, columns, results, failed in cases:
        job = dataclasses.replace(_table_job(), columns=columns)
        got = score_table(job, fn, table, 100).to_pydict()
        assert got["row"] == [100, 101, 102, 103], fn.__name__
        assert got["result"] == results, fn.__name__
        assert [i for i, e in enumerate(got["error"]) if e] == failed, fn.__name__
        assert all(got["error"][i].startswith("TypeError") for i in failed), got["error"]


def test_a_missing_column_is_named_before_any_work(project: Path) -> None:
    out = project / "never.parquet"
    proc = batch(project, "row", "--input", "in.csv", "--output", str(out), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "no column 'x' for parameter 'x'" in proc.stderr and "--map x=COLUMN" in proc.stderr
    proc = batch(project, "vec", "--input", "in.parquet", "--output", str(out),
                 "--map", "y=nope", check=False)
    assert proc.returncode == 2 and "'nope'" in proc.stderr, proc.stderr
    assert not out.exists() and leftovers(project) == []


def test_the_ref_is_pinned_to_one_version(project: Path, tmp_path: Path) -> None:
    """A later deploy changes nothing for a job run at @1, and `latest` is resolved once."""
    store = tmp_path / "store"
    write_project(tmp_path, 2)
    run_cli("deploy", store=store, cwd=tmp_path)
    write_project(tmp_path, 3)
    run_cli("deploy", store=store, cwd=tmp_path)
    table = pa.table({"x": list(range(1000))})
    pq.write_table(table, tmp_path / "small.parquet")
    for ref, version, factor in (("vec@1", 1, 2), ("vec", 2, 3), ("vec@latest", 2, 3)):
        out = tmp_path / f"{version}-{factor}-{ref.replace('@', '_')}.parquet"
        run_cli("batch", ref, "--input", "small.parquet", "--output", str(out), "--workers", "1",
                store=store, cwd=tmp_path)
        got = pq.read_table(out).to_pydict()
        assert got["result"] == [factor * x + 1 for x in range(1000)]  # y's default: 1
        assert record_of(out)["version"] == version
    run_cli("alias", "set", "vec", "stable", "1", store=store, cwd=tmp_path)
    out = tmp_path / "alias.parquet"
    run_cli("batch", "vec@stable", "--input", "small.parquet", "--output", str(out),
            store=store, cwd=tmp_path)
    assert record_of(out)["version"] == 1


def test_a_directory_output_holds_parquet_parts_and_the_record(project: Path) -> None:
    out = project / "scored-dir"
    batch(project, "vec", "--input", "in.parquet", "--output", str(out), "--workers", "2",
          "--partition-rows", "100000")
    parts = sorted(p.name for p in out.iterdir())
    assert parts == ["_framework.json", "part-00000.parquet", "part-00001.parquet"]
    got = pq.read_table(out / "part-00001.parquet").to_pydict()
    assert got["row"] == list(range(100_000, ROWS))
    assert got["result"][123_456 - 100_000] is None and got["result"][-1] == 2 * (ROWS - 1) + (
        (ROWS - 1) % 7)
    record = json.loads((out / "_framework.json").read_text())
    assert (record["version"], record["rows"], record["failed_rows"]) == (1, ROWS, 2)
    assert record_of(out / "part-00000.parquet")["sha256"] == manifest(project, "vec", 1)["sha256"]
    assert leftovers(project) == []


def test_a_deploy_during_the_job_changes_nothing_in_its_output(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_project(tmp_path, 2)  # slow v1 returns x
    run_cli("deploy", store=store, cwd=tmp_path)
    pq.write_table(pa.table({"x": list(range(3000))}), tmp_path / "small.parquet")
    out = tmp_path / "during.parquet"
    proc = subprocess.Popen(
        [sys.executable, "-m", "framework", "batch", "slow", "--input", "small.parquet",
         "--output", str(out), "--workers", "2", "--partition-rows", "250", "--json"],
        cwd=tmp_path, env=cli_env(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".during.parquet.batch-*/parts/part-*")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no partition finished within 60 s"
            time.sleep(0.05)
        write_project(tmp_path, 3)  # slow v2 returns 2x
        run_cli("deploy", store=store, cwd=tmp_path)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["version"] == 1
    assert pq.read_table(out).column("result").to_pylist() == list(range(3000))
    assert record_of(out)["version"] == 1


def test_a_changed_artifact_is_refused_and_leaves_no_output(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_project(tmp_path, 2)
    run_cli("deploy", store=store, cwd=tmp_path)
    artifact = store / "branches" / "main" / "vec" / "1" / "artifact.pkl"
    artifact.write_bytes(artifact.read_bytes() + b"tampered")
    pq.write_table(pa.table({"x": [1, 2, 3]}), tmp_path / "small.parquet")
    out = tmp_path / "out.parquet"
    proc = run_cli("batch", "vec", "--input", "small.parquet", "--output", str(out),
                   store=store, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "sha256" in proc.stderr, proc.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_partition_run_twice_is_written_once(project: Path, tmp_path: Path) -> None:
    """What an engine's retry does: the same partition scored again replaces its part."""
    m = manifest(project, "vec", 1)
    out = io.Output(str(tmp_path / "twice.parquet"), overwrite=False)
    job = Job(store=str(project / "store"), branch="main", name="vec", version=1,
              sha256=m["sha256"], vectorized=True, columns=(("x", "x"), ("y", "y")),
              id_column=None, chunk_rows=10_000, parts_dir=str(out.parts),
              part_suffix=out.part_suffix)
    sliced, total = io.plan([project / "in.parquet"], 10_000)  # row groups of 25,000: sliced
    assert total == ROWS and [p.length for p in sliced[:3]] == [10_000, 10_000, 5_000]
    assert [p.first_row for p in sliced] == [sum(q.length for q in sliced[:i])
                                             for i in range(len(sliced))]
    parts, total = io.plan([project / "in.parquet"], 60_000)
    assert total == ROWS and len(parts) == 3
    done = [run_partition(job, p) for p in parts] + [run_partition(job, parts[1])]
    assert sum(d["rows"] for d in done[:-1]) == ROWS
    out.commit({**job.pinned, "rows": ROWS}, len(parts))
    assert pq.read_table(tmp_path / "twice.parquet").column("row").to_pylist() == list(range(ROWS))
    assert leftovers(tmp_path) == []


def test_a_worker_that_dies_fails_the_job_without_output(project: Path, tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": list(range(3000))}), tmp_path / "small.parquet")
    out = tmp_path / "crashed.parquet"
    proc = batch(project, "crash", "--input", str(tmp_path / "small.parquet"), "--output",
                 str(out), "--workers", "2", "--partition-rows", "500", check=False)
    assert proc.returncode == 1 and "worker process died" in proc.stderr, proc.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ctrl_c_stops_workers_and_leaves_no_output(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "interrupted.parquet"
    proc = subprocess.Popen(
        [sys.executable, "-m", "framework", "batch", "slow", "--input", "in.parquet",
         "--output", str(out), "--workers", "2", "--partition-rows", "500"],
        cwd=project, env=cli_env(project / "store"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        # Wait until work is under way: the first part file is written.
        while not list(tmp_path.glob(".interrupted.parquet.batch-*/parts/part-*")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no partition finished within 60 s"
            time.sleep(0.1)
        workers = _descendants(proc.pid)
        assert len(workers) >= 2  # the two workers (and the process that forks them, if any)
        # No thread runs in the driver (no progress bar: stderr is a pipe), so the workers
        # are forked from it directly: its children, running its command line.
        forked = [p for p in workers
                  if _parent(p) == proc.pid and _cmdline(p) == _cmdline(proc.pid)]
        assert len(forked) == 2, (workers, [_cmdline(p) for p in workers])
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        stop_process(proc)
    assert proc.returncode == 130 and "interrupted" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert not out.exists() and leftovers(tmp_path) == []
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers):
        assert time.monotonic() < deadline, f"workers {workers} still running after Ctrl-C"
        time.sleep(0.1)


@pytest.mark.skipif(os.environ.get("FRAMEWORK_TEST_RAY") != "1",
                    reason="opt-in: set FRAMEWORK_TEST_RAY=1 (needs ray[data], ~750 MB)")
def test_ray_scores_every_row(project: Path) -> None:
    pytest.importorskip("ray")
    out = project / "ray.parquet"
    started = time.monotonic()
    proc = batch(project, "vec", "--input", "in.parquet", "--output", str(out),
                 "--engine", "ray", "--workers", "2", "--json")
    summary = json.loads(proc.stdout)
    got = pq.read_table(out).to_pydict()
    assert got["row"] == list(range(ROWS))
    for i in range(ROWS):
        if i in NULL_ROWS:
            assert got["error"][i].startswith("TypeError"), i
        else:
            assert (got["result"][i], got["error"][i]) == (i * 2 + i % 7, None), i
    assert (record_of(out)["version"], summary["failed_rows"]) == (1, 2)
    print(f"ray: {summary['rows_per_second']} rows/s in the job, "
          f"{time.monotonic() - started:.1f} s with start-up", file=sys.stderr)



def test_a_terminal_gets_a_progress_bar(project: Path, tmp_path: Path) -> None:
    """With stderr a terminal (a pseudo-terminal here), rich draws rows, rows/s and the ETA."""
    import pty
    import threading

    pq.write_table(pa.table({"x": list(range(3000))}), tmp_path / "small.parquet")
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # keeps the terminal's buffer from filling while the job runs
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "framework", "batch", "slow", "--input",
             str(tmp_path / "small.parquet"), "--output", str(tmp_path / "bar.parquet"),
             "--workers", "2", "--partition-rows", "500"],
            cwd=project, env=cli_env(project / "store", COLUMNS="120"), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=slave, timeout=300,
        )
    finally:
        os.close(slave)
    reader.join(30)
    os.close(master)
    shown = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, shown
    assert "slow v1" in shown and "rows/s" in shown and "/3000" in shown, shown
    assert pq.read_table(tmp_path / "bar.parquet").column("result").to_pylist() == list(range(3000))
