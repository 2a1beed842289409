"""API keys as the runtime checks them, in-process on a local store.

tests/integration/test_security.py and test_trust.py check the same rules as 401s and 403s
from real servers, while keys are created and revoked under them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from framework.serve import auth
from framework.errors import Forbidden, NotFound, Unauthorized
from framework.store.local import LocalStore


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def test_keys_are_off_until_the_store_holds_a_keys_document(store):
    ring = auth.KeyRing(store, required=False)
    assert not ring.enabled
    auth.create_key(store)
    ring.apply(store.read_keys())
    assert ring.enabled


def test_a_key_is_accepted_plain_or_as_a_bearer_token_and_nothing_else(store):
    key_id, key = auth.create_key(store, note="test")
    ring = auth.KeyRing(store, required=False)
    assert ring.check(key, "anything").id == key_id
    assert ring.check(f"Bearer {key}", "anything").id == key_id
    assert ring.check(f"bearer  {key} ", None).id == key_id
    for header in (None, ""):
        with pytest.raises(Unauthorized, match="requires an API key"):
            ring.check(header, "anything")
    wrong_secret = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    for header in (wrong_secret, "fw_nosuchid_secret", "not a key", key_id):
        with pytest.raises(Unauthorized, match="invalid or revoked API key"):
            ring.check(header, "anything")


def test_a_limited_key_is_forbidden_elsewhere_and_listings_are_open_to_it(store):
    _, limited = auth.create_key(store, deployments=["echo"])
    ring = auth.KeyRing(store, required=False)
    assert ring.check(limited, "echo").allows("echo")
    assert ring.check(limited, None).deployments == frozenset({"echo"})
    with pytest.raises(Forbidden, match=r"not allowed on deployment 'greet' \(it is limited to echo\)"):
        ring.check(limited, "greet")


def test_a_revoked_key_is_refused_and_revoking_every_key_locks_the_server(store):
    key_id, key = auth.create_key(store)
    assert auth.revoke_key(store, key) == key_id  # by the key itself, or by its id
    ring = auth.KeyRing(store, required=False)
    assert ring.enabled and ring.keys == {}
    with pytest.raises(Unauthorized, match="invalid or revoked"):
        ring.check(key, "echo")
    assert [k["id"] for k in auth.list_keys(store)] == [key_id]
    assert all("sha256" not in k for k in auth.list_keys(store))
    with pytest.raises(NotFound, match="no API key with id 'deadbeef'"):
        auth.revoke_key(store, "deadbeef")


def test_require_api_keys_locks_a_store_without_keys(store):
    ring = auth.KeyRing(store, required=True)
    assert ring.enabled
    with pytest.raises(Unauthorized):
        ring.check("fw_00000000_whatever", "echo")


def test_the_store_keeps_only_hashes(store):
    _, key = auth.create_key(store)
    assert key.split("_", 2)[2] not in (store.root / "keys.json").read_text()


@pytest.mark.parametrize("path,root,expected", [
    ("/v1/echo/latest", "", "/v1/echo/latest"),
    ("/ml/v1/echo/latest", "/ml", "/v1/echo/latest"),
    ("/ml", "/ml", ""),
    ("/mlx/v1/echo", "/ml", "/mlx/v1/echo"),  # a prefix of a segment is not the root path
    ("/healthz", "/ml", "/healthz"),
])
def test_route_paths_drop_the_root_path_as_the_router_does(path, root, expected):
    assert auth.route_path({"path": path, "root_path": root}) == expected
