"""Nothing stale, nothing forged, nothing leaked (issue 14), against real servers and stores.

Freshness tests leave an idle gap (no request at all) between a change and the
first request after it: that first request must see the change. Nothing here
asserts how long anything took.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

import framework
from conftest import REPO, Server, cli_env, free_port, run_cli, stop_process
from framework.store.local import LocalStore

KEY = "k" * 16 + "-trust-signing-key"
IDLE_S = 2.5  # no request at all, longer than any cache's former time to live


def triple(x: int) -> int:
    return 3 * x


def quadruple(x: int) -> int:
    return 4 * x


def call(server: Server, path: str, x: int, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": key} if key else {}
    return server.post(path, {"data": x}, headers=headers)


@pytest.fixture
def copied(tmp_path: Path, examples_store: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(examples_store, store)
    return store


# -- 1. freshness: changes are seen by the first request after an idle spell ---------


def test_first_request_after_idle_sees_deploy_alias_and_rollback(tmp_path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.delenv("FRAMEWORK_SIGNING_KEY", raising=False)
    assert framework.deploy(triple, name="scaler", store=str(store)) == 1
    server = Server(store)
    try:
        assert call(server, "/v1/scaler/latest", 2).json() == {"data": 6}  # `latest` now known

        assert framework.deploy(quadruple, name="scaler", store=str(store)) == 2
        time.sleep(IDLE_S)
        assert call(server, "/v1/scaler/latest", 2).json() == {"data": 8}, "a stale latest"

        run_cli("alias", "set", "scaler", "prod", "1", store=store)
        time.sleep(IDLE_S)
        assert call(server, "/v1/scaler/prod", 2).json() == {"data": 6}
        run_cli("alias", "set", "scaler", "prod", "2", store=store)
        time.sleep(IDLE_S)
        assert call(server, "/v1/scaler/prod", 2).json() == {"data": 8}, "a stale alias"

        run_cli("alias", "rm", "scaler", "prod", store=store)
        time.sleep(IDLE_S)
        gone = call(server, "/v1/scaler/prod", 2)
        assert gone.status_code == 404 and "prod" in gone.json()["error"], "a removed alias answered"

        run_cli("rollback", "scaler", store=store)  # v1's content becomes v3, the new latest
        time.sleep(IDLE_S)
        assert call(server, "/v1/scaler/latest", 2).json() == {"data": 6}, "a stale rollback"
        assert call(server, "/v1/scaler/2", 2).json() == {"data": 8}  # pinned stays pinned
    finally:
        server.stop()


def test_first_request_after_idle_sees_keys_created_and_revoked(copied):
    server = Server(copied)
    try:
        assert call(server, "/v1/example_doubler/latest", 1).status_code == 200  # keys off
        key = run_cli("keys", "create", store=copied).stdout.strip()
        time.sleep(IDLE_S)
        first = call(server, "/v1/example_doubler/latest", 1)
        assert first.status_code == 401, "the first unkeyed request after `keys create` got in"
        assert call(server, "/v1/example_doubler/latest", 1, key).json() == {"data": 2}

        run_cli("keys", "revoke", key, store=copied)
        time.sleep(IDLE_S)
        assert call(server, "/v1/example_doubler/latest", 1, key).status_code == 401, \
            "a revoked key was accepted once"
    finally:
        server.stop()


# -- 2. keys behind a path prefix ---------------------------------------------------


def _scoped_keys(store: Path) -> tuple[str, str]:
    """(a key for example_doubler only, a key for example_adder only)."""
    doubler = run_cli("keys", "create", "--deployments", "example_doubler", store=store).stdout.strip()
    adder = run_cli("keys", "create", "--deployments", "example_adder", store=store).stdout.strip()
    return doubler, adder


def _check_prefixed(url: str, doubler: str, adder: str) -> None:
    target = url + "/v1/example_doubler/latest"
    body = {"data": 4}
    assert httpx.post(target, json=body, timeout=30).status_code == 401
    assert httpx.post(target, json=body, headers={"Authorization": adder}, timeout=30).status_code == 403
    ok = httpx.post(target, json=body, headers={"Authorization": doubler}, timeout=30)
    assert ok.json() == {"data": 8}
    for path in ("/v1/", "/v1/example_doubler", "/openapi.json"):
        assert httpx.get(url + path, timeout=30).status_code == 401, path
    listed = httpx.get(url + "/v1/", headers={"Authorization": doubler}, timeout=30).json()
    assert [d["name"] for d in listed["deployments"]] == ["example_doubler"]
    assert httpx.get(url + "/healthz", timeout=30).status_code == 200  # probes need no key


def test_keys_hold_under_serve_root_path(copied):
    doubler, adder = _scoped_keys(copied)
    server = Server(copied, "--root-path", "/ml")
    try:
        # A proxy that strips /ml forwards /v1/...; uvicorn puts the prefix back in the path.
        _check_prefixed(server.url, doubler, adder)
    finally:
        server.stop()


MOUNTED = '''\
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from framework.serve.app import create_app

inner = create_app()


async def home(request):
    return PlainTextResponse("the host app")


# A mounted app's lifespan is its host's to run: it starts the background refresher.
app = Starlette(routes=[Route("/", home), Mount("/ml", inner)],
                lifespan=lambda host: inner.router.lifespan_context(inner))
'''


def test_keys_hold_with_the_app_mounted_in_another_starlette_app(copied, tmp_path):
    doubler, adder = _scoped_keys(copied)
    (tmp_path / "hostapp.py").write_text(MOUNTED)
    port = free_port()
    log = open(tmp_path / "uvicorn.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "hostapp:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=cli_env(copied), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "uvicorn.log").read_text()
            try:
                if httpx.get(url + "/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the host app never answered"
            time.sleep(0.05)
        _check_prefixed(url + "/ml", doubler, adder)
    finally:
        stop_process(proc)
        log.close()


# -- 3. a signature binds a version to its place ------------------------------------


def test_signed_versions_moved_in_the_store_are_refused(tmp_path):
    store = tmp_path / "store"
    run_cli("deploy", store=store, FRAMEWORK_SIGNING_KEY=KEY)
    run_cli("deploy", "--branch", "pr-7", store=store, FRAMEWORK_SIGNING_KEY=KEY)
    main = store / "branches" / "main"
    shutil.copytree(main / "example_adder" / "1", main / "example_doubler" / "2")  # copied
    os.symlink(main / "example_adder" / "1", main / "example_doubler" / "3")  # linked
    shutil.copytree(store / "branches" / "pr-7" / "example_doubler" / "1",
                    main / "example_doubler" / "4")  # a pull request's version, into main
    edited = main / "example_doubler" / "5"
    shutil.copytree(main / "example_doubler" / "1", edited)  # the same, its version edited
    m = orjson.loads((edited / "manifest.json").read_bytes())
    (edited / "manifest.json").write_bytes(orjson.dumps({**m, "version": 5}))

    server = Server(store, FRAMEWORK_SIGNING_KEY=KEY)
    try:
        assert call(server, "/v1/example_doubler/1", 3).json() == {"data": 6}
        expected = {2: ["example_adder v1", "example_doubler v2"],
                    3: ["example_adder v1", "example_doubler v3"],
                    4: ["branch 'pr-7'", "branch 'main'"],
                    5: ["does not match its signature"]}
        for version, fragments in expected.items():
            resp = call(server, f"/v1/example_doubler/{version}", 3)
            assert resp.status_code == 409, resp.text
            assert all(f in resp.json()["error"] for f in fragments), resp.json()["error"]
        latest = call(server, "/v1/example_doubler/latest", 3)
        assert latest.status_code == 409  # latest is v5, the edited one
        # every other deployment, and the genuine version, keep working
        assert call(server, "/v1/example_adder/1", 3).status_code == 422  # takes three arguments
        assert server.post("/v1/example_adder/1", {"data": [1, 2, 3]}).json() == {"data": 6}
        assert call(server, "/v1/example_doubler/pr-7/latest", 3).json() == {"data": 6}
        assert call(server, "/v1/example_doubler/1", 5).json() == {"data": 10}
        metrics = httpx.get(server.url + "/metrics").text
        assert 'deployment="example_doubler",version="1"' in metrics.replace('branch="main",', "")
        assert 'version="5"' not in metrics, "a refused version showed up in the metrics"
    finally:
        server.stop()


# -- 4. reproducible artifacts --------------------------------------------------------

PROJECT_MODULE = '''\
from framework import deployment
from proj import util


def helper(x):
    if x < 0:
        raise ValueError("negative input " + str(x))
    return x + util.STEP


@deployment
def plus_one(x: int):
    return helper(x)
'''


def _checkout(at: Path) -> Path:
    (at / "proj").mkdir(parents=True)
    (at / "proj" / "__init__.py").write_text("")
    (at / "proj" / "model.py").write_text(PROJECT_MODULE)
    (at / "proj" / "util.py").write_text("STEP = 1\n")  # a module object the function refers to
    (at / "deploy.yaml").write_text("modules: [proj.model, deployments.examples]\n")
    shutil.copytree(REPO / "deployments", at / "deployments",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return at


def test_same_commit_from_two_checkouts_is_unchanged_and_has_no_paths(tmp_path):
    store = tmp_path / "store"
    first, second = _checkout(tmp_path / "runner-a" / "src"), _checkout(tmp_path / "runner-b" / "x")
    run_cli("deploy", "--json", store=store, cwd=first)
    records = [orjson.loads(line) for line in run_cli("deploy", "--json", store=store,
                                                      cwd=second).stdout.splitlines()]
    assert records and {r["status"] for r in records} == {"unchanged"}, records
    for path in store.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for leaked in (b"runner-a", b"runner-b", str(tmp_path).encode()):
                assert leaked not in data, f"{path} holds {leaked!r}"
    manifest = LocalStore(store).read_manifest("main", "plus_one", 1)
    assert manifest["git"] is None  # no git here: nothing of the checkout in the manifest
    assert manifest["sources"]["proj/model.py"] == PROJECT_MODULE

    # Tracebacks name the relative file and show its lines, from the manifest's copy.
    shutil.rmtree(first)
    shutil.rmtree(second)
    server = Server(store, cwd=tmp_path)
    try:
        assert call(server, "/v1/plus_one/latest", 4).json() == {"data": 5}
        resp = call(server, "/v1/plus_one/latest", -4)
        assert resp.status_code == 422 and "negative input -4" in resp.json()["error"]
        log = server.output_once(lambda text: "negative input -4" in text and "line" in text)
        assert 'File "proj/model.py", line 7, in helper' in log, log
        assert 'raise ValueError("negative input " + str(x))' in log, log
        assert "<dynamic-code>" not in log and str(tmp_path / "runner") not in log
    finally:
        server.stop()
