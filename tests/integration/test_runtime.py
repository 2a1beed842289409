"""The HTTP protocol, against a real `framework serve` over a real store."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import orjson
import pytest

from conftest import REPO, Server, run_cli

SAMPLE = REPO / "tests" / "sample"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}  # what `curl -d` sends


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sample") / "store"
    run_cli("deploy", store=path, cwd=SAMPLE)
    run_cli("deploy", "--branch", "feature/x", store=path, cwd=SAMPLE)
    return path


@pytest.fixture(scope="module")
def sample(sample_store: Path) -> Iterator[Server]:
    server = Server(sample_store, cwd=SAMPLE)
    yield server
    server.stop()


def assert_error(resp: httpx.Response, status: int, *fragments: str) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    message = resp.json()["error"]
    assert not message.endswith("\n")
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- the batch-inference doc, byte for byte --------------------------------------

DOC_EXAMPLES = [
    ("example_doubler", b'{"data": [[1, 10], [2, 11], [3, 12]]}', b'{"data":[[1,20],[2,22],[3,24]]}'),
    ("example_dict_doubler", b'{"data": [[1, {"value": 10}], [2, {"value": 20}]]}',
     b'{"data":[[1,20],[2,40]]}'),
    ("example_adder", b'{"data": [[1, 3, 4, 5], [2, 6, 7, 8]]}', b'{"data":[[1,12],[2,21]]}'),
]


@pytest.mark.parametrize("name,request_body,expected", DOC_EXAMPLES)
def test_doc_examples_with_curls_content_type(examples_server, name, request_body, expected):
    resp = examples_server.post(f"/v1/{name}/latest", request_body, headers=FORM)
    assert resp.status_code == 200
    assert resp.content == expected


@pytest.mark.parametrize("name,request_body,expected", DOC_EXAMPLES)
def test_doc_examples_with_requests_style_json_dumps(examples_server, name, request_body, expected):
    body = json.dumps(json.loads(request_body))  # requests.post(url, data=json.dumps(...))
    resp = examples_server.post(f"/v1/{name}/main/latest", body)
    assert resp.json() == json.loads(expected)


@pytest.mark.parametrize("name,data,expected", [
    ("example_doubler", 10, 20),
    ("example_dict_doubler", {"value": 21}, 42),
    ("example_adder", [3, 4, 5], 12),
    ("example_adder", {"a": 1, "b": 2, "c": 3}, 6),
])
def test_single_calls(examples_server, name, data, expected):
    resp = examples_server.post(f"/v1/{name}/1", {"data": data})
    assert resp.status_code == 200
    assert resp.json() == {"data": expected}


def test_iris_model_answers_like_the_model(examples_server):
    rows = [[1, 5.0, 3.4, 1.5, 0.2], [2, 5.9, 2.8, 4.3, 1.3], [3, 6.7, 3.0, 5.7, 2.2]]
    data = examples_server.post("/v1/iris_species/latest", {"data": rows}).json()["data"]
    assert [r[1]["species"] for r in data] == ["setosa", "versicolor", "virginica"]
    for _, answer in data:
        assert abs(sum(answer["probabilities"].values()) - 1) < 1e-3


# -- single vs batch -----------------------------------------------------------


def test_batch_false_passes_a_list_of_lists_as_one_argument(sample):
    resp = sample.post("/v1/count_rows/latest", {"data": [[1, 2], [3, 4], [5, 6]], "batch": False})
    assert resp.json() == {"data": 3}
    as_batch = sample.post("/v1/echo/latest", {"data": [[1, 2], [3, 4]]})
    assert as_batch.json() == {"data": [[1, 2], [3, 4]]}


def test_empty_batch(sample):
    assert sample.post("/v1/echo/latest", {"data": []}).json() == {"data": []}


def test_single_call_spreads_only_when_the_signature_fits(sample):
    assert sample.post("/v1/greet/latest", {"data": ["ada"]}).json() == {"data": "hello ada"}
    assert sample.post("/v1/greet/latest", {"data": ["ada", "hi"]}).json() == {"data": "hi ada"}
    assert sample.post("/v1/greet/latest", {"data": {"name": "bo", "greeting": "hey"}}).json() == {
        "data": "hey bo"}
    assert sample.post("/v1/echo/latest", {"data": [1, 2, 3]}).json() == {"data": [1, 2, 3]}
    assert sample.post("/v1/echo/latest", {"data": {"x": 1}}).json() == {"data": {"x": 1}}


def test_dict_rows_are_keyword_arguments_for_several_parameters(sample):
    rows = [[1, {"name": "ada", "greeting": "hi"}], [2, "bo"], [3, "cy", "yo"]]
    assert sample.post("/v1/greet/latest", {"data": rows}).json() == {
        "data": [[1, "hi ada"], [2, "hello bo"], [3, "yo cy"]]}


def test_answers_are_sorted_numbers_first_then_strings(sample):
    rows = [["b", 1], [10, 2], ["a", 3], [2, 4], [1.5, 5], ["B", 6], [-3, 7]]
    data = sample.post("/v1/echo/latest", {"data": rows}).json()["data"]
    assert [r[0] for r in data] == [-3, 1.5, 2, 10, "B", "a", "b"]
    assert dict(map(tuple, data)) == {r[0]: r[1] for r in rows}


def test_ten_thousand_rows(examples_server):
    rows = [[i, i] for i in range(10_000, 0, -1)]
    data = examples_server.post("/v1/example_doubler/latest", {"data": rows}).json()["data"]
    assert data == [[i, 2 * i] for i in range(1, 10_001)]


def test_async_deployment_is_awaited(sample):
    rows = [[i, i] for i in range(50)]
    assert sample.post("/v1/async_doubler/latest", {"data": rows}).json() == {
        "data": [[i, 2 * i] for i in range(50)]}
    assert sample.post("/v1/async_doubler/latest", {"data": 4}).json() == {"data": 8}


# -- row errors ----------------------------------------------------------------


def test_failed_rows_answer_422_with_every_error_and_run_every_row(sample):
    rows = [[3, 4], [1, -1], [2, 9], ["z", -2], [0, "x"]]
    resp = sample.post("/v1/fails_on_negative/latest", {"data": rows})
    message = assert_error(resp, 422, "first failed id 0")
    assert message.splitlines()[-1].startswith("TypeError: ")
    errors = resp.json()["errors"]
    assert [e[0] for e in errors] == [0, 1, "z"]
    assert errors[1][1] == "ValueError: negative input -1"
    assert errors[2][1] == "ValueError: negative input -2"


def test_partial_answers_200_with_data_and_errors(sample):
    rows = [[3, 4], [1, -1], [2, 9], [4, 1, 2]]
    resp = sample.post("/v1/fails_on_negative/latest", {"data": rows, "partial": True})
    assert resp.status_code == 200
    assert resp.json()["data"] == [[2, 3.0], [3, 2.0]]
    assert [e[0] for e in resp.json()["errors"]] == [1, 4]
    assert resp.json()["errors"][1][1].startswith("TypeError: ")  # wrong arity is a row error


def test_single_call_that_raises_is_422_with_the_cause_last(sample):
    resp = sample.post("/v1/fails_on_negative/latest", {"data": -5})
    message = assert_error(resp, 422)
    assert message.splitlines()[-1] == "ValueError: negative input -5"
    assert "Traceback" not in message
    assert "Traceback" in sample.output()  # ... it went to the server log


# -- encodings -------------------------------------------------------------------


@pytest.mark.parametrize("kind,expected", [
    ("numpy_scalar", 1.5), ("numpy_int", 7), ("numpy_array", [0, 1, 2]), ("nan", None),
    ("inf", None), ("datetime", "2026-01-02T03:04:05"), ("date", "2026-01-02"),
    ("dataclass", {"x": 1.0, "y": 2.0}),
])
def test_results_encode(sample, kind, expected):
    assert sample.post("/v1/encodings/latest", {"data": [[1, kind]]}).json() == {
        "data": [[1, expected]]}


def test_unencodable_result_is_a_row_error_naming_its_type(sample):
    resp = sample.post("/v1/encodings/latest", {"data": [[1, "opaque"], [2, "nan"]], "partial": True})
    assert resp.json()["data"] == [[2, None]]
    [[row_id, error]] = resp.json()["errors"]
    assert row_id == 1 and "Opaque" in error and error.startswith("TypeError: ")
    single = sample.post("/v1/encodings/latest", {"data": "opaque"})
    assert_error(single, 422, "Opaque")


# -- malformed requests ----------------------------------------------------------


@pytest.mark.parametrize("body,fragment", [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", '"data"'),
    (b'{"rows": []}', '"data"'),
    (b'{"data": [[1, 1], 5], "batch": true}', "row 1"),
    (b'{"data": [[1, 1], []]}', "row 1"),
    (b'{"data": [[true, 1]]}', "row 0 has an invalid id"),
    (b'{"data": [[null, 1]]}', "row 0 has an invalid id"),
    (b'{"data": [[[1], 1]]}', "row 0 has an invalid id"),
    (b'{"data": [[1, 1], [2, 2], [1, 3]]}', "id 1 appears more than once (row 2)"),
    (b'{"data": 1, "batch": "yes"}', '"batch"'),
    (b'{"data": 1, "timeout_seconds": -1}', '"timeout_seconds"'),
    (b'{"data": 1, "response_webhook": "http://127.0.0.1:1/"}', '"response_webhook"'),
    (b'{"data": [[1, 123456789012345678901234]]}', "beyond 64 bits"),
    (b'{"data": [[-9223372036854775809, 1]]}', "beyond 64 bits"),
    (b'{"data": [NaN, "12345678901234567890"]}', "not valid JSON"),
])
def test_malformed_bodies_are_400(sample, body, fragment):
    assert_error(sample.post("/v1/echo/latest", body), 400, fragment)


def test_integers_to_64_bits_and_long_digit_strings_come_back_exactly(sample):
    body = (b'{"data": [[18446744073709551615, "12345678901234567890123"], '
            b'[-9223372036854775808, 0.12345678901234567891]]}')
    resp = sample.post("/v1/echo/latest", body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"] == [[-9223372036854775808, 0.12345678901234568],
                                   [18446744073709551615, "12345678901234567890123"]]


def test_tolerated_keys(sample):
    body = {"data": [[1, 2]], "response_format": None, "timeout_seconds": 5, "workspace": "x"}
    assert sample.post("/v1/echo/latest", body).json() == {"data": [[1, 2]]}


@pytest.mark.parametrize("path,fragment", [
    ("/v1/nope/latest", "'nope'"),
    ("/v1/echo/99", "no version 99"),
    ("/v1/echo/prod", "no alias 'prod'"),
    ("/v1/echo/nobranch/latest", "'nobranch'"),
    ("/v1/echo/main/latest/extra", "no route"),
    ("/v2/echo/latest", "no route"),
])
def test_unknown_things_are_404(sample, path, fragment):
    assert_error(sample.post(path, {"data": 1}), 404, fragment)


def test_wrong_method_is_405_json(sample):
    assert_error(httpx.delete(sample.url + "/v1/echo/latest"), 405, "DELETE")
    assert_error(httpx.put(sample.url + "/v1/echo/main/latest"), 405, "PUT")


def test_body_over_the_limit_is_413(sample):
    big = b'{"data": "' + b"x" * 2_100_000 + b'"}'
    assert_error(sample.post("/v1/echo/latest", big), 413, "limit")
    # chunked, without a Content-Length, is counted as it arrives
    resp = httpx.post(sample.url + "/v1/echo/latest", content=iter([big[:1_000_000], big[1_000_000:]]))
    assert_error(resp, 413, "limit")


def test_timeout_seconds_is_honoured_with_504(sample):
    resp = sample.post("/v1/sleeper/latest", {"data": 3, "timeout_seconds": 0.3})
    assert_error(resp, 504, "0.3 s")


# -- versions, branches, concurrency ------------------------------------------------


def test_branch_with_a_slash_is_sent_as_tilde(sample):
    assert sample.post("/v1/echo/feature~x/latest", {"data": [[1, "b"]]}).json() == {"data": [[1, "b"]]}
    listing = httpx.get(sample.url + "/v1/echo/feature~x").json()
    assert listing["branch"] == "feature/x" and listing["latest"] == 1


def test_listing_and_health(sample):
    names = {(d["name"], d["branch"]) for d in httpx.get(sample.url + "/v1/").json()["deployments"]}
    assert {("echo", "main"), ("greet", "feature/x")} <= names
    info = httpx.get(sample.url + "/v1/greet").json()
    assert info["latest"] == 1 and info["versions"][0]["version"] == 1
    assert httpx.get(sample.url + "/healthz").json()["status"] == "ok"


def test_a_blocked_deployment_does_not_stop_others(sample):
    slow = threading.Thread(target=sample.post, args=("/v1/sleeper/latest", {"data": [[i, 2] for i in range(8)]}))
    slow.start()
    time.sleep(0.2)
    assert sample.post("/v1/echo/latest", {"data": 5}).json() == {"data": 5}
    assert slow.is_alive()  # answered while the sleeper still ran
    slow.join()


def test_concurrent_clients_each_get_their_own_answers(examples_server):
    def call(client_id: int) -> None:
        for k in range(20):
            rows = [[f"{client_id}-{k}-{i}", client_id * 1000 + i] for i in range(10)]
            data = examples_server.post("/v1/example_doubler/latest", {"data": rows}).json()["data"]
            assert data == sorted([[r[0], 2 * r[1]] for r in rows])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(call, range(16)))


def test_versions_load_lazily_into_a_bounded_cache(tmp_path):
    store = tmp_path / "store"
    project = tmp_path / "proj"
    project.mkdir()
    (project / "deploy.yaml").write_text("modules: [m]\nserver: {cache_size: 2, preload: false}\n")
    for k in range(4):
        (project / "m.py").write_text(f"from framework import deployment\n@deployment\ndef f(x):\n    return x + {k}\n")
        run_cli("deploy", store=store, cwd=project)
    server = Server(store, cwd=project)
    try:
        assert httpx.get(server.url + "/healthz").json()["loaded"] == 0
        for k in range(4):
            assert server.post(f"/v1/f/{k + 1}", {"data": 1}).json() == {"data": 1 + k}
        assert httpx.get(server.url + "/healthz").json()["loaded"] == 2
    finally:
        server.stop()


def test_pinned_versions_survive_a_live_redeploy(tmp_path):
    store = tmp_path / "store"
    project = tmp_path / "proj"
    project.mkdir()
    (project / "deploy.yaml").write_text("modules: [m]\n")
    module = project / "m.py"
    module.write_text("from framework import deployment\n@deployment\ndef f(x):\n    return ['v1', x]\n")
    run_cli("deploy", store=store, cwd=project)
    server = Server(store, cwd=project)
    try:
        assert server.post("/v1/f/latest", {"data": 1}).json() == {"data": ["v1", 1]}
        module.write_text("from framework import deployment\n@deployment\ndef f(x):\n    return ['v2', x]\n")
        assert "new" in run_cli("deploy", store=store, cwd=project).stdout
        deadline = time.monotonic() + 30  # generous: that latest moves is checked, not how soon
        while server.post("/v1/f/latest", {"data": 1}).json() != {"data": ["v2", 1]}:
            assert time.monotonic() < deadline, "latest did not move to version 2 within 30 s"
            time.sleep(0.1)
        assert server.post("/v1/f/1", {"data": 1}).json() == {"data": ["v1", 1]}
        assert server.post("/v1/f/main/2", {"data": 1}).json() == {"data": ["v2", 1]}
    finally:
        server.stop()


def test_overload_is_503_with_retry_after(tmp_path, sample_store):
    (tmp_path / "deploy.yaml").write_text("server: {max_concurrency: 1}\n")
    server = Server(sample_store, cwd=tmp_path)
    try:
        slow = threading.Thread(target=server.post, args=("/v1/sleeper/latest", {"data": 1.5}))
        slow.start()
        time.sleep(0.5)
        resp = server.post("/v1/echo/latest", {"data": 1})
        assert_error(resp, 503, "busy")
        assert resp.headers["retry-after"]
        slow.join()
        assert server.post("/v1/echo/latest", {"data": 1}).json() == {"data": 1}
    finally:
        server.stop()


def test_tampered_artifact_is_refused_with_409(tmp_path):
    store = tmp_path / "store"
    run_cli("deploy", store=store)
    artifact = store / "branches" / "main" / "example_doubler" / "1" / "artifact.pkl"
    data = bytearray(artifact.read_bytes())
    data[-5] ^= 1
    artifact.write_bytes(bytes(data))
    server = Server(store)
    try:
        assert_error(server.post("/v1/example_doubler/latest", {"data": 1}), 409, "does not match")
        assert server.post("/v1/example_adder/latest", {"data": [1, 2, 3]}).json() == {"data": 6}
    finally:
        server.stop()


def test_responses_are_compact_json(examples_server):
    resp = examples_server.post("/v1/example_doubler/latest", {"data": [[1, 1]]})
    assert resp.content == orjson.dumps({"data": [[1, 2]]})


def test_loading_counts_against_the_time_limit(sample_store, tmp_path):
    config = tmp_path / "deploy.yaml"  # the sample's settings, without loading versions ahead
    config.write_text((SAMPLE / "deploy.yaml").read_text() + "  preload: false\n")
    sample = Server(sample_store, cwd=SAMPLE, FRAMEWORK_CONFIG=str(config))
    try:
        resp = sample.post("/v1/slow_to_load/latest", {"data": 1, "timeout_seconds": 0.5})
        assert_error(resp, 504, "did not load within 0.5 s")
        deadline = time.monotonic() + 30  # the load went on: a later call is answered
        while (resp := sample.post("/v1/slow_to_load/latest",
                                   {"data": 2, "timeout_seconds": 5})).status_code != 200:
            assert time.monotonic() < deadline, resp.text
        assert resp.json() == {"data": 2}
    finally:
        sample.stop()


def test_a_version_that_fails_to_load_says_what_to_do(sample):
    message = assert_error(sample.post("/v1/fails_to_load/latest", {"data": 1}), 422, "roll back")
    assert message.splitlines()[-1] == "RuntimeError: weights file missing"


@pytest.mark.parametrize("path", ["/v1/bad!name/latest", "/v1/%C3%A9t%C3%A9/latest"])
def test_an_invalid_name_in_the_url_is_404(sample, path):
    assert_error(sample.post(path, {"data": 1}), 404, "no deployment")
    assert_error(httpx.get(sample.url + path.rsplit("/", 1)[0]), 404, "no deployment")


def test_405_says_which_methods_are_allowed(sample):
    resp = httpx.get(sample.url + "/v1/echo/main/latest")
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"
    resp = httpx.put(sample.url + "/v1/echo/latest")  # runs with POST, describes branch "latest" with GET
    assert resp.status_code == 405 and {"GET", "POST"} <= set(resp.headers["allow"].split(", "))


def test_version_numbers_are_read_as_numbers(sample):
    assert sample.post("/v1/echo/01", {"data": 1}).json() == {"data": 1}
    assert sample.post("/v1/echo/main/001", {"data": 2}).json() == {"data": 2}


def test_requests_queued_on_an_evicted_version_still_get_their_answer(tmp_path, sample_store):
    (tmp_path / "deploy.yaml").write_text("server: {cache_size: 1}\n")
    server = Server(sample_store, cwd=tmp_path)
    try:
        with ThreadPoolExecutor(6) as pool:
            slow = [pool.submit(server.post, "/v1/sleeper/latest", {"data": 0.8}) for _ in range(4)]
            time.sleep(0.3)  # one runs, three wait on sleeper's thread; now evict sleeper
            for name in ("echo", "greet", "echo"):
                assert server.post(f"/v1/{name}/latest", {"data": ["x"]}).status_code == 200
            assert [f.result().json() for f in slow] == [{"data": 0.8}] * 4
    finally:
        server.stop()
