"""Modelbit's `response_webhook` and `response_format: "links"`, on real servers.

Webhooks go to a receiver this module starts on 127.0.0.1, which the servers
allow through `server.webhook_allow`; a server without that entry refuses it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import yaml

import framework
from conftest import REPO, Server, free_port, run_cli, stop_process
from framework.serve.links import Links
from framework.store.local import LocalStore

SAMPLE = REPO / "tests" / "sample"
FAST = {  # retries and scans quick, so the tests are; none of them asserts a duration
    "webhook_allow": ["127.0.0.1"],
    "webhook_backoff_seconds": 0.05,
    "webhook_backoff_max_seconds": 0.2,
    "async_poll_seconds": 0.1,
    "async_lease_seconds": 2.0,
}


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    """`check()` once it is truthy; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


class Receiver:
    """A webhook receiver: answers each POST by the next planned (status, delay), then 200."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.plan: list[tuple[int, float]] = []
        self.fail_until_armed = False
        self.got: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    status, delay = receiver.plan.pop(0) if receiver.plan else (
                        500 if receiver.fail_until_armed else 200, 0.0)
                    receiver.got.append({"path": self.path, "headers": dict(self.headers),
                                         "body": body, "status": status})
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:  # the server gave up waiting: that is the point of a slow receiver
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reset(self, plan: list[tuple[int, float]] | None = None) -> None:
        with self.lock:
            self.plan, self.got, self.fail_until_armed = list(plan or []), [], False

    def requests(self, batch_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.got if r["headers"].get("x-mb-batch-id") == batch_id]

    def successes(self, batch_id: str) -> int:
        return sum(r["status"] == 200 for r in self.requests(batch_id))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def deployed(path: Path) -> Path:
    run_cli("deploy", store=path, cwd=SAMPLE)
    return path


@pytest.fixture(scope="module")
def async_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store of the module's shared server. Every server on a store works on its jobs, so a
    test that needs its own server's settings (or its own kill) to handle a job uses a store of
    its own."""
    return deployed(tmp_path_factory.mktemp("async") / "store")


def start(store: Path, where: Path, **server: Any) -> Server:
    """A server on `store` with `server:` settings, its config and log under `where`."""
    where.mkdir(parents=True, exist_ok=True)
    config = where / "deploy.yaml"
    config.write_text(yaml.safe_dump({"server": server}))
    return Server(store, log_dir=where, FRAMEWORK_CONFIG=str(config))


