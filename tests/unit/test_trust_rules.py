"""Signed deploys and who holds the signing key, checked in-process (issue 14).

tests/integration/test_trust.py and test_security.py serve the same stores from real servers.
"""

from __future__ import annotations

import pytest
import yaml

import framework
from conftest import REPO
from framework.store import signing
from framework.store.local import LocalStore

KEY = "k" * 16 + "-trust-signing-key"


def triple(x: int) -> int:
    return 3 * x


def quadruple(x: int) -> int:
    return 4 * x


def test_setting_a_signing_key_republishes_unsigned_versions(tmp_path, monkeypatch):
    store = str(tmp_path / "store")
    monkeypatch.delenv("FRAMEWORK_SIGNING_KEY", raising=False)
    assert framework.deploy(triple, store=store) == 1
    assert framework.deploy(triple, store=store) == 1  # unchanged
    monkeypatch.setenv("FRAMEWORK_SIGNING_KEY", KEY)
    assert framework.deploy(triple, store=store) == 2  # signed now
    assert framework.deploy(triple, store=store) == 2
    monkeypatch.setenv("FRAMEWORK_SIGNING_KEY", "short")
    with pytest.raises(framework.FrameworkError, match="at least 16"):
        framework.deploy(triple, store=store)


def test_the_store_signs_the_version_it_claims(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAMEWORK_SIGNING_KEY", KEY)
    store = tmp_path / "store"
    assert framework.deploy(triple, store=str(store)) == 1
    assert framework.deploy(quadruple, name="triple", store=str(store)) == 2
    m = LocalStore(store).read_manifest("main", "triple", 2)
    assert m["version"] == 2 and m["signed"]["format"] == 2
    artifact = LocalStore(store).read_artifact("main", "triple", 2)
    signing.verify(artifact, m, KEY.encode())
    with pytest.raises(framework.FrameworkError, match="does not match its signature"):
        signing.verify(artifact, {**m, "version": 1}, KEY.encode())


def test_workflow_gives_the_signing_key_only_to_pushes_to_main():
    flow = yaml.safe_load((REPO / ".github" / "workflows" / "deploy.yml").read_text())
    holders = []
    for name, job in flow["jobs"].items():
        text = yaml.safe_dump(job)
        if "secrets.FRAMEWORK_SIGNING_KEY" in text:
            holders.append(name)
            condition = job.get("if", "")
            assert "github.event_name == 'push'" in condition, (name, condition)
            assert "github.ref == 'refs/heads/main'" in condition, (name, condition)
    assert holders, "no job signs what main deploys"
    previews = [j for j in flow["jobs"].values() if "pull_request" in str(j.get("if", ""))]
    assert previews, "pull requests still deploy a preview"
    assert all("secrets.FRAMEWORK_SIGNING_KEY" not in yaml.safe_dump(j) for j in previews)
