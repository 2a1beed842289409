"""The deploy lifecycle a CI pipeline drives: branches, promotion, aliases, rollback,
dry runs, JSON records, exit codes, concurrent deploys and git metadata.

Every test runs the real CLI in subprocesses inside a temporary git repository
holding a tiny project (deploy.yaml + a module of @deployment functions).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from conftest import Server, cli_env, run_cli
from framework.store import signing

MODULE = '''\
import os

from framework import deployment

FACTOR = int(os.environ.get("FACTOR", "{factor}"))


@deployment
def scale(x: int):
    return FACTOR * x
'''


class Project:
    """A git checkout with deploy.yaml, a `proj` package and a store inside it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env: dict[str, str] = {}  # for every CLI call
        self.store = root / "store"
        (root / "proj").mkdir(parents=True)
        (root / "proj" / "__init__.py").write_text("")
        (root / ".gitignore").write_text("store/\n__pycache__/\n")
        self.config("")
        self.factor(2)
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.name", "Ada Lovelace")
        self.git("config", "user.email", "ada@example.com")
        self.commit("factor 2")

    def git(self, *args: str) -> str:
        return subprocess.run(["git", *args], cwd=self.root, check=True, capture_output=True,
                              text=True).stdout.strip()

    def commit(self, message: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")

    def factor(self, n: int) -> None:
        (self.root / "proj" / "m.py").write_text(MODULE.format(factor=n))

    def config(self, extra: str, name: str = "deploy.yaml") -> Path:
        path = self.root / name
        path.write_text(f"store: store\nmodules: [proj.m]\n{extra}")
        return path

    def cli(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, store=self.store, cwd=self.root, check=check, **{**self.env, **env})

    def deploy(self, *args: str, check: bool = True, **env: str) -> list[dict]:
        proc = self.cli("deploy", "--json", *args, check=check, **env)
        return [json.loads(line) for line in proc.stdout.splitlines()]

    def versions(self, branch: str = "main") -> list[int]:
        base = self.store / "branches" / branch.replace("/", "%2F") / "scale"
        return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit()) if base.exists() else []

    def aliases(self, branch: str = "main") -> dict[str, int]:
        rows = self.cli("alias", "list", "scale", "--branch", branch).stdout.splitlines()[1:]
        return {alias: int(version) for alias, version in (row.split() for row in rows)}

    def manifest(self, version: int | str = "latest", branch: str = "main") -> dict:
        return json.loads(self.cli("show", "scale", str(version), "--branch", branch).stdout)


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path / "project")


def answer(server: Server, path: str, x: int = 10):
    response = server.post(path, {"data": x})
    return response.json().get("data") if response.status_code == 200 else response.status_code


def eventually(probe: Callable[[], object], expected: object, within: float = 30) -> None:
    """Wait until `probe()` returns `expected`; fail after `within` seconds (generous: an
    order, not a speed, is checked)."""
    start = time.monotonic()
    while (seen := probe()) != expected:
        assert time.monotonic() - start < within, f"still {seen!r}, expected {expected!r}"
        time.sleep(0.05)


def test_branches_promotion_and_git_metadata(project: Project) -> None:
    main_commit = project.git("rev-parse", "HEAD")
    [v1] = project.deploy()
    assert (v1["branch"], v1["version"], v1["status"]) == ("main", 1, "new")
    assert v1["url"] == "http://127.0.0.1:8000/v1/scale/main/1"

    project.git("checkout", "-q", "-b", "feature/x")
    project.factor(5)
    feature_commit = project.commit("factor 5")
    [f1] = project.deploy("--branch", "feature/x")
    assert (f1["branch"], f1["version"], f1["status"]) == ("feature/x", 1, "new")
    assert f1["url"].endswith("/v1/scale/feature~x/1")
    assert project.versions("main") == [1], "a branch deploy must not touch main"

    # `framework versions` shows who deployed what from where.
    table = project.cli("versions", "scale", "--branch", "feature/x").stdout
    assert feature_commit[:10] in table and "feature/x" in table and "Ada Lovelace" in table
    assert main_commit[:10] in project.cli("versions", "scale").stdout

    promoted = project.cli("promote", "scale", "--from", "feature/x").stdout
    assert "latest is now v2" in promoted and "promoted from feature/x v1" in promoted
    m = project.manifest(2)
    assert m["promoted_from"] == {"branch": "feature/x", "version": 1, "sha256": f1["sha256"]}
    assert m["branch"] == "main" and m["sha256"] == f1["sha256"]
    assert m["git"]["commit"] == feature_commit, "the git record describes the promoted code"
    # Promoting what the target already runs publishes nothing.
    assert "unchanged; latest is now v2" in project.cli("promote", "scale", "--from", "feature/x").stdout
    assert project.versions("main") == [1, 2]
    missing = project.cli("promote", "scale", "--from", "nope", check=False)
    assert missing.returncode == 5 and "nope" in missing.stderr

    # A detached checkout (what CI checks out for a pull request) takes the branch from CI.
    project.git("checkout", "-q", "--detach")
    project.factor(6)
    [d] = project.deploy("--branch", "pr-7", GITHUB_HEAD_REF="feature/y")
    assert project.manifest(d["version"], "pr-7")["git"]["branch"] == "feature/y"
    assert project.manifest(d["version"], "pr-7")["git"]["dirty"] is True


