"""The benchmark harness still runs: one short pass. Nothing here is timed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO, cli_env


def test_the_harness_runs_one_short_pass(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--results", str(results)],
        cwd=tmp_path, env=cli_env(tmp_path / "unused-store", TMPDIR=str(tmp_path)),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case in ("single call", "10,000-row batches", "p99 latency", "start to first answer",
                 "deploy finished", "vectorized", "micro-batched", "One bad row", "2 workers"):
        assert case in proc.stdout
    written = results.read_text()
    assert "Machine:" in written and "bench/run.py --quick" in written


def test_the_instruction_count_still_drives_both_apps(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "instructions.py"), "--check"],
        cwd=tmp_path, env=cli_env(tmp_path / "unused-store", TMPDIR=str(tmp_path)),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "each app answered every case" in proc.stdout
