"""API keys and signed artifacts, against real `framework serve` processes."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import orjson
import pytest

import framework
from conftest import Server, run_cli
from framework.store import manifest as mf
from framework.store import signing
from framework.store.local import LocalStore

KEY_A = "a" * 16 + "-signing-key-A"
KEY_B = "b" * 16 + "-signing-key-B"


def triple(x: int) -> int:
    return 3 * x


def quadruple(x: int) -> int:
    return 4 * x


def until(check: Callable[[], bool], within: float = 30) -> None:
    """Wait until `check()` holds; fail past `within` seconds (generous: that the running
    server sees the change is checked, not how soon)."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "the running server did not see the change"
        time.sleep(0.05)


# -- API keys ---------------------------------------------------------------------


@pytest.fixture
def keyed(tmp_path: Path, examples_store: Path) -> Iterator[tuple[Path, Server]]:
    store = tmp_path / "store"
    shutil.copytree(examples_store, store)
    server = Server(store)
    yield store, server
    server.stop()


def status(server: Server, path: str, key: str | None = None, body: Any = None) -> int:
    headers = {"Authorization": key} if key else {}
    if body is None:
        return httpx.get(server.url + path, headers=headers, timeout=60).status_code
    return server.post(path, body, headers=headers).status_code


def test_api_keys_on_a_running_server(keyed):
    store, server = keyed
    call = {"data": [[1, 10]]}
    assert status(server, "/v1/example_doubler/latest", body=call) == 200  # no keys yet: open

    key = run_cli("keys", "create", "--note", "ci", store=store).stdout.strip()
    assert key.startswith("fw_")
    until(lambda: status(server, "/v1/example_doubler/latest", body=call) == 401)
    missing = server.post("/v1/example_doubler/latest", call)
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization" in missing.json()["error"]
    # the raw key, as the modelbit client sends it, or as a bearer token
    ok = server.post("/v1/example_doubler/latest", call, headers={"Authorization": key})
    assert ok.json() == {"data": [[1, 20]]}
    assert status(server, "/v1/example_doubler/latest", f"Bearer {key}", call) == 200
    assert status(server, "/v1/example_doubler/latest", f"bearer {key}", call) == 200
    assert framework.get_inference("example_doubler", [[1, 2]], url=server.url, api_key=key) == {
        "data": [[1, 4]]}
    for wrong in (key[:-1] + ("A" if key[-1] != "A" else "B"), "fw_00000000_x", "nonsense",
                  f"Bearer {key}x", "Bearer x"):
        assert status(server, "/v1/example_doubler/latest", wrong, call) == 401, wrong
    # listings need a key too; health and metrics do not
    assert status(server, "/v1/") == 401 and status(server, "/v1/example_doubler") == 401
    assert status(server, "/openapi.json") == 401
    for open_path in ("/healthz", "/livez", "/readyz", "/metrics"):
        assert status(server, open_path) == 200, open_path

    limited = run_cli("keys", "create", "--deployments", "example_doubler,example_adder",
                      store=store).stdout.strip()
    until(lambda: status(server, "/v1/example_adder/latest", limited, {"data": [1, 2, 3]}) == 200)
    forbidden = server.post("/v1/iris_species/latest", {"data": [[1, 5, 3, 1, 0]]},
                            headers={"Authorization": limited})
    assert forbidden.status_code == 403 and "iris_species" in forbidden.json()["error"]
    assert status(server, "/v1/iris_species", limited) == 403
    listing = httpx.get(server.url + "/v1/", headers={"Authorization": limited}).json()
    assert {d["name"] for d in listing["deployments"]} == {"example_doubler", "example_adder"}
    spec = httpx.get(server.url + "/openapi.json", headers={"Authorization": limited}).json()
    assert not any("iris_species" in path for path in spec["paths"])

    listed = run_cli("keys", "list", store=store).stdout
    assert "ci" in listed and "example_adder" in listed and key not in listed
    key_id = key.split("_")[1]
    run_cli("keys", "revoke", key_id, store=store)
    until(lambda: status(server, "/v1/example_doubler/latest", key, call) == 401)
    assert status(server, "/v1/example_doubler/latest", limited, call) == 200
    run_cli("keys", "revoke", limited, store=store)  # by the key itself
    # every key revoked: the server stays locked rather than opening again
    until(lambda: status(server, "/v1/example_doubler/latest", limited, call) == 401)
    assert status(server, "/v1/example_doubler/latest", body=call) == 401

    stored = (store / "keys.json").read_text()
    log = server.output_once(lambda text: f'"key_id":"{key_id}"' in text)
    for secret in (key, limited):
        assert secret not in stored and secret not in log
    assert hashlib.sha256(key.encode()).hexdigest() in stored
    assert f'"key_id":"{key_id}"' in log  # the public id is logged, for audits


def test_require_api_keys_locks_a_store_without_keys(tmp_path, examples_store):
    (tmp_path / "deploy.yaml").write_text("server: {require_api_keys: true}\n")
    server = Server(examples_store, cwd=tmp_path)
    try:
        assert status(server, "/v1/example_doubler/latest", body={"data": 1}) == 401
        assert status(server, "/livez") == 200
    finally:
        server.stop()


def test_keys_cli_errors(tmp_path):
    store = tmp_path / "store"
    assert "no API keys" in run_cli("keys", "list", store=store).stdout
    assert run_cli("keys", "revoke", "deadbeef", store=store, check=False).returncode == 5
    bad = run_cli("keys", "create", "--deployments", "no/such", store=store, check=False)
    assert bad.returncode == 2 and "invalid deployment name" in bad.stderr