@pytest.fixture(scope="module")
def server(async_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start(async_store, tmp_path_factory.mktemp("server"), **FAST)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that gives up on a receiver after 1 s (the other servers wait the default 10 s,
    so that a receiver slowed by a busy machine is not retried)."""
    where = tmp_path_factory.mktemp("impatient")
    s = start(deployed(where / "store"), where, **FAST, webhook_timeout_seconds=1.0)
    yield s
    s.stop()


@pytest.fixture
def hooks(receiver: Receiver) -> Receiver:
    receiver.reset()
    return receiver


def batch(server: Server, batch_id: str) -> dict[str, Any]:
    resp = httpx.get(f"{server.url}/v1/batches/{batch_id}", timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def finished(server: Server, batch_id: str) -> dict[str, Any]:
    return wait_for(f"batch {batch_id} to finish", lambda: (
        (b := batch(server, batch_id))["state"] in ("delivered", "failed") and b))


def accept(server: Server, path: str, body: dict[str, Any]) -> str:
    resp = server.post(path, body)
    assert resp.status_code == 200, resp.text
    assert set(resp.json()) == {"batchId"}
    return resp.json()["batchId"]


# -- response_webhook -------------------------------------------------------------


@pytest.mark.parametrize("path, body", [
    ("/v1/fails_on_negative/latest", {"data": [[1, 4], [2, -1], [3, 9]], "partial": True}),
    ("/v1/greet/latest", {"data": ["ada", "hi"]}),
])
def test_webhook_gets_the_synchronous_answer_and_the_batch_id(server: Server, hooks: Receiver,
                                                              path: str, body: dict[str, Any]) -> None:
    sync = server.post(path, body)
    assert sync.status_code == 200
    batch_id = accept(server, path, {**body, "response_webhook": f"{hooks.url}/hook?token=abc"})
    job = finished(server, batch_id)
    got = hooks.requests(batch_id)
    assert len(got) == 1
    assert got[0]["body"] == sync.content
    assert got[0]["path"] == "/hook?token=abc"  # the query string is kept
    assert got[0]["headers"]["content-type"] == "application/json"
    assert job["state"] == "delivered" and job["result_status"] == 200
    assert job["webhook"] == f"{hooks.url}/hook"  # its token is not shown
    assert [a["status"] for a in job["attempts"]] == [200]


def test_an_accepted_call_is_logged_with_its_deployment_and_version(server: Server,
                                                                   hooks: Receiver) -> None:
    # By its number: no other test calls this path, so its line is the accepted call's.
    batch_id = accept(server, "/v1/greet/1", {"data": ["ada", "hi"],
                                               "response_webhook": f"{hooks.url}/hook"})
    finished(server, batch_id)

    def accepted(line: dict[str, Any]) -> bool:
        return line.get("path") == "/v1/greet/1"

    def lines(text: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in text.splitlines() if x.startswith("{") and '"path"' in x]

    found = [x for x in lines(server.output_once(lambda t: any(map(accepted, lines(t)))))
             if accepted(x)]
    assert found and all(x["deployment"] == "greet" and x["version"] == 1 for x in found), found


@pytest.mark.parametrize("path, body, status", [
    ("/v1/fails_on_negative/latest", {"data": -1}, 422),
    ("/v1/fails_on_negative/latest", {"data": [[1, 4], [2, -1]]}, 422),
    ("/v1/sleeper/latest", {"data": 5, "timeout_seconds": 0.2}, 504),
])
def test_a_failed_inference_is_delivered_as_its_error_body(server: Server, hooks: Receiver, path: str,
                                                           body: dict[str, Any], status: int) -> None:
    sync = server.post(path, body)
    assert sync.status_code == status
    batch_id = accept(server, path, {**body, "response_webhook": f"{hooks.url}/err"})
    job = finished(server, batch_id)
    assert job["state"] == "delivered" and job["result_status"] == status
    (got,) = hooks.requests(batch_id)
    assert json.loads(got["body"]) == sync.json()
    assert "error" in json.loads(got["body"])


def test_a_receiver_failing_twice_gets_exactly_one_successful_delivery(server: Server,
                                                                        hooks: Receiver) -> None:
    hooks.reset([(500, 0), (503, 0)])
    before = scrape(server)
    batch_id = accept(server, "/v1/echo/latest", {"data": {"k": 1}, "response_webhook": hooks.url})
    job = finished(server, batch_id)
    assert job["state"] == "delivered"
    assert [a["status"] for a in job["attempts"]] == [500, 503, 200]
    assert [r["status"] for r in hooks.requests(batch_id)] == [500, 503, 200]
    assert hooks.successes(batch_id) == 1
    assert all(json.loads(r["body"]) == {"data": {"k": 1}} for r in hooks.requests(batch_id))
    after = scrape(server)
    assert after[("framework_async_jobs_total", "delivered")] > before.get(
        ("framework_async_jobs_total", "delivered"), 0)
    assert after[("framework_webhook_deliveries_total", "http_5xx")] >= before.get(
        ("framework_webhook_deliveries_total", "http_5xx"), 0) + 2


def test_a_receiver_refusing_with_a_4xx_is_not_retried(server: Server, hooks: Receiver) -> None:
    hooks.reset([(404, 0)])
    batch_id = accept(server, "/v1/echo/latest", {"data": 1, "response_webhook": hooks.url})
    job = finished(server, batch_id)
    assert job["state"] == "failed" and "404" in job["error"]
    assert len(hooks.requests(batch_id)) == 1


def test_a_slow_receiver_is_retried(impatient: Server, hooks: Receiver) -> None:
    hooks.reset([(200, 4.0)])  # slower than webhook_timeout_seconds (1 s here)
    batch_id = accept(impatient, "/v1/echo/latest", {"data": 2, "response_webhook": hooks.url})
    job = finished(impatient, batch_id)
    assert job["state"] == "delivered"
    assert len(job["attempts"]) >= 2 and job["attempts"][0]["status"] is None
    assert "no answer within" in job["attempts"][0]["error"]
    assert job["attempts"][-1]["status"] == 200
    assert len(hooks.requests(batch_id)) >= 2


def test_a_slow_receiver_is_waited_for_with_ignore_timeout(impatient: Server, hooks: Receiver) -> None:
    hooks.reset([(200, 2.5)])
    batch_id = accept(impatient, "/v1/echo/latest", {"data": 3, "response_webhook": hooks.url,
                                                     "response_webhook_ignore_timeout": True})
    job = finished(impatient, batch_id)
    assert job["state"] == "delivered"
    assert [a["status"] for a in job["attempts"]] == [200]
    assert len(hooks.requests(batch_id)) == 1


def test_attempts_are_bounded_then_the_job_fails(tmp_path: Path, hooks: Receiver) -> None:
    hooks.reset([(500, 0)] * 3)
    s = start(deployed(tmp_path / "store"), tmp_path, **{**FAST, "webhook_attempts": 3})
    try:
        batch_id = accept(s, "/v1/echo/latest", {"data": 1, "response_webhook": hooks.url})
        job = finished(s, batch_id)
        assert job["state"] == "failed" and "3 attempts" in job["error"]
        assert len(hooks.requests(batch_id)) == 3 and hooks.successes(batch_id) == 0
        s.output_once(lambda out: f"job {batch_id}" in out and "not delivered" in out)
    finally:
        s.stop()


def test_a_job_accepted_before_sigkill_is_delivered_after_a_restart(tmp_path: Path,
                                                                    hooks: Receiver) -> None:
    # Until armed the receiver fails every attempt, so nothing succeeds before the kill.
    hooks.reset()
    hooks.fail_until_armed = True
    store = deployed(tmp_path / "store")
    first = start(store, tmp_path / "first", **FAST)
    try:
        batch_id = accept(first, "/v1/sleeper/latest", {"data": 1.0, "response_webhook": hooks.url})
        first.proc.kill()
        first.proc.wait(30)
    finally:
        first.stop()
    assert hooks.successes(batch_id) == 0
    hooks.fail_until_armed = False
    second = start(store, tmp_path / "second", **FAST)
    try:
        job = finished(second, batch_id)
        assert job["state"] == "delivered"
        assert hooks.successes(batch_id) == 1
        assert json.loads(hooks.requests(batch_id)[-1]["body"]) == {"data": 1.0}
        assert job["runs"] >= 1
    finally:
        second.stop()


def test_a_stopped_server_releases_its_jobs_to_the_next_at_once(tmp_path: Path,
                                                                hooks: Receiver) -> None:
    # Leases far longer than the test waits: the job is only taken up again if it was released.
    hooks.reset()
    hooks.fail_until_armed = True
    store = deployed(tmp_path / "store")
    slow = {**FAST, "async_lease_seconds": 600.0}
    first = start(store, tmp_path / "first", **slow)
    try:
        batch_id = accept(first, "/v1/sleeper/latest", {"data": 0.5, "response_webhook": hooks.url})
    finally:
        first.stop()  # SIGTERM: a graceful stop
    assert first.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises it once stopped
    hooks.fail_until_armed = False
    second = start(store, tmp_path / "second", **slow)
    try:
        assert finished(second, batch_id)["state"] == "delivered"
        assert hooks.successes(batch_id) == 1
    finally:
        second.stop()


def test_two_replicas_deliver_each_job_once(tmp_path: Path, hooks: Receiver) -> None:
    store = deployed(tmp_path / "store")
    replicas = [start(store, tmp_path / f"r{n}", **FAST) for n in range(2)]
    try:
        ids = [accept(replicas[n % 2], "/v1/sleeper/latest",
                      {"data": 0.2, "response_webhook": hooks.url}) for n in range(6)]
        for batch_id in ids:
            assert finished(replicas[0], batch_id)["state"] == "delivered"
        assert all(len(hooks.requests(batch_id)) == 1 for batch_id in ids)
        assert all(batch(replicas[1], batch_id)["runs"] == 1 for batch_id in ids)
    finally:
        for s in replicas:
            s.stop()


# -- webhook safety (the URL and allow-list rules themselves: tests/unit/test_webhook_rules.py)


def test_a_webhook_to_loopback_without_the_allow_list_is_refused_and_nothing_sent(
        async_store: Path, tmp_path: Path, hooks: Receiver) -> None:
    s = start(async_store, tmp_path)
    jobs_before = set(LocalStore(async_store).list_docs("jobs/"))
    try:
        resp = s.post("/v1/echo/latest", {"data": 1, "response_webhook": hooks.url})
        assert resp.status_code == 400
        assert "webhook_allow" in resp.json()["error"]
        bad = s.post("/v1/echo/latest", {"data": 1, "response_webhook": 7})
        assert bad.status_code == 400 and "URL string" in bad.json()["error"]
        assert s.post("/v1/nope/latest", {"data": 1, "response_webhook": hooks.url}).status_code in (400, 404)
    finally:
        s.stop()
    assert hooks.got == []
    assert set(LocalStore(async_store).list_docs("jobs/")) <= jobs_before  # no job was stored


def test_unknown_batches_are_a_json_404(server: Server) -> None:
    resp = httpx.get(f"{server.url}/v1/batches/{'0' * 32}")
    assert resp.status_code == 404 and "no batch" in resp.json()["error"]
    # Not a batch id: the route still describes a deployment named "batches", here none.
    resp = httpx.get(f"{server.url}/v1/batches/nope")
    assert resp.status_code == 404 and "no deployment 'batches'" in resp.json()["error"]


# -- response_format: "links" -----------------------------------------------------


def test_links_serve_a_10000_row_answer(server: Server) -> None:
    body = {"data": [[i, {"x": i, "s": f"row {i}"}] for i in range(10_000)]}
    sync = server.post("/v1/echo/latest", body)
    assert sync.status_code == 200
    resp = server.post("/v1/echo/latest", {**body, "response_format": "links"})
    assert resp.status_code == 200 and set(resp.json()) == {"data"}
    url = resp.json()["data"]
    assert url.startswith(server.url + "/v1/echo/links/")
    fetched = httpx.get(url, timeout=60)
    assert fetched.status_code == 200
    assert fetched.content == sync.content
    assert server.post("/v1/echo/latest", {"data": 1, "response_format": "json"}).json() == {"data": 1}


def test_altered_links_are_refused(server: Server) -> None:
    url = server.post("/v1/echo/latest", {"data": 5, "response_format": "links"}).json()["data"]
    assert httpx.get(url).json() == {"data": 5}
    path, sig = url.split("?sig=")
    link_id = path.rsplit("/", 1)[1]
    expires, token = link_id.split(".", 1)
    altered = [
        f"{path}?sig={sig[:-1]}{'0' if sig[-1] != '0' else '1'}",
        f"{path}?sig=",
        path,
        url.replace(f"/{expires}.", f"/{int(expires) + 3600}."),
        url.replace("/v1/echo/", "/v1/greet/"),
    ]
    for bad in altered:
        resp = httpx.get(bad)
        assert resp.status_code == 403, bad
        assert "altered" in resp.json()["error"]


def test_expired_links_are_refused_and_cleaned_up(async_store: Path, tmp_path: Path) -> None:
    s = start(async_store, tmp_path, link_ttl_seconds=1)
    try:
        url = s.post("/v1/echo/latest", {"data": 6, "response_format": "links"}).json()["data"]
        resp = wait_for("the link to expire", lambda: (r := httpx.get(url)).status_code == 410 and r)
        assert "expired" in resp.json()["error"]
    finally:
        s.stop()
    link_key = "links/" + url.split("?")[0].rsplit("/", 1)[1]
    store = LocalStore(async_store)
    assert link_key in store.list_docs("links/")
    assert Links(store, ttl=1).cleanup() >= 1
    assert link_key not in store.list_docs("links/")


def test_links_and_a_webhook_together_deliver_the_link(server: Server, hooks: Receiver) -> None:
    batch_id = accept(server, "/v1/echo/latest", {"data": [[1, "a"]], "response_format": "links",
                                                  "response_webhook": hooks.url})
    assert finished(server, batch_id)["state"] == "delivered"
    (got,) = hooks.requests(batch_id)
    url = json.loads(got["body"])["data"]
    assert httpx.get(url).json() == {"data": [[1, "a"]]}


@pytest.mark.parametrize("extra", [
    {"response_format": "csv"}, {"response_webhook_ignore_timeout": True},
    {"response_webhook": "", "batch": False}, {"response_webhook": "http://x", "response_webhook_ignore_timeout": 1},
])
def test_bad_async_options_are_a_400(server: Server, extra: dict[str, Any]) -> None:
    resp = server.post("/v1/echo/latest", {"data": 1, **extra})
    assert resp.status_code == 400 and resp.json()["error"]


# -- the clients --------------------------------------------------------------------


def test_the_client_passes_the_options_through(server: Server, hooks: Receiver) -> None:
    linked = framework.get_inference("echo", [[1, 2], [2, 3]], url=server.url, response_format="links")
    assert httpx.get(linked["data"]).json() == {"data": [[1, 2], [2, 3]]}
    accepted = framework.get_inference("echo", 4, url=server.url, response_webhook=hooks.url,
                                       response_webhook_ignore_timeout=True)
    job = finished(server, accepted["batchId"])
    assert job["state"] == "delivered" and job["ignore_timeout"] is True
    assert json.loads(hooks.requests(accepted["batchId"])[0]["body"]) == {"data": 4}


def scrape(server: Server) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics").text
    return {(s.name, s.labels.get("outcome", "")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_batches_and_links_are_keyed_like_inference(tmp_path: Path, hooks: Receiver) -> None:
    store = tmp_path / "store"
    run_cli("deploy", store=store, cwd=SAMPLE)
    framework.deploy(lambda x: x, name="batches", store=str(store))
    any_key = run_cli("keys", "create", store=store).stdout.strip()
    echo_key = run_cli("keys", "create", "--deployments", "echo", store=store).stdout.strip()
    greet_key = run_cli("keys", "create", "--deployments", "greet", store=store).stdout.strip()
    s = start(store, tmp_path / "server", **FAST)
    try:
        def get(url: str, key: str | None) -> int:
            return httpx.get(url, headers={"Authorization": key} if key else {}).status_code

        resp = s.post("/v1/echo/latest", {"data": 1, "response_webhook": hooks.url},
                      headers={"Authorization": echo_key})
        assert resp.status_code == 200, resp.text
        batch_url = f"{s.url}/v1/batches/{resp.json()['batchId']}"
        assert [get(batch_url, k) for k in (None, greet_key, echo_key)] == [401, 403, 200]
        link = s.post("/v1/echo/latest", {"data": 2, "response_format": "links"},
                      headers={"Authorization": echo_key}).json()["data"]
        assert [get(link, k) for k in (None, greet_key, echo_key)] == [401, 403, 200]
        # A deployment named "batches" is still described on its branches, to keys allowed on it.
        described = f"{s.url}/v1/batches/main"
        assert [get(described, k) for k in (None, echo_key, any_key)] == [401, 403, 200]
        assert httpx.get(described, headers={"Authorization": any_key}).json()["name"] == "batches"
    finally:
        s.stop()


@pytest.fixture
def modelbit_reachable_server(async_store: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A server where the modelbit client can reach it: that client calls plain http only at
    `http://<workspace>.<region>` with ":5000" in the region, so the server listens on port
    5000 of a loopback address of its own (all of 127.0.0.0/8 is loopback)."""
    import random
    import subprocess
    import sys

    from conftest import cli_env

    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"server": {**FAST, "webhook_allow": ["127.0.0.0/8"]}}))
    for _ in range(5):  # another address if port 5000 of this one is taken
        workspace, last = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}", random.randint(1, 254)
        base = f"http://{workspace}.{last}:5000"
        with open(tmp_path / "serve.log", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "framework", "serve", "--host", f"{workspace}.{last}", "--port", "5000"],
                cwd=REPO, env=cli_env(async_store, FRAMEWORK_CONFIG=str(config)), stdout=log,
                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                        yield workspace, f"{last}:5000"
                        return
                except httpx.TransportError:
                    time.sleep(0.05)
        finally:
            stop_process(proc)
    raise AssertionError(f"no server on a port 5000:\n{(tmp_path / 'serve.log').read_text()}")


