"""The store's contract: tests every backend must pass, collected by the modules that import them.

Each importing module defines the `location` fixture (a fresh, empty store's location):
tests/unit/test_store_local.py runs them on a local directory, in-process;
tests/integration/test_store.py on S3, against moto's server on loopback.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from framework.errors import NotFound, StoreError
from framework.store import open_store
from framework.store.base import Store
from framework.store.local import LocalStore

__all__ = [
    "art", "open_store_like", "store",
    "test_open_store_picks_the_backend", "test_publish_numbers_versions_and_reads_them_back",
    "test_branches_names_and_deployments", "test_aliases_move_resolve_and_refuse_what_does_not_exist",
    "test_keys_document_is_read_modify_written", "test_small_documents_compare_and_swap",
    "test_threads_racing_to_publish_get_consecutive_versions",
]


@pytest.fixture
def store(location: str) -> Store:
    return open_store(location)


def art(text: str) -> tuple[bytes, dict]:
    data = text.encode()
    return data, {"name": "m", "sha256": hashlib.sha256(data).hexdigest()}


def test_open_store_picks_the_backend(location: str) -> None:
    store = open_store(location)
    assert type(store).__name__ == ("S3Store" if location.startswith("s3://") else "LocalStore")


def test_publish_numbers_versions_and_reads_them_back(store: Store) -> None:
    assert store.versions("main", "m") == [] and store.latest("main", "m") is None
    for i in range(1, 4):
        assert store.publish("main", "m", *art(f"v{i}")) == i
    assert store.versions("main", "m") == [1, 2, 3]
    assert store.latest("main", "m") == 3
    assert store.read_artifact("main", "m", 2) == b"v2"
    manifest = store.read_manifest("main", "m", 2)
    assert manifest["version"] == 2 and manifest["sha256"] == hashlib.sha256(b"v2").hexdigest()
    with pytest.raises(NotFound, match="no version 9"):
        store.read_manifest("main", "m", 9)
    with pytest.raises(NotFound):
        store.read_artifact("main", "m", 9)


def test_branches_names_and_deployments(store: Store) -> None:
    store.publish("main", "a", *art("1"))
    store.publish("main", "b", *art("2"))
    store.publish("pr/7", "a", *art("3"))
    store.publish("pr/7", "a", *art("4"))
    assert store.branches() == ["main", "pr/7"]
    assert store.names("main") == ["a", "b"] and store.names("pr/7") == ["a"]
    assert store.names("nobranch") == []
    assert sorted(store.deployments()) == [("main", "a", 1), ("main", "b", 1), ("pr/7", "a", 2)]
    with pytest.raises(NotFound):
        store.versions("main", "bad name")
    with pytest.raises(NotFound):
        store.versions("../x", "a")


def test_aliases_move_resolve_and_refuse_what_does_not_exist(store: Store) -> None:
    for i in range(3):
        store.publish("main", "m", *art(str(i)))
    store.set_alias("main", "m", "prod", 2)
    store.set_alias("main", "m", "canary", 3)
    assert store.aliases("main", "m") == {"prod": 2, "canary": 3}
    assert store.resolve("main", "m", "prod") == 2
    assert store.resolve("main", "m", "latest") == 3
    assert store.resolve("main", "m", "1") == 1
    store.set_alias("main", "m", "prod", 1)
    assert store.resolve("main", "m", "prod") == 1
    store.set_alias("main", "m", "canary", None)
    assert store.aliases("main", "m") == {"prod": 1}
    with pytest.raises(NotFound, match="no alias 'canary'"):
        store.resolve("main", "m", "canary")
    with pytest.raises(NotFound, match="no alias 'canary' to remove"):
        store.set_alias("main", "m", "canary", None)
    with pytest.raises(NotFound, match="at version 7"):
        store.set_alias("main", "m", "prod", 7)
    with pytest.raises(NotFound, match="no version 7"):
        store.resolve("main", "m", "7")
    with pytest.raises(NotFound, match="has no versions"):
        store.resolve("main", "other", "latest")
    with pytest.raises(StoreError, match="invalid alias"):
        store.set_alias("main", "m", "latest", 1)


def test_keys_document_is_read_modify_written(store: Store) -> None:
    assert store.read_keys() is None
    store.update_keys(lambda doc: doc.setdefault("keys", {}).update(a={"hash": "1"}))
    store.update_keys(lambda doc: doc["keys"].update(b={"hash": "2"}))
    assert store.read_keys() == {"keys": {"a": {"hash": "1"}, "b": {"hash": "2"}}}
    # A second store object (another process, another replica) sees the change.
    assert open_store_like(store).read_keys() == store.read_keys()


def open_store_like(store: Store) -> Store:
    if isinstance(store, LocalStore):
        return LocalStore(store.root)
    return open_store(store.url)  # type: ignore[attr-defined]


def test_small_documents_compare_and_swap(store: Store) -> None:
    assert store.read_doc("jobs/a.json") is None
    first = store.write_doc("jobs/a.json", b"one", create=True)
    assert first is not None
    assert store.write_doc("jobs/a.json", b"again", create=True) is None  # If-None-Match: *
    assert store.read_doc("jobs/a.json") == (b"one", first)
    second = store.write_doc("jobs/a.json", b"two", etag=first)
    assert second is not None and second != first
    assert store.write_doc("jobs/a.json", b"stale", etag=first) is None  # If-Match on an old etag
    assert store.read_doc("jobs/a.json") == (b"two", second)
    assert store.write_doc("jobs/gone.json", b"x", etag=first) is None  # If-Match on nothing
    store.write_doc("jobs/b.json", b"b")
    store.write_doc("leases/c", b"c")
    assert store.list_docs("jobs/") == ["jobs/a.json", "jobs/b.json"]
    assert store.list_docs("") == ["jobs/a.json", "jobs/b.json", "leases/c"]
    store.delete_doc("jobs/a.json")
    store.delete_doc("jobs/a.json")  # already gone: no error
    assert store.read_doc("jobs/a.json") is None
    assert store.list_docs("jobs/") == ["jobs/b.json"]
    with pytest.raises(StoreError, match="invalid document key"):
        store.read_doc("../x")


def test_threads_racing_to_publish_get_consecutive_versions(store: Store) -> None:
    stores = [open_store_like(store) for _ in range(8)]  # each its own client, as separate replicas
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: stores[i].publish("main", "m", *art(f"t{i}")), range(8)))
    assert sorted(got) == list(range(1, 9))
    assert store.versions("main", "m") == list(range(1, 9))
    assert store.latest("main", "m") == 8
    assert sorted(store.read_artifact("main", "m", v) for v in got) == sorted(f"t{i}".encode() for i in range(8))