def test_aliases_and_rollback_seen_by_a_running_server(project: Project) -> None:
    # Signed throughout: republished versions must carry valid signatures of their own.
    project.env[signing.ENV] = "lifecycle-test-key-0123456789"
    project.deploy()
    for factor in (3, 4):
        project.factor(factor)
        project.commit(f"factor {factor}")
        project.deploy()
    project.git("checkout", "-q", "-b", "feature/x")
    project.factor(7)
    project.deploy("--branch", "feature/x")
    server = Server(project.store, cwd=project.root, **project.env)
    try:
        assert answer(server, "/v1/scale/feature~x/latest") == 70
        assert answer(server, "/v1/scale/prod") == 404

        assert "prod -> v1" in project.cli("alias", "set", "scale", "prod", "1").stdout
        eventually(lambda: answer(server, "/v1/scale/prod"), 20)
        project.cli("alias", "set", "scale", "prod", "2")
        eventually(lambda: answer(server, "/v1/scale/main/prod"), 30)
        assert "prod" in project.cli("alias", "list", "scale").stdout
        project.cli("alias", "rm", "scale", "prod")
        eventually(lambda: answer(server, "/v1/scale/prod"), 404)
        assert "no aliases" in project.cli("alias", "list", "scale").stdout

        out = project.cli("rollback", "scale").stdout
        assert "latest is now v4" in out and "rollback to v2" in out
        assert project.manifest(4)["rolled_back_from"]["version"] == 2
        eventually(lambda: answer(server, "/v1/scale/latest"), 30)
        assert answer(server, "/v1/scale/3") == 40, "pinned versions never change"
        # A second rollback keeps walking back instead of undoing the first.
        assert "rollback to v1" in project.cli("rollback", "scale").stdout
        eventually(lambda: answer(server, "/v1/scale/latest"), 20)
        assert "rollback to v3" in project.cli("rollback", "scale", "--to", "3").stdout
        eventually(lambda: answer(server, "/v1/scale/latest"), 40)
        assert project.versions() == [1, 2, 3, 4, 5, 6], "history is append-only"
        nothing = project.cli("rollback", "scale", "--to", "6", check=False)
        assert nothing.returncode == 0 and "unchanged" in nothing.stdout
        assert project.versions() == [1, 2, 3, 4, 5, 6]

        project.cli("promote", "scale", "--from", "feature/x", "--to", "staging")
        assert answer(server, "/v1/scale/staging/latest") == 70
        unsigned = project.cli("promote", "scale", "--from", "feature/x", "--to", "qa",
                               **{signing.ENV: "another-key-0123456789abcdef"}, check=False)
        assert unsigned.returncode != 0 and "another key" in unsigned.stderr
        assert not (project.store / "branches" / "qa").exists()
    finally:
        server.stop()


def test_dry_run_json_and_idempotence(project: Project) -> None:
    [first] = project.deploy()
    [again] = project.deploy()
    assert (again["version"], again["status"]) == (1, "unchanged")
    project.factor(9)
    [dry] = project.deploy("--dry-run")
    assert dry["status"] == "dry-run" and dry["version"] is None and dry["url"] is None
    assert dry["sha256"] and dry["sha256"] != first["sha256"]
    assert project.versions() == [1], "a dry run publishes nothing"
    table = project.cli("deploy", "--dry-run").stdout
    assert "dry-run" in table and "NAME" in table
    project.config("server: {host: 0.0.0.0, port: 9123}\n")
    [real] = project.deploy()
    assert real["url"] == "http://127.0.0.1:9123/v1/scale/main/2"


