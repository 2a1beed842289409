"""The benchmark harness still runs: one short pass. Nothing here is timed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO, cli_env

# Rows every run prints: the two floors, ours in each execution mode, and the extras.
ROWS = ("single-row batch", "single call", "1,000-row batches", "10,000-row batches", "p50 latency",
        "p99 latency", "RSS after load", "RSS of the server of ours' other modes", "start to first answer",
        "deploy finished",
        "`inline=True`: single-row batch", '`isolation="process"`: single-row batch',
        '`isolation="process"`: 1,000-row batches', "`metrics: false, access_log: false`",
        "| alone |", 'beside `isolation="process"`', "beside the same on a thread",
        "vectorized", "the vectorized model with `inline=True`", "micro-batched", "One bad row", "2 workers")


def _tables(text: str) -> list[list[list[str]]]:
    """Each markdown table in `text`, as rows of cells, the header first."""
    tables: list[list[list[str]]] = []
    inside = False
    for line in text.splitlines():
        if not line.startswith("|"):
            inside = False
            continue
        if not inside:
            tables.append([])
            inside = True
        if not line.startswith("|---"):
            tables[-1].append([c.strip() for c in line.strip().strip("|").split("|")])
    return tables


def test_the_harness_runs_one_short_pass(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--results", str(results)],
        cwd=tmp_path, env=cli_env(tmp_path / "unused-store", TMPDIR=str(tmp_path)),
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pass 1/1" in proc.stderr and "pass 2/" not in proc.stderr
    for case in ROWS:
        assert case in proc.stdout, case
    tables = _tables(proc.stdout)
    assert "bare-safe" in tables[0][0]
    # Every row with a target says whether it was met, and no row without one does.
    judged = [row for table in tables if table[0][-1] == "met" for row in table[1:]]
    assert all(bool(row[-2]) == (row[-1] in ("yes", "**no**")) for row in judged), judged
    assert sum(bool(row[-2]) for row in judged) == 13
    written = results.read_text()
    assert "Machine:" in written and "bench/run.py --quick" in written and proc.stdout.strip() in written


def test_the_instruction_count_still_drives_every_app(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "instructions.py"), "--check"],
        cwd=tmp_path, env=cli_env(tmp_path / "unused-store", TMPDIR=str(tmp_path)),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "each app answered every case" in proc.stdout
    assert "| bare-inline | bare-safe | ours |" in proc.stdout


def test_the_before_and_after_comparison_runs_against_a_checkout(tmp_path: Path) -> None:
    # This checkout against itself: both servers start, answer under load, and are compared.
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "ab.py"), "--before", str(REPO), "--rounds", "1",
         "--seconds", "1", "--path", "/v1/doubler/latest", "--rows", "10", "--features", "1"],
        cwd=tmp_path, env=cli_env(tmp_path / "unused-store", TMPDIR=str(tmp_path)),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [r for table in _tables(proc.stdout) for r in table if r[0] == "`/v1/doubler/latest`"]
    assert float(row[1].replace(",", "")) > 0 and float(row[2].replace(",", "")) > 0 and float(row[3]) > 0


def test_the_comparison_names_a_checkout_without_the_package(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "ab.py"), "--before", str(tmp_path)],
        cwd=tmp_path, env=cli_env(tmp_path / "unused-store", TMPDIR=str(tmp_path)),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert str(tmp_path) in proc.stderr and "git worktree add" in proc.stderr
