"""Store hygiene and deploy errors checked in-process (issue 14): a full disk, a deploy from Python."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import framework
from framework.serve import auth
from framework.errors import RegistryError, StoreError
from framework.store.local import LocalStore


def echo(x: int) -> int:
    return x


def test_deploy_from_python_without_deploy_yaml_warns_where_it_publishes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FRAMEWORK_STORE", raising=False)
    monkeypatch.delenv("FRAMEWORK_CONFIG", raising=False)
    with pytest.warns(UserWarning, match="default store .*framework-store"):
        assert framework.deploy(echo) == 1
    assert (tmp_path / ".framework-store" / "branches" / "main" / "echo" / "1").is_dir()


def test_a_mistyped_option_lists_every_option(tmp_path):
    with pytest.raises(RegistryError) as caught:
        framework.deploy(echo, vectorised=True, store=str(tmp_path / "store"))
    for option in ("vectorized", "python_packages", "setup", "name", "inline", "max_batch_rows",
                   "max_wait_ms"):
        assert option in str(caught.value)


def _no_temp_files(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob(".*")
                  if p.is_file() and p.name not in (".lock", ".keys.lock"))


def test_a_full_disk_is_reported_as_such_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    store = tmp_path / "store"
    s = LocalStore(store)
    s.publish("main", "echo", b"x", {"name": "echo", "branch": "main"})
    real_fsync = os.fsync

    def full(fd: int) -> None:
        # A full disk cannot be made here without privileges: the write fails as it would.
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    for attempt in (lambda: s.set_alias("main", "echo", "prod", 1),
                    lambda: auth.create_key(s),
                    lambda: s.publish("main", "echo", b"y", {"name": "echo", "branch": "main"}),
                    lambda: s.write_doc("jobs/a.json", b"{}")):
        with pytest.raises(StoreError) as caught:
            attempt()
        assert "disk holding the store is full" in str(caught.value)
        assert "permission" not in str(caught.value)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert _no_temp_files(store) == []
    assert list((store / ".staging").iterdir()) == []
    assert s.aliases("main", "echo") == {} and s.read_keys() is None
