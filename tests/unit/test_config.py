"""deploy.yaml's checks, called in-process: what `framework serve` and `deploy` refuse at start.

tests/integration/test_core.py and test_hygiene.py run the same refusals through the CLI
(exit code 2 and the message); these check every setting without starting a process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from framework import config
from framework.errors import ConfigError


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    return config.load(path)


@pytest.mark.parametrize("key", sorted(config.SERVER_MINIMUMS))
def test_every_numeric_server_setting_below_its_minimum_is_refused_naming_it(tmp_path, key):
    below = config.SERVER_MINIMUMS[key] - 1
    with pytest.raises(ConfigError, match=rf"server\.{key}: must be at least"):
        load(tmp_path, f"server: {{{key}: {below}}}\n")


@pytest.mark.parametrize("key", sorted(config.SERVER_MINIMUMS))
def test_every_numeric_server_setting_at_its_minimum_is_taken(tmp_path, key):
    minimum = config.SERVER_MINIMUMS[key]
    if isinstance(config.SERVER_DEFAULTS[key], int):
        minimum = int(minimum)
    assert load(tmp_path, f"server: {{{key}: {minimum}}}\n").server[key] == minimum


@pytest.mark.parametrize("key", sorted(config.SERVER_MAXIMUMS))
def test_every_numeric_server_setting_above_its_maximum_is_refused_naming_it(tmp_path, key):
    maximum = config.SERVER_MAXIMUMS[key]
    assert load(tmp_path, f"server: {{{key}: {maximum:g}}}\n").server[key] == maximum
    with pytest.raises(ConfigError, match=rf"server\.{key}: must be at most {maximum:g}"):
        load(tmp_path, f"server: {{{key}: {maximum + 1:g}}}\n")


def test_defaults_apply_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FRAMEWORK_CONFIG", raising=False)
    monkeypatch.delenv("FRAMEWORK_STORE", raising=False)
    monkeypatch.delenv("FRAMEWORK_BRANCH", raising=False)
    got = config.load()
    assert got.path is None and got.branch == "main" and got.modules == []
    assert got.store == str(tmp_path / config.DEFAULT_STORE)
    assert got.server == config.SERVER_DEFAULTS


@pytest.mark.parametrize("text,fragment", [
    ("server: {nosuch: 1}\n", "server.nosuch: unknown key"),
    ("stores: x\n", "stores: unknown key"),
    ("server: {port: '80'}\n", "server.port: must be a int"),
    ("server: {metrics: 1}\n", "server.metrics: must be a bool"),
    ("server: {max_rows: true}\n", "server.max_rows: must be a int"),
    ("server: {isolation: fork}\n", "server.isolation: must be one of ['thread', 'process']"),
    ("server: {webhook_allow: [1]}\n", "server.webhook_allow: must be a list"),
    ("server: [1]\n", "server: must be a mapping"),
    ("modules: deployments\n", "modules: must be a list of module names"),
    ("store: [1]\n", "store: must be a directory path"),
    ("aliases: {m: {prod: 0}}\n", "aliases.m: must map alias names to version numbers"),
    ("[1, 2]\n", "must be a mapping of settings"),
    ("server: {port: [\n", "not valid YAML"),
])
def test_a_bad_deploy_yaml_names_the_key_and_the_fix(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert fragment in str(caught.value) and str(tmp_path / "deploy.yaml") in str(caught.value)


def test_a_float_setting_takes_an_int_and_relative_stores_are_under_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("FRAMEWORK_STORE", raising=False)
    got = load(tmp_path, "store: s\nserver: {timeout_seconds: 2}\n")
    assert got.server["timeout_seconds"] == 2 and got.store == str(tmp_path.resolve() / "s")


def test_the_environment_overrides_store_and_branch(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAMEWORK_STORE", "s3://bucket/prefix")
    monkeypatch.setenv("FRAMEWORK_BRANCH", "feature")
    got = load(tmp_path, "store: s\nbranch: main\n")
    assert (got.store, got.branch) == ("s3://bucket/prefix", "feature")


def test_an_explicit_config_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; check --config"):
        config.load(tmp_path / "missing.yaml")
