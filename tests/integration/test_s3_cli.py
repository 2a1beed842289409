"""Every command and the server on `store: s3://...` (moto's server on 127.0.0.1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO, Server, run_cli
from moto_server import MotoServer

pytest.importorskip("boto3")
SIGNING = {"FRAMEWORK_SIGNING_KEY": "s3-cli-test-signing-key-0123456789"}


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto-cli"))
    yield server
    server.stop()


def test_the_cli_and_a_server_from_an_empty_directory_on_s3(moto: MotoServer, tmp_path: Path) -> None:
    bucket = moto.new_bucket()
    url = f"s3://{bucket}/team-a"
    env = {**moto.env(), **SIGNING, "FRAMEWORK_CACHE_DIR": str(tmp_path / "cache")}

    def cli(*args: str, cwd: Path = REPO) -> str:
        return run_cli(*args, store=url, cwd=cwd, **env).stdout

    first = [json.loads(line) for line in cli("deploy", "--json").splitlines()]
    assert {r["status"] for r in first} == {"new"}
    again = [json.loads(line) for line in cli("deploy", "--json").splitlines()]
    assert {r["status"] for r in again} == {"unchanged"}  # content compared through the S3 store
    assert "example_adder" in cli("list")
    cli("deploy", "--branch", "feature/x")
    [header, only] = cli("versions", "example_adder", "--branch", "feature/x").splitlines()
    assert header.startswith("VERSION") and only.split()[0] == "1"

    cli("alias", "set", "example_adder", "prod", "1")
    assert "prod" in cli("alias", "list", "example_adder")
    project = tmp_path / "other"
    project.mkdir()
    (project / "deploy.yaml").write_text("modules: [changed]\n")
    (project / "changed.py").write_text(
        "from framework import deployment\n\n\n@deployment\n"
        "def example_adder(a: int, b: int, c: int):\n    return a + b + c + 100\n")
    cli("deploy", cwd=project)  # v2, other content
    cli("rollback", "example_adder")  # republishes v1 as v3: the same artifact, no copy
    shown = json.loads(cli("show", "example_adder", "latest"))
    assert shown["version"] == 3
    assert shown["sha256"] == json.loads(cli("show", "example_adder", "1"))["sha256"]
    artifacts = moto.client().list_objects_v2(Bucket=bucket, Prefix="team-a/artifacts/")["KeyCount"]
    assert artifacts == len(first) + 1  # only v2 brought new bytes
    cli("promote", "example_adder", "--from", "main", "--to", "staging", "--version", "2")

    key = cli("keys", "create", "--note", "s3 test").split()[-1]
    assert "s3 test" in cli("keys", "list")

    machine = tmp_path / "machine"
    machine.mkdir()
    server = Server(url, cwd=machine, log_dir=tmp_path, **{**env, "FRAMEWORK_CACHE_DIR": str(machine / "cache")})
    try:
        headers = {"Authorization": key}
        for ref, want in (("latest", 6), ("prod", 6), ("1", 6), ("2", 106), ("3", 6),
                          ("staging/latest", 106)):
            answer = server.post(f"/v1/example_adder/{ref}", {"data": [1, 2, 3]}, headers=headers)
            assert answer.status_code == 200 and answer.json() == {"data": want}, (ref, answer.text)
        assert server.post("/v1/example_adder/feature~x/latest", {"data": [1, 2, 3]},
                           headers=headers).json() == {"data": 6}
        listed = server.post("/v1/example_adder/nosuch", {"data": [1, 2, 3]}, headers=headers)
        assert listed.status_code == 404 and "no alias 'nosuch'" in listed.json()["error"]
    finally:
        server.stop()
    sha = shown["sha256"]
    assert (machine / "cache" / "artifacts" / sha[:2] / sha).is_file()  # the server kept what it downloaded
