"""The store on S3 (moto's server), and publishers in real processes on both backends.

The S3 backend runs against a real S3-protocol server (moto in server mode,
started here on 127.0.0.1), so conditional writes, ETags and 304s are the
server's, not a mock's. The contract's in-process tests (tests/store_contract.py)
run here on S3 and in tests/unit/test_store_local.py on a local directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO
from framework.store.artifact_cache import ArtifactCache
from framework.errors import StoreError
from framework.store.base import Store
from moto_server import MotoServer, use_endpoint
from store_contract import *  # noqa: F403 - the contract's tests, collected here on S3
from store_contract import art, open_store_like

pytest.importorskip("boto3")  # the dev extra installs it; without it only local stores exist


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


# The contract runs on S3 here; the tests of publishers in other processes, on both backends.
BOTH = pytest.mark.parametrize("location", ["local", "s3"], indirect=True)


@pytest.fixture(params=["s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty store's location: a directory, or a new bucket on moto."""
    if request.param == "local":
        return str(tmp_path / "store")
    moto = request.getfixturevalue("moto")
    use_endpoint(monkeypatch, moto)
    monkeypatch.setenv("FRAMEWORK_CACHE_DIR", str(tmp_path / "cache"))
    return f"s3://{moto.new_bucket()}/some/prefix"


PUBLISH_ONE = textwrap.dedent("""
    import hashlib, sys
    from framework.store import open_store
    store = open_store(sys.argv[1])
    data = sys.argv[2].encode()
    print(store.publish("main", "m", data, {"name": "m", "sha256": hashlib.sha256(data).hexdigest()}))
""")


