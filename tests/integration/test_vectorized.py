"""Vectorized deployments and micro-batching, over a real server."""

from __future__ import annotations

import textwrap
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx
import pytest

from conftest import Server, run_cli

MODULE = '''
from framework import deployment


@deployment(vectorized=True, max_batch_rows=8, max_wait_ms=50)
def sized(x):
    """Each row's answer holds the size of the call it was part of."""
    if any(v < 0 for v in x):
        raise ValueError(f"negative input in {x}")
    return [[2 * v, len(x)] for v in x]


@deployment(vectorized=True)
def adder(a, b, c=100):
    return [p + q + r for p, q, r in zip(a, b, c)]


@deployment(vectorized=True)
def short(x):
    return x[1:]


@deployment(vectorized=True)
def scalar(x):
    return 3


@deployment(vectorized=True)
def sleepy(seconds):
    import time
    time.sleep(max(seconds))
    return seconds
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    project = tmp_path_factory.mktemp("vec")
    (project / "vec.py").write_text(textwrap.dedent(MODULE))
    (project / "deploy.yaml").write_text("modules: [vec]\n")
    store = project / "store"
    run_cli("deploy", store=store, cwd=project)
    srv = Server(store)
    srv.store = store  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def test_a_batch_is_one_call_and_answers_sorted(server: Server) -> None:
    r = server.post("/v1/sized/latest", {"data": [[3, 30], [1, 10], [2, 20]]})
    assert r.status_code == 200, r.text
    assert r.json() == {"data": [[1, [20, 3]], [2, [40, 3]], [3, [60, 3]]]}


def test_rows_bind_like_row_by_row_calls(server: Server) -> None:
    rows = [[1, 1, 2, 3], [2, {"a": 1, "b": 2}], [3, 1, 2], [4, 1]]
    r = server.post("/v1/adder/latest", {"data": rows, "partial": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["data"] == [[1, 6], [2, 103], [3, 103]]
    [[bad_id, error]] = body["errors"]
    assert bad_id == 4 and error.startswith("TypeError") and "'b'" in error


def test_a_single_call_is_a_one_row_call(server: Server) -> None:
    assert server.post("/v1/adder/latest", {"data": [1, 2, 3]}).json() == {"data": 6}
    assert server.post("/v1/sized/latest", {"data": 5}).json() == {"data": [10, 1]}
    assert server.post("/v1/sized/latest", {"data": []}).json() == {"data": []}


@pytest.mark.parametrize("name, got", [("short", "returned 1 results for 2 rows"),
                                       ("scalar", "returned a int for 2 rows")])
def test_a_result_of_the_wrong_length_is_a_clear_error(server: Server, name: str, got: str) -> None:
    r = server.post(f"/v1/{name}/latest", {"data": [[1, 1], [2, 2]]})
    assert r.status_code == 422
    message = r.json()["error"].splitlines()[-1]
    assert got in message and "one result per row" in message
    assert server.post(f"/v1/{name}/latest", {"data": 1}).status_code == 422


def _concurrently(server: Server, bodies: list[dict]) -> list[httpx.Response]:
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: client.post(server.url + "/v1/sized/latest", json=b), bodies))


def test_concurrent_requests_are_gathered_into_calls_of_at_most_max_rows(server: Server) -> None:
    answers = _concurrently(server, [{"data": [[i, i]]} for i in range(24)])
    sizes = []
    for i, r in enumerate(answers):
        assert r.status_code == 200, r.text
        [[row_id, [double, size]]] = r.json()["data"]
        assert (row_id, double) == (i, 2 * i)
        sizes.append(size)
    assert max(sizes) > 1, "no two requests shared a call"
    assert max(sizes) <= 8


def test_a_failed_micro_batch_fails_the_requests_it_held(server: Server) -> None:
    """Running the neighbours of a bad row again on their own would run the function twice
    over their rows: each request of a failed call gets its error instead."""
    bodies = [{"data": [[1, i], [2, i + 1]]} for i in range(8)]
    bodies[3] = {"data": [[1, 5], [2, -1]]}
    answers = _concurrently(server, bodies)
    assert answers[3].status_code == 422
    assert "ValueError: negative input" in answers[3].json()["error"]
    for i, r in enumerate(answers):
        if r.status_code == 200:  # not in the bad row's call
            assert [v[0] for _, v in r.json()["data"]] == [2 * i, 2 * i + 2]
        else:
            assert r.status_code == 422 and "ValueError: negative input" in r.json()["error"], r.text


def test_a_larger_request_is_split_into_calls_of_max_rows(server: Server) -> None:
    r = server.post("/v1/sized/latest", {"data": [[i, i] for i in range(20)]})
    assert r.status_code == 200
    assert [v for _, v in r.json()["data"]] == [[2 * i, 8 if i < 16 else 4] for i in range(20)]


def test_timeouts_hold_for_vectorized_calls(server: Server) -> None:
    r = server.post("/v1/sleepy/latest", {"data": [[1, 3]], "timeout_seconds": 0.3})
    assert r.status_code == 504
    assert server.post("/v1/sized/latest", {"data": 1}).status_code == 200


def test_options_are_recorded_in_the_manifest(server: Server) -> None:
    shown = run_cli("show", "sized", store=server.store).stdout
    assert '"vectorized": true' in shown and '"max_batch_rows": 8' in shown
    assert '"max_wait_ms": 50.0' in shown
