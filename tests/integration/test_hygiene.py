"""CLI errors as promised, store hygiene, and no server paths in answers (issue 14).

What is checked in-process (a deploy from Python, a full disk) is in tests/unit/test_hygiene_rules.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest

import framework
from conftest import REPO, Server, cli_env, run_cli
from framework.store.local import LocalStore


def _refused(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr


# -- 8. CLI errors: `error:`, what to do, a documented exit code, never a traceback -----


@pytest.mark.parametrize("args, words", [
    (["serve", "--port", "99999"], ["--port", "1 to 65535"]),
    (["serve", "--port", "-1"], ["--port", "1 to 65535"]),
    (["serve", "--log-level", "chatty"], ["--log-level", "chatty", "debug"]),
    (["serve", "--workers", "0"], ["--workers", "at least 1"]),
    (["serve", "--root-path", "ml/"], ["--root-path", "/ml"]),
])
def test_serve_usage_errors(tmp_path, args, words):
    _refused(run_cli(*args, store=tmp_path / "store", check=False, timeout=60), 2, *words)


def test_a_port_over_range_in_deploy_yaml_is_a_config_error(tmp_path):
    (tmp_path / "deploy.yaml").write_text("server: {port: 70000}\n")
    _refused(run_cli("serve", store=tmp_path / "store", cwd=tmp_path, check=False), 2,
             "server.port", "65535")


@pytest.mark.parametrize("args", [
    ["list"], ["versions", "example_doubler"], ["show", "example_doubler"],
    ["alias", "list", "example_doubler"], ["alias", "set", "example_doubler", "prod", "1"],
    ["keys", "list"], ["keys", "create"], ["rollback", "example_doubler"],
    ["promote", "example_doubler", "--from", "dev"], ["deploy"], ["serve"],
])
def test_a_store_that_is_a_file_is_refused_by_every_command(tmp_path, args):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file")
    _refused(run_cli(*args, store=blocker, check=False), 4, str(blocker), "not a directory")


def test_a_branch_name_too_long_for_the_file_system_is_a_usage_error(tmp_path):
    long = "feature/" + "x" * 300
    _refused(run_cli("deploy", "--branch", long, store=tmp_path / "store", check=False), 2,
             "--branch", "at most 200")


def test_version_and_a_deploy_without_deploy_yaml(tmp_path):
    proc = run_cli("--version", store=tmp_path / "store")
    assert proc.stdout.strip() == f"framework {framework.__version__}"
    _refused(run_cli("deploy", store=tmp_path / "store", cwd=tmp_path, check=False), 2,
             "no deploy.yaml", str(tmp_path), "--config")
    assert not (tmp_path / "store").exists()


# -- 9. store hygiene -------------------------------------------------------------------


def test_identical_deploys_racing_publish_one_version(tmp_path):
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-m", "framework", "deploy", "--json"], cwd=REPO,
                              env=cli_env(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        outputs.append([orjson.loads(line) for line in out.splitlines()])
    s = LocalStore(store)
    for name in s.names("main"):
        assert s.versions("main", name) == [1], name
        statuses = sorted(r["status"] for run in outputs for r in run if r["name"] == name)
        assert statuses == ["new", "unchanged", "unchanged"], (name, statuses)


HOLDER = """
import fcntl, os, sys, time
stage = sys.argv[1]
os.makedirs(stage)
with open(os.path.join(stage, ".owner"), "wb") as owner:
    fcntl.flock(owner, fcntl.LOCK_EX)
    with open(os.path.join(stage, "artifact.pkl"), "wb") as f:
        f.write(b"half an artifact")
    print("holding", flush=True)
    time.sleep(600)
"""


def _hold(stage: Path) -> subprocess.Popen[str]:
    """A deploy's staging directory and its owner lock, held by a live process."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(stage)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    return proc


def test_a_killed_deploys_staging_is_cleaned_by_the_next_deploy(tmp_path):
    store = tmp_path / "store"
    (store / ".staging").mkdir(parents=True)
    killed, alive = _hold(store / ".staging" / "killed"), _hold(store / ".staging" / "running")
    try:
        killed.send_signal(signal.SIGKILL)  # a deploy killed mid-write
        killed.wait(10)
        LocalStore(store).publish("main", "echo", b"x", {"name": "echo", "branch": "main"})
        left = sorted(p.name for p in (store / ".staging").iterdir())
        assert left == ["running"], left  # a deploy still running keeps its directory
    finally:
        for p in (killed, alive):
            if p.poll() is None:
                p.terminate()
                p.wait(10)


# -- 10. no server paths in answers -----------------------------------------------------


def test_readyz_and_errors_name_no_server_path(tmp_path):
    store = tmp_path / "store"
    server = Server(store)
    try:
        store.mkdir()
        (store / "branches").write_text("not a directory")
        resp = httpx.get(server.url + "/readyz")
        assert resp.status_code == 503 and "store" in resp.json()["error"]
        assert str(tmp_path) not in resp.text
        for path in ("/v1/", "/v1/nope/latest", "/openapi.json"):
            resp = httpx.request("GET" if path != "/v1/nope/latest" else "POST",
                                 server.url + path, json={"data": 1})
            assert resp.status_code < 500 or resp.status_code == 503, resp.text
            assert str(tmp_path) not in resp.text, resp.text
        assert str(store) in server.output_once(lambda t: "/readyz" in t)  # the operator's log has it
    finally:
        server.stop()