@BOTH
def test_processes_racing_to_publish_get_consecutive_versions(store: Store, location: str,
                                                               tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISH_ONE, location, f"p{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for i in range(8)]
    got = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        got.append(int(out))
    assert sorted(got) == list(range(1, 9))
    assert store.versions("main", "m") == list(range(1, 9))
    assert store.latest("main", "m") == 8


PUBLISH_MANY = textwrap.dedent("""
    import hashlib, sys
    from framework.store import open_store
    store = open_store(sys.argv[1])
    for i in range(1000):
        data = (sys.argv[2] + str(i)).encode() * 5000
        store.publish("main", "m", data, {"name": "m", "sha256": hashlib.sha256(data).hexdigest()})
""")


@BOTH
def test_publishers_killed_at_random_moments_leave_no_half_version(store: Store, location: str,
                                                                   tmp_path: Path) -> None:
    rng = random.Random(16)
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", PUBLISH_MANY, location, f"r{round_}-"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        time.sleep(rng.uniform(0.3, 1.5))  # interpreter start-up, then some publishes
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    fresh = open_store_like(store)
    versions = fresh.versions("main", "m")
    assert versions == list(range(1, len(versions) + 1))  # no gap, no half version
    for v in versions:
        data = fresh.read_artifact("main", "m", v)
        assert hashlib.sha256(data).hexdigest() == fresh.read_manifest("main", "m", v)["sha256"]
    # Whatever the last kill interrupted, the next publish goes past it and is latest.
    after = fresh.publish("main", "m", *art("after"))
    assert after == (versions[-1] if versions else 0) + 1
    assert fresh.latest("main", "m") == after


# -- S3 only -------------------------------------------------------------------------


@pytest.fixture
def s3(moto: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    use_endpoint(monkeypatch, moto)
    from framework.store.s3 import S3Store

    return S3Store(moto.new_bucket(), "p", cache=ArtifactCache(tmp_path / "cache"))


def test_identical_deploys_racing_on_s3_publish_one_version(s3: Store) -> None:
    """Every racer passes the "is the latest the same?" check before any has published;
    those that then find the version they tried taken by the same content publish none."""
    import threading

    s3.publish("main", "m", *art("old"))
    racers = [open_store_like(s3) for _ in range(4)]  # each its own client, as separate replicas
    gate = threading.Barrier(len(racers), timeout=60)
    for racer in racers:
        def latest(branch: str, name: str, _racer: Store = racer) -> int | None:
            found = type(_racer).latest(_racer, branch, name)
            gate.wait()
            return found
        racer.latest = latest  # type: ignore[method-assign]
    data, manifest = art("new")

    def deploy(racer: Store) -> tuple[int, bool]:
        return racer.publish_changed("main", "m", data, manifest,
                                     lambda v: s3.read_artifact("main", "m", v) == data)

    with ThreadPoolExecutor(len(racers)) as pool:
        got = list(pool.map(deploy, racers))
    assert sorted(got) == [(2, False)] * 3 + [(2, True)]
    assert s3.versions("main", "m") == [1, 2] and s3.latest("main", "m") == 2


def test_an_identical_deploy_that_finishes_first_on_s3_leaves_the_slower_one_nothing_to_publish(
        s3: Store) -> None:
    """The slower deploy saw the old latest; the faster one published and moved `latest`
    before the slower one read where to claim: it must find its content there, not claim
    the version after it."""
    s3.publish("main", "m", *art("old"))
    data, manifest = art("new")
    slower = open_store_like(s3)

    def same(v: int) -> bool:
        return s3.read_artifact("main", "m", v) == data

    def latest(branch: str, name: str) -> int | None:
        found = type(slower).latest(slower, branch, name)
        assert open_store_like(s3).publish_changed("main", "m", data, manifest, same) == (2, True)
        return found

    slower.latest = latest  # type: ignore[method-assign]
    assert slower.publish_changed("main", "m", data, manifest, same) == (2, False)
    assert s3.versions("main", "m") == [1, 2] and s3.latest("main", "m") == 2


def test_moto_honours_conditional_writes_and_conditional_gets(moto: MotoServer) -> None:
    """What the S3 store relies on, checked on the server itself."""
    from botocore.exceptions import ClientError

    client, bucket = moto.client(), moto.new_bucket()
    etag = client.put_object(Bucket=bucket, Key="k", Body=b"1", IfNoneMatch="*")["ETag"]
    for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"0000"'}):
        with pytest.raises(ClientError) as caught:
            client.put_object(Bucket=bucket, Key="k", Body=b"2", **condition)
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    with pytest.raises(ClientError) as caught:
        client.get_object(Bucket=bucket, Key="k", IfNoneMatch=etag)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 304


def record_statuses(store: Store, operation: str) -> list[int]:
    statuses: list[int] = []
    store.client.meta.events.register(  # type: ignore[attr-defined]
        f"after-call.s3.{operation}",
        lambda http_response, **_: statuses.append(http_response.status_code))
    return statuses


def test_polling_refs_and_keys_is_a_conditional_get(s3: Store) -> None:
    s3.publish("main", "m", *art("1"))
    s3.set_alias("main", "m", "prod", 1)
    s3.update_keys(lambda doc: doc.update(keys={}))
    assert s3.resolve("main", "m", "latest") == 1  # the first read of latest also checks past it
    gets, lists = record_statuses(s3, "GetObject"), record_statuses(s3, "ListObjectsV2")
    for _ in range(3):
        assert s3.resolve("main", "m", "latest") == 1
        assert s3.resolve("main", "m", "prod") == 1
        assert s3.read_keys() == {"keys": {}}
    assert gets and set(gets) == {304}  # unchanged: no body sent
    assert lists == []  # resolving never lists the versions
    s3.versions("main", "m")
    assert lists == [200]  # (and listing is what would show up)
    open_store_like(s3).publish("main", "m", *art("2"))  # another machine deploys
    assert s3.resolve("main", "m", "latest") == 2
    assert gets[-1] == 200


def test_artifacts_are_stored_once_by_sha256(s3: Store, moto: MotoServer) -> None:
    for branch in ("main", "main", "prod"):
        s3.publish(branch, "m", *art("same bytes"))
    listed = moto.client().list_objects_v2(Bucket=s3.bucket, Prefix="p/artifacts/")  # type: ignore[attr-defined]
    assert [o["Key"] for o in listed["Contents"]] == [
        "p/artifacts/" + hashlib.sha256(b"same bytes").hexdigest()]


def test_artifacts_come_from_the_verified_disk_cache(s3: Store, moto: MotoServer, tmp_path: Path) -> None:
    s3.publish("main", "m", *art("cached"))
    sha = hashlib.sha256(b"cached").hexdigest()
    reader = open_store_like(s3)
    reader.cache = ArtifactCache(tmp_path / "shared")  # type: ignore[attr-defined]
    assert reader.read_artifact("main", "m", 1) == b"cached"
    on_disk = tmp_path / "shared" / sha[:2] / sha
    assert on_disk.read_bytes() == b"cached"
    # Another worker on the machine reads it from disk, even with the object gone from S3.
    moto.client().delete_object(Bucket=s3.bucket, Key=f"p/artifacts/{sha}")  # type: ignore[attr-defined]
    other = open_store_like(s3)
    other.cache = ArtifactCache(tmp_path / "shared")  # type: ignore[attr-defined]
    assert other.read_artifact("main", "m", 1) == b"cached"
    # A damaged cache file is never used: it is dropped and the artifact fetched again.
    s3.publish("main", "m2", *art("fresh"))
    sha2 = hashlib.sha256(b"fresh").hexdigest()
    assert other.read_artifact("main", "m2", 1) == b"fresh"
    (tmp_path / "shared" / sha2[:2] / sha2).write_bytes(b"tampered")
    assert open_store_like_with_cache(s3, tmp_path / "shared").read_artifact("main", "m2", 1) == b"fresh"
    assert (tmp_path / "shared" / sha2[:2] / sha2).read_bytes() == b"fresh"


def open_store_like_with_cache(store: Store, directory: Path) -> Store:
    fresh = open_store_like(store)
    fresh.cache = ArtifactCache(directory)  # type: ignore[attr-defined]
    return fresh


def test_a_server_that_ignores_conditional_writes_is_refused(s3: Store) -> None:
    # The server never sees the conditions, exactly as if it ignored them.
    def strip(params, **_):  # noqa: ANN001
        params["headers"].pop("If-None-Match", None)
        params["headers"].pop("If-Match", None)
    s3.client.meta.events.register("before-call.s3.PutObject", strip)  # type: ignore[attr-defined]
    with pytest.raises(StoreError, match="ignores conditional writes"):
        s3.check_writable()
    with pytest.raises(StoreError, match="ignores conditional writes"):
        s3.publish("main", "m", *art("1"))
    assert s3.versions("main", "m") == []


DIE_BEFORE_LATEST = textwrap.dedent("""
    import hashlib, os, sys
    from framework.store.s3 import S3Store
    from framework.store import open_store
    S3Store._advance = lambda self, dep, version: os._exit(9)  # killed right after the claim
    store = open_store(sys.argv[1])
    data = b"orphan"
    store.publish("main", "m", data, {"name": "m", "sha256": hashlib.sha256(data).hexdigest()})
""")


@pytest.mark.parametrize("repairer", ["publish", "reader"])
def test_a_publisher_killed_before_moving_latest_is_repaired(s3: Store, moto: MotoServer,
                                                             tmp_path: Path, repairer: str) -> None:
    s3.publish("main", "m", *art("1"))
    proc = subprocess.run([sys.executable, "-c", DIE_BEFORE_LATEST, s3.url], cwd=tmp_path,  # type: ignore[attr-defined]
                          env=os.environ, capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    refs = moto.client().get_object(Bucket=s3.bucket, Key="p/branches/main/m/refs.json")  # type: ignore[attr-defined]
    assert json.loads(refs["Body"].read())["latest"] == 1  # v2 is complete, but latest never moved
    reader = open_store_like(s3)
    if repairer == "publish":
        assert reader.publish("main", "m", *art("3")) == 3
        assert s3.resolve("main", "m", "latest") == 3
    else:
        assert reader.resolve("main", "m", "latest") == 2
        assert reader.read_artifact("main", "m", 2) == b"orphan"
    assert s3.versions("main", "m") == [1, 2, 3][: 3 if repairer == "publish" else 2]


def test_a_store_outage_mid_deploy_fails_cleanly(tmp_path: Path) -> None:
    moto = MotoServer(tmp_path)
    try:
        bucket = moto.new_bucket()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("FRAMEWORK_", "AWS_"))},
               **moto.env(), "FRAMEWORK_CACHE_DIR": str(tmp_path / "cache")}
        location = f"s3://{bucket}"
        proc = subprocess.Popen([sys.executable, "-c", PUBLISH_MANY, location, "o-"], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)
    finally:
        moto.stop()  # the store goes away while the publisher is mid-way
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "StoreError" in err and "check that the S3 endpoint is up" in err
    # A deploy through the CLI against the dead store fails with the message, not a traceback.
    cli = subprocess.run([sys.executable, "-m", "framework", "deploy"], cwd=REPO, timeout=120,
                         env={**env, "FRAMEWORK_STORE": location}, capture_output=True, text=True)
    assert cli.returncode != 0
    assert "Traceback" not in cli.stderr and "S3 endpoint" in cli.stderr


def test_without_boto3_an_s3_store_says_what_to_install(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['boto3'] = None\n"  # as if boto3 were not installed
            "from framework.cli import main; sys.exit(main(['list']))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAMEWORK_")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**env, "FRAMEWORK_STORE": "s3://some-bucket/prefix"}, timeout=60)
    assert proc.returncode != 0
    assert 'pip install "framework[s3]"' in proc.stderr and "Traceback" not in proc.stderr
