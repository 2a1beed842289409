"""Property-based: thousands of random requests against a real server never get a 5xx.

Every answer must be JSON with a 2xx or 4xx status (4xx answers with an
`error` message), and the server must still answer correctly afterwards.
Bounded: about 2,100 random requests in all (under a minute).
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Server, run_cli

NAMES = ["example_doubler", "example_dict_doubler", "example_adder", "iris_species"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])



def encode(doc: Any) -> bytes:
    # the stdlib, not orjson: integers past 64 bits must reach the server too
    return json.dumps(doc).encode()


text = st.text(max_size=20)
segment = st.one_of(
    st.sampled_from(NAMES + ["latest", "1", "2", "0", "-1", "99999999999999999999", "main", "prod",
                             "feature~x", "~", ".", "..", "²", "٣", "１", "v1", "%", "%2F", " "]),
    text.filter(lambda s: s != ""),
)
paths = st.one_of(
    st.lists(segment, min_size=0, max_size=4).map(lambda segs: "/v1/" + "/".join(segs)),
    st.lists(segment, max_size=3).map(lambda segs: "/" + "/".join(segs)),
    st.sampled_from(["/v1", "/v1/", "/openapi.json", "/metrics", "/livez", "/readyz", "/healthz"]),
)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=False), text)
json_values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                     st.dictionaries(text, inner, max_size=5)), max_leaves=20)
row_id = st.one_of(st.integers(-5, 5), st.floats(allow_nan=False), st.sampled_from(["a", "b", ""]),
                   st.booleans(), st.none(), st.lists(st.integers(), max_size=2))
rows = st.lists(st.one_of(
    st.tuples(row_id, json_values).map(list),
    st.lists(json_values, max_size=5),
    json_values,
), max_size=8)
options = st.fixed_dictionaries({}, optional={
    "batch": st.one_of(st.booleans(), json_values),
    "partial": st.one_of(st.booleans(), json_values),
    # a timeout a call can exhaust is a 504 by design; random ones are only too long or invalid
    "timeout_seconds": st.one_of(st.floats(30, 1e9), st.sampled_from([0, -1, "5", True, None])),
    "response_format": st.sampled_from(["json", "csv", None, 3]),
    "response_webhook": st.sampled_from([None, "http://127.0.0.1:9/x"]),
})
documents = st.one_of(
    st.builds(lambda data, opts: {"data": data, **opts}, st.one_of(rows, json_values), options),
    json_values,
)
bodies = st.one_of(
    documents.map(encode),
    st.binary(max_size=200),
    st.sampled_from([b"", b"{", b'{"data": [[1, 2]]', b'{"data": 1e999}', b"[" * 2000 + b"]" * 2000,
                     b'{"data": [[1, 2], [1, 3]]}', b'{"data": [[NaN, 1]]}', b"\xff\xfe"]),
)
header_values = st.text(alphabet=string.printable.strip() + " ", max_size=40).map(str.strip)
headers = st.fixed_dictionaries({}, optional={
    "Content-Type": st.one_of(st.sampled_from(["application/json", "text/plain",
                                               "application/x-www-form-urlencoded",
                                               "multipart/form-data; boundary=x"]), header_values),
    "Authorization": header_values,
    "Accept": header_values,
    "X-Whatever": header_values,
})
methods = st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS"])


def check(resp: httpx.Response) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text)
    assert 200 <= resp.status_code < 500 and resp.status_code // 100 != 3, resp.status_code
    if resp.request.url.path == "/metrics" and resp.status_code == 200:
        return  # Prometheus text, by design
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    doc = resp.json()
    if resp.status_code >= 400:
        assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], doc


def assert_still_correct(url: str) -> None:
    resp = httpx.post(url + "/v1/example_doubler/latest", json={"data": [[2, 11], [1, 10]]})
    assert resp.json() == {"data": [[1, 20], [2, 22]]}
    assert httpx.post(url + "/v1/example_adder/latest", json={"data": [3, 4, 5]}).json() == {"data": 12}


@pytest.fixture(scope="module")
def client(examples_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=examples_server.url, timeout=30) as c:
        yield c
    assert_still_correct(examples_server.url)


@settings(max_examples=1200, **SETTINGS)
@given(method=methods, path=paths, body=bodies, hdrs=headers)
def test_random_requests_never_get_a_5xx(client: httpx.Client, method: str, path: str, body: bytes,
                                          hdrs: dict[str, str]) -> None:
    url = quote(path, safe="/~")
    content = None if method in ("GET", "OPTIONS") else body
    check(client.request(method, url, content=content, headers=hdrs))


@settings(max_examples=600, **SETTINGS)
@given(name=st.sampled_from(NAMES), ref=st.sampled_from(["latest", "1", "main/latest", "main/1"]),
       doc=documents)
def test_random_bodies_for_real_deployments(client: httpx.Client, name: str, ref: str, doc: Any) -> None:
    check(client.post(f"/v1/{name}/{ref}", content=encode(doc)))


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory,
          examples_store: Path) -> Iterator[tuple[httpx.Client, str]]:
    store = tmp_path_factory.mktemp("fuzzkeys") / "store"
    shutil.copytree(examples_store, store)
    key = run_cli("keys", "create", "--deployments", "example_doubler", store=store).stdout.strip()
    server = Server(store)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c, key
    server.stop()
    assert key not in server.log.read_text()


@settings(max_examples=300, **SETTINGS)
@given(auth=st.one_of(header_values, header_values.map(lambda v: ("Bearer " + v).strip())), path=paths)
def test_random_api_keys_are_refused(keyed: tuple[httpx.Client, str], auth: str, path: str) -> None:
    client, key = keyed
    resp = client.post(quote(path, safe="/~"), json={"data": [[1, 2]]},
                       headers={"Authorization": auth})
    check(resp)
    sent = resp.request.url.path  # after the client resolved any "." and ".." segments
    if sent.startswith("/v1") or sent == "/openapi.json":
        assert resp.status_code == 401, (sent, resp.text)
    good = client.post("/v1/example_doubler/latest", json={"data": [[1, 2]]},
                       headers={"Authorization": key})
    assert good.json() == {"data": [[1, 4]]}


# -- a damaged store, long names, huge numbers: 4xx naming what to do, never a 5xx ------


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory,
            examples_store: Path) -> Iterator[tuple[httpx.Client, Path]]:
    store = tmp_path_factory.mktemp("damaged") / "store"
    shutil.copytree(examples_store, store)
    run_cli("alias", "set", "example_adder", "prod", "1", store=store)
    main = store / "branches" / "main"
    manifest = main / "example_doubler" / "1" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])  # truncated mid-write by a full disk
    aliases = main / "example_adder" / "aliases.json"
    aliases.write_bytes(aliases.read_bytes()[:5])
    server = Server(store)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c, store
    server.stop()


def test_damaged_store_files_are_409s_naming_the_version(damaged) -> None:
    client, store = damaged
    for path in ("/v1/example_doubler/latest", "/v1/example_doubler/1",
                 "/v1/example_doubler/main/latest"):
        resp = client.post(path, json={"data": 1})
        check(resp)
        assert resp.status_code == 409, resp.text
        error = resp.json()["error"]
        assert "example_doubler v1" in error and "damaged" in error and "rollback" in error, error
        assert str(store) not in error
    resp = client.post("/v1/example_adder/prod", json={"data": [1, 2, 3]})
    assert resp.status_code == 409 and "aliases.json of example_adder" in resp.json()["error"]
    # the same deployment by number, and every other deployment, keep working
    assert client.post("/v1/example_adder/1", json={"data": [1, 2, 3]}).json() == {"data": 6}
    assert client.post("/v1/example_dict_doubler/latest",
                       json={"data": {"value": 2}}).json() == {"data": 4}
    listing = client.get("/v1/")
    assert listing.status_code == 200 and len(listing.json()["deployments"]) == len(NAMES)
    for path in ("/v1/example_doubler", "/v1/example_adder"):  # each describes its damage
        resp = client.get(path)
        check(resp)
        assert resp.status_code == 409, resp.text
    doc = client.get("/openapi.json")
    assert doc.status_code == 200, doc.text
    paths = doc.json()["paths"]
    assert "/v1/example_adder/{ref}" in paths and "/v1/example_doubler/{ref}" not in paths


@settings(max_examples=60, **SETTINGS)
@given(branch=st.text(alphabet=string.ascii_letters + "-_.~", min_size=200, max_size=2000),
       version=st.text(alphabet="0123456789", min_size=19, max_size=6000))
def test_long_branches_and_huge_versions_are_404s(damaged, branch: str, version: str) -> None:
    client, _ = damaged
    requests = [("POST", f"/v1/example_adder/{branch}/latest"), ("POST", f"/v1/example_adder/{version}"),
                ("POST", f"/v1/example_adder/main/{version}"), ("GET", f"/v1/example_adder/{branch}")]
    for method, path in requests:
        resp = client.request(method, quote(path, safe="/~"), json={"data": [1, 2, 3]})
        check(resp)
        assert resp.status_code in (400, 404), (path[:100], resp.status_code, resp.text[:200])


def test_openapi_publishes_no_source(examples_server: Server) -> None:
    text = httpx.get(examples_server.url + "/openapi.json").text
    assert "example_doubler" in text
    assert "return 2 * foo" not in text and "def example_doubler" not in text