def test_aliases_pinned_in_deploy_yaml(project: Project) -> None:
    project.deploy()
    project.config("aliases: {scale: {prod: 1}}\n")
    project.deploy()
    assert project.aliases() == {"prod": 1}

    # A pin to the version this very deploy creates is fine...
    project.factor(3)
    project.config("aliases: {scale: {prod: 2, canary: 2}}\n")
    [r] = project.deploy()
    assert r["version"] == 2 and project.aliases() == {"prod": 2, "canary": 2}
    # ...a pin to a version that will not exist stops the deploy before it publishes.
    project.factor(4)
    path = project.config("aliases: {scale: {prod: 7}}\n")
    bad = project.cli("deploy", check=False)
    assert bad.returncode == 2
    assert str(path) in bad.stderr and "aliases.scale.prod" in bad.stderr
    assert "version 7" in bad.stderr and "remove it" in bad.stderr
    assert project.versions() == [1, 2] and project.aliases()["prod"] == 2
    assert project.cli("deploy", "--dry-run", check=False).returncode == 2

    # Pins describe deploy.yaml's branch: a preview deploy elsewhere leaves them out.
    preview = project.cli("deploy", "--branch", "pr-3")
    assert "apply to branch 'main'" in preview.stderr
    assert project.cli("alias", "list", "scale", "--branch", "pr-3").stdout.startswith("scale")

    for pins, key in (("{scale: {latest: 1}}", "aliases.scale.latest"),
                      ("{ghost: {prod: 1}}", "aliases.ghost")):
        project.config(f"aliases: {pins}\n")
        bad = project.cli("deploy", check=False)
        assert bad.returncode == 2 and key in bad.stderr and str(path) in bad.stderr
    assert project.versions() == [1, 2]


def test_exit_codes_and_deploy_yaml_errors(project: Project) -> None:
    (project.root / "proj" / "broken.py").write_text("import not_a_real_module\n")
    (project.root / "proj" / "locked.py").write_text(
        "import threading\nfrom framework import deployment\nLOCK = threading.Lock()\n\n\n"
        "@deployment\ndef guarded(x):\n    with LOCK:\n        return x\n"
    )
    cases = {
        "typo.yaml": ("modules: [proj.m]\nstorage: elsewhere\n", 2, ["storage", "unknown key"]),
        "broken.yaml": ("modules: [proj.broken]\n", 2, ["modules", "proj.broken", "not_a_real_module"]),
        "locked.yaml": ("modules: [proj.locked]\n", 3, ["LOCK", "inside the function"]),
    }
    for name, (text, code, words) in cases.items():
        (project.root / name).write_text(text)
        proc = project.cli("--config", name, "deploy", check=False)
        assert proc.returncode == code, (name, proc.stderr)
        assert all(w in proc.stderr for w in words), (name, proc.stderr)
        if code == 2:
            assert name in proc.stderr, "configuration errors name the file"
    assert not (project.store / "branches").exists(), "nothing is published by a failed deploy"

    # An unwritable store fails before packaging: exit 4, not the packaging error's 3.
    blocker = project.root / "a-file"
    blocker.write_text("")
    proc = run_cli("--config", "locked.yaml", "deploy", store=blocker / "store", cwd=project.root,
                   check=False)
    assert proc.returncode == 4 and "writable" in proc.stderr, proc.stderr

    assert project.cli("deploy", "--branch", "bad branch", check=False).returncode == 2
    project.deploy()
    for args, code in (
        (("rollback", "scale"), 5),  # only one version: nothing to roll back to
        (("rollback", "ghost"), 5),
        (("rollback", "scale", "--to", "9"), 5),
        (("alias", "set", "scale", "prod", "9"), 5),
        (("alias", "set", "scale", "42", "1"), 2),
        (("alias", "set", "scale", "latest", "1"), 2),
        (("alias", "rm", "scale", "prod"), 5),
        (("alias", "list", "ghost"), 5),
        (("promote", "scale"), 2),  # --from is required
    ):
        proc = project.cli(*args, check=False)
        assert proc.returncode == code, (args, proc.stderr)
        assert proc.stderr.strip(), "every failure says why"


def test_concurrent_deploys_lose_and_duplicate_nothing(project: Project) -> None:
    project.deploy()
    procs = [
        subprocess.Popen([sys.executable, "-m", "framework", "deploy", "--json"], cwd=project.root,
                         env=cli_env(project.store, FACTOR=str(factor)), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for factor in (10, 20, 30, 40)
    ]
    records = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        records += [json.loads(line) for line in out.splitlines()]
    assert project.versions() == [1, 2, 3, 4, 5]
    assert sorted(r["version"] for r in records) == [2, 3, 4, 5]
    for r in records:
        assert r["status"] == "new"
        assert project.manifest(r["version"])["sha256"] == r["sha256"]
    assert not any((project.store / ".staging").iterdir())