def test_the_modelbit_client_gets_a_link_and_a_batch_id(modelbit_reachable_server: tuple[str, str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The real client, where installed (`pip install modelbit`: pandas, boto3 and numpy<2, too
    # heavy for the dev extra). WORKSPACE_ID keeps its error reports off the network.
    modelbit = pytest.importorskip("modelbit", reason="the modelbit client is not installed")
    monkeypatch.setenv("WORKSPACE_ID", "framework-tests")
    workspace, region = modelbit_reachable_server
    linked = modelbit.get_inference(deployment="echo", data={"a": [1, 2]}, workspace=workspace,
                                    region=region, branch="main", response_format="links")
    assert set(linked) == {"data"}
    assert httpx.get(linked["data"]).json() == {"data": {"a": [1, 2]}}
    accepted = modelbit.get_inference(deployment="echo", data=3, workspace=workspace, region=region,
                                      branch="main", response_webhook="https://127.0.0.1:9/hook")
    assert set(accepted) == {"batchId"}


def test_a_bad_allow_entry_stops_the_server_start(async_store: Path, tmp_path: Path) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"server": {"webhook_allow": ["10.0.0.0/8", "bad host/"]}}))
    proc = run_cli("serve", "--port", str(free_port()), store=async_store, check=False, timeout=60,
                   FRAMEWORK_CONFIG=str(config))
    assert proc.returncode != 0
    assert "server.webhook_allow" in proc.stderr and "'bad host/'" in proc.stderr


START_WITHOUT_HTTPX = '''
import asyncio, sys
from framework import config
from framework.serve.app import serving_app

app = serving_app(config.load())

async def main():
    async with app.router.lifespan_context(app):  # the job worker starts here
        await asyncio.sleep(0.2)

asyncio.run(main())
print("httpx" in sys.modules)
'''


def test_the_server_starts_without_importing_httpx_which_the_first_webhook_does(tmp_path: Path) -> None:
    # httpx and what it pulls in (httpx._main, rich) slowed every start; the webhook
    # tests above show a delivery still works once it is imported.
    env = {**os.environ, "FRAMEWORK_STORE": str(tmp_path / "store")}
    env.pop("FRAMEWORK_CONFIG", None)
    out = subprocess.run([sys.executable, "-c", START_WITHOUT_HTTPX], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "httpx was imported before the server's first webhook"
