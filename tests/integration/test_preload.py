"""No caller pays a cold load: `latest` and aliases are loaded before /readyz says ready,
and again when they move."""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import httpx

from conftest import Server, run_cli

LOADED = re.compile(r'framework_loaded_versions\{branch="main",deployment="(\w+)",version="(\d+)"\}')


def _loaded(server: Server) -> set[tuple[str, int]]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {(name, int(v)) for name, v in LOADED.findall(text)}


def _until(check, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def _write(project: Path, answer: int) -> None:
    (project / "m.py").write_text(textwrap.dedent(f'''
        from framework import deployment


        @deployment
        def scorer(x):
            return x + {answer}


        @deployment
        def other(x):
            return -x
    '''))


def test_latest_and_aliases_are_loaded_before_ready_and_again_when_they_move(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (tmp_path / "deploy.yaml").write_text("modules: [m]\n")
    _write(tmp_path, 1)
    run_cli("deploy", store=store, cwd=tmp_path)
    _write(tmp_path, 2)
    run_cli("deploy", store=store, cwd=tmp_path)
    run_cli("alias", "set", "scorer", "prod", "1", store=store, cwd=tmp_path)
    server = Server(store, cwd=tmp_path)
    try:
        _until(lambda: httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200, "ready")
        assert _loaded(server) == {("scorer", 2), ("scorer", 1), ("other", 1)}  # before any call
        assert server.post("/v1/scorer/latest", {"data": 1}).json() == {"data": 3}
        _write(tmp_path, 3)
        run_cli("deploy", store=store, cwd=tmp_path)
        # Loaded in the background once `latest` moved, with no call to it.
        _until(lambda: ("scorer", 3) in _loaded(server), "the new latest loaded ahead")
        assert server.post("/v1/scorer/latest", {"data": 1}).json() == {"data": 4}
        run_cli("alias", "set", "scorer", "prod", "3", store=store, cwd=tmp_path)
        _until(lambda: server.post("/v1/scorer/prod", {"data": 1}).json() == {"data": 4},
               "prod moved to v3")
    finally:
        server.stop()


def test_preload_can_be_turned_off(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (tmp_path / "deploy.yaml").write_text("modules: [m]\nserver: {preload: false}\n")
    _write(tmp_path, 1)
    run_cli("deploy", store=store, cwd=tmp_path)
    server = Server(store, cwd=tmp_path)
    try:
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
        assert _loaded(server) == set()
    finally:
        server.stop()