# -- signed artifacts ---------------------------------------------------------------


def _publish_raw(store: Path, name: str, artifact: bytes, manifest: dict[str, Any]) -> int:
    """Write a version behind the deployer's back, as someone with store access could."""
    m = {**manifest, "sha256": hashlib.sha256(artifact).hexdigest(), "size": len(artifact)}
    return LocalStore(store).publish("main", name, artifact, m)


class _Boom:
    """A pickle that leaves a file behind when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def signed_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    store = tmp_path / "store"
    monkeypatch.setenv("FRAMEWORK_SIGNING_KEY", KEY_A)
    assert framework.deploy(triple, store=str(store)) == 1
    return store


def test_signed_versions_load_and_unsigned_or_tampered_ones_are_refused(
    signed_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    store = signed_store
    good = LocalStore(store).read_manifest("main", "triple", 1)
    assert good["signed"]["algorithm"] == "HMAC-SHA256"
    artifact = LocalStore(store).read_artifact("main", "triple", 1)
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Boom(marker))

    monkeypatch.setenv("FRAMEWORK_SIGNING_KEY", KEY_B)
    assert framework.deploy(quadruple, name="triple", store=str(store)) == 2  # another key
    monkeypatch.delenv("FRAMEWORK_SIGNING_KEY")
    assert framework.deploy(quadruple, name="triple", store=str(store)) == 2  # "unchanged"
    unsigned = {k: v for k, v in good.items() if k != "signed"}
    assert _publish_raw(store, "triple", evil, unsigned) == 3
    resigned_elsewhere = {**good, "signed": signing.sign(evil, good, KEY_B.encode())}
    assert _publish_raw(store, "triple", evil, resigned_elsewhere) == 4
    # one byte changed, sha256 fixed up to match: only the signature can tell
    flipped = bytearray(artifact)
    flipped[len(flipped) // 2] ^= 1
    assert _publish_raw(store, "triple", bytes(flipped), good) == 5
    assert _publish_raw(store, "triple", evil, good) == 6
    # the artifact intact, its manifest edited
    assert _publish_raw(store, "triple", artifact, {**good, "source": "def triple(x): ..."}) == 7

    server = Server(store, FRAMEWORK_SIGNING_KEY=KEY_A)
    try:
        assert server.post("/v1/triple/1", {"data": 2}).json() == {"data": 6}
        expected = {2: "another key", 3: "not signed", 4: "another key", 5: "does not match its "
                    "signature", 6: "does not match its signature", 7: "does not match its signature"}
        for version, fragment in expected.items():
            resp = server.post(f"/v1/triple/{version}", {"data": 2})
            assert resp.status_code == 409, resp.text
            assert fragment in resp.json()["error"] and "redeploy" in resp.json()["error"]
        assert not marker.exists(), "a refused pickle was unpickled"
        assert server.post("/v1/triple/1", {"data": 3}).json() == {"data": 9}
    finally:
        server.stop()
    # without a key the runtime does not check signatures (and the tampered pickle would run)
    plain = Server(store)
    try:
        assert plain.post("/v1/triple/2", {"data": 2}).json() == {"data": 8}
    finally:
        plain.stop()


def test_cli_deploy_signs_and_the_signature_covers_the_manifest(tmp_path):
    store = tmp_path / "store"
    run_cli("deploy", store=store, FRAMEWORK_SIGNING_KEY=KEY_A)
    m = orjson.loads((store / "branches" / "main" / "example_adder" / "1" / "manifest.json")
                     .read_bytes())
    artifact = (store / "branches" / "main" / "example_adder" / "1" / "artifact.pkl").read_bytes()
    signing.verify(artifact, m, KEY_A.encode())
    for field, value in (("branch", "other"), ("name", "example_doubler"), ("python", "3.0.0")):
        with pytest.raises(framework.FrameworkError, match="does not match its signature"):
            signing.verify(artifact, {**m, field: value}, KEY_A.encode())
    assert mf.loads(mf.dumps(m)) == m


def test_a_hung_store_read_never_holds_up_requests(keyed):
    """Keys and aliases are re-read on threads in the background, never on the event loop."""
    store, server = keyed
    key = run_cli("keys", "create", store=store).stdout.strip()
    run_cli("alias", "set", "example_doubler", "prod", "1", store=store)
    until(lambda: status(server, "/v1/example_doubler/prod", key, {"data": 1}) == 200)
    hung = []
    for path in (store / "keys.json", store / "branches" / "main" / "example_doubler" / "aliases.json"):
        path.rename(path.with_suffix(".bak"))
        os.mkfifo(path)  # opening it blocks until a writer comes: a hung network mount
        hung.append(path)
    try:
        time.sleep(0.7)  # past both caches' 0.5 s: the re-reads are now stuck
        # Answered while the re-reads stay stuck (until `finally` writes to the FIFOs): a read
        # on the event loop would hold these requests until the client gave up.
        for _ in range(3):
            assert status(server, "/v1/example_doubler/prod", key, {"data": 2}) == 200
            assert status(server, "/livez") == 200
    finally:
        for path in hung:  # let the stuck reads end, so the server can stop
            with open(path, "w"):
                pass
            path.unlink()
            path.with_suffix(".bak").rename(path)
