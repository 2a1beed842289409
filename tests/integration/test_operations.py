"""Metrics, request logs, health probes, faults and graceful shutdown, on real servers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import framework
from conftest import REPO, Server, run_cli

SAMPLE = REPO / "tests" / "sample"


def hangs(x: float) -> float:
    time.sleep(3600)
    return x


def exits(code: int) -> None:
    raise SystemExit(code)


def interrupts(x: int) -> None:
    raise KeyboardInterrupt


@pytest.fixture(scope="module")
def faulty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runtime tests' sample deployments, and a few that misbehave worse."""
    path = tmp_path_factory.mktemp("ops") / "store"
    run_cli("deploy", store=path, cwd=SAMPLE)
    for fn in (hangs, exits, interrupts):
        framework.deploy(fn, store=str(path))
    return path


@pytest.fixture
def server(faulty_store: Path) -> Iterator[Server]:
    server = Server(faulty_store, cwd=SAMPLE)
    yield server
    server.stop()


def scrape(server: Server) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(server.url + "/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def log_lines(server: Server, ready: Callable[[list[dict]], bool] = lambda lines: True) -> list[dict]:
    """The access-log lines, once `ready(lines)` holds (they are written in batches)."""
    def parsed(text: str) -> list[dict]:
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    return parsed(server.output_once(lambda text: ready(parsed(text))))


# -- metrics and logs -----------------------------------------------------------------


def test_metrics_count_requests_rows_errors_and_latency(server):
    assert server.post("/v1/fails_on_negative/latest", {"data": [[1, 1], [2, 2], [3, 3]]}).status_code == 200
    assert server.post("/v1/fails_on_negative/1", {"data": [[1, -1], [2, 2], [3, -3]]}).status_code == 422
    partial = server.post("/v1/fails_on_negative/latest", {"data": [[1, -1], [2, 2]], "partial": True})
    assert partial.status_code == 200 and len(partial.json()["errors"]) == 1
    assert server.post("/v1/fails_on_negative/latest", {"data": -1}).status_code == 422
    assert server.post("/v1/no_such_thing/latest", {"data": 1}).status_code == 404
    assert server.post("/v1/echo/latest", b"not json").status_code == 400

    m = scrape(server)
    fon = {"deployment": "fails_on_negative", "branch": "main", "version": "1"}
    assert sample(m, "framework_requests_total", **fon, status="200") == 2
    assert sample(m, "framework_requests_total", **fon, status="422") == 2
    assert sample(m, "framework_rows_total", **fon) == 3 + 3 + 2 + 1
    assert sample(m, "framework_row_errors_total", **fon) == 2 + 1 + 1
    assert sample(m, "framework_request_duration_seconds_count", **fon) == 4
    assert sample(m, "framework_batch_rows_count", **fon) == 3
    assert sample(m, "framework_batch_rows_sum", **fon) == 8
    # unresolved requests are counted without the names from their URL (no series explosion)
    unresolved = {"deployment": "", "branch": "", "version": ""}
    assert sample(m, "framework_requests_total", **unresolved, status="404") == 1
    assert sample(m, "framework_requests_total", **unresolved, status="400") == 1
    assert not any("no_such_thing" in str(labels) for _, labels in m)
    assert sample(m, "framework_loaded_versions", **fon) == 1
    assert ("framework_requests_in_flight", frozenset()) in m

    def ours(lines: list[dict]) -> list[dict]:
        return [line for line in lines if line["deployment"] == "fails_on_negative"]

    lines = ours(log_lines(server, lambda lines: len(ours(lines)) >= 4))
    assert [(line["status"], line["rows"], line["row_errors"], line["error"]) for line in lines] == [
        (200, 3, 0, None), (422, 3, 2, "RowsFailed"), (200, 2, 1, None), (422, 1, 1, "DeploymentFailed")]
    assert all(line["version"] == 1 and line["branch"] == "main" and line["duration_ms"] > 0
               for line in lines)
    assert not any("request_body" in line for line in log_lines(server))


def test_payloads_are_logged_only_when_asked(tmp_path, faulty_store):
    marker = "payload-marker-7f3a"
    quiet = Server(faulty_store, cwd=SAMPLE)
    try:
        quiet.post("/v1/echo/latest", {"data": marker})
    finally:
        quiet.stop()
    assert marker not in quiet.log.read_text()
    (tmp_path / "deploy.yaml").write_text("server: {log_payloads: true}\n")
    loud = Server(faulty_store, cwd=tmp_path)
    try:
        loud.post("/v1/echo/latest", {"data": marker})
    finally:
        loud.stop()
    [line] = [entry for entry in log_lines(loud) if entry["path"] == "/v1/echo/latest"]
    assert marker in line["request_body"] and marker in line["response_body"]


def test_log_lines_written_in_batches_are_all_written(faulty_store):
    server = Server(faulty_store, cwd=SAMPLE)
    try:
        for i in range(20):  # back to back: most lines wait for the next batched write
            assert server.post("/v1/echo/latest", {"data": i}).status_code == 200
    finally:
        server.stop()
    assert len([line for line in log_lines(server) if line["path"] == "/v1/echo/latest"]) == 20


def test_metrics_and_logs_can_be_turned_off(tmp_path, faulty_store):
    (tmp_path / "deploy.yaml").write_text("server: {metrics: false, access_log: false}\n")
    server = Server(faulty_store, cwd=tmp_path)
    try:
        assert server.post("/v1/echo/latest", {"data": 1}).json() == {"data": 1}
        assert httpx.get(server.url + "/metrics").status_code == 404
    finally:
        server.stop()
    assert not log_lines(server)
    # Nor uvicorn's own line per request in place of ours: off is off.
    assert "/v1/echo/latest" not in server.output_once(lambda text: True)


def test_liveness_and_readiness(tmp_path):
    store = tmp_path / "store"
    server = Server(store)
    try:
        assert httpx.get(server.url + "/livez").json() == {"status": "alive"}
        assert httpx.get(server.url + "/readyz").json()["status"] == "ready"
        store.mkdir()
        (store / "branches").write_text("not a directory")  # a store that cannot be read
        resp = httpx.get(server.url + "/readyz")
        assert resp.status_code == 503 and "store" in resp.json()["error"]
        assert httpx.get(server.url + "/livez").status_code == 200
    finally:
        server.stop()


# -- faults ------------------------------------------------------------------------------


def test_hanging_deployment_times_out_without_delaying_others(server):
    def hang() -> httpx.Response:
        # A limit far above what the calls to echo take even on a loaded machine: the test
        # asserts that they answer while these still hang, not how fast.
        return server.post("/v1/hangs/latest", {"data": 1, "timeout_seconds": 10})

    with ThreadPoolExecutor(12) as pool:
        # more hung calls than the version has threads
        hung = [pool.submit(hang) for _ in range(12)]
        time.sleep(0.3)
        for _ in range(5):
            assert server.post("/v1/echo/latest", {"data": [[1, "x"]]}).json() == {"data": [[1, "x"]]}
        assert not all(f.done() for f in hung)  # the others answered while these hung
        answers = [f.result() for f in hung]
    assert {a.status_code for a in answers} == {504}
    assert all("timeout_seconds" in a.json()["error"] for a in answers)
    assert httpx.get(server.url + "/livez").status_code == 200


@pytest.mark.parametrize("path,body,fragment", [
    ("/v1/encodings/latest", {"data": "opaque"}, "not JSON-encodable"),
    ("/v1/encodings/latest", {"data": [[1, "opaque"], [2, "nan"]]}, "not JSON-encodable"),
    ("/v1/fails_on_negative/latest", {"data": -2}, "negative input"),
    ("/v1/exits/latest", {"data": 3}, "SystemExit"),
    ("/v1/exits/latest", {"data": [[1, 3]]}, "SystemExit"),
    ("/v1/interrupts/latest", {"data": 1}, "KeyboardInterrupt"),
])
def test_a_deployment_that_misbehaves_never_takes_the_server_down(server, path, body, fragment):
    resp = server.post(path, body)
    assert server.post("/v1/echo/latest", {"data": 1}).json() == {"data": 1}
    assert resp.status_code == 422, resp.text
    assert fragment in resp.text


# -- graceful shutdown ------------------------------------------------------------------

# uvicorn re-raises the signal once it has shut down, as a process manager expects.
EXITED_ON_SIGTERM = (0, -signal.SIGTERM)


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(faulty_store):
    server = Server(faulty_store, cwd=SAMPLE)
    try:
        answer: list[httpx.Response] = []
        slow = threading.Thread(target=lambda: answer.append(
            server.post("/v1/sleeper/latest", {"data": 1.5})))
        slow.start()
        time.sleep(0.4)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):
            httpx.post(server.url + "/v1/echo/latest", json={"data": 1}, timeout=2)
        slow.join()
        assert answer[0].status_code == 200 and answer[0].json() == {"data": 1.5}
        assert server.proc.wait(10) in EXITED_ON_SIGTERM
    finally:
        server.stop()


def test_sigterm_exits_even_with_a_hung_deployment_thread(faulty_store):
    server = Server(faulty_store, cwd=SAMPLE)
    try:
        assert server.post("/v1/hangs/latest", {"data": 1, "timeout_seconds": 0.3}).status_code == 504
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(10) in EXITED_ON_SIGTERM
    finally:
        server.stop()


# -- soak -----------------------------------------------------------------------------------


def test_soak_harness_runs_clean_for_a_few_seconds():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--duration", "4",
                           "--connections", "8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout, f"the soak harness printed no summary (code {proc.returncode}):\n{proc.stderr}"
    summary = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["wrong_answers"] == 0 and summary["server_errors_5xx"] == 0
    assert summary["requests"] > 50 and {200, 400, 401, 404, 422} <= {int(s) for s in summary["statuses"]}


def test_a_serving_process_tunes_its_garbage_collector() -> None:
    """`framework serve` freezes what exists once its app is built and collects less
    often; in a process of its own here, not to change the test runner's."""
    code = ("import gc; from framework.serve.server import GC_YOUNGEST, tune_gc; before = gc.get_threshold(); "
            "tune_gc(); print(gc.get_threshold() == (GC_YOUNGEST, *before[1:]), gc.get_freeze_count() > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["True", "True"]
