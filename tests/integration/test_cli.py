"""The command line itself: version, help, where options go, --json, usage errors, deploy's steps.

Every test runs the real `python -m framework` in a subprocess against a real
store on disk; the terminal test gives it a real pseudo-terminal.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from conftest import cli_env, run_cli, stop_process

import framework
from framework.cli import cli
from framework.store.local import LocalStore

FILES = {
    "mod_a.py": "from framework import deployment\n\n@deployment\ndef a(x):\n    return x + 1\n",
    "mod_b.py": ("from framework import deployment\n\n@deployment\ndef b(x):\n    return x * 2\n\n"
                 "@deployment\ndef c(x: int, y: int = 1) -> int:\n    return x * y\n"),
}


def project(root: Path, config_name: str = "deploy.yaml") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / config_name).write_text("modules: [mod_a, mod_b]\n")
    for name, text in FILES.items():
        (root / name).write_text(text)
    return root


@pytest.fixture
def deployed(tmp_path: Path) -> tuple[Path, Path]:
    """A project of three deployments, deployed twice (b changed), with an alias."""
    root, store = project(tmp_path / "p"), tmp_path / "store"
    run_cli("deploy", store=store, cwd=root)
    (root / "mod_b.py").write_text(FILES["mod_b.py"].replace("x * 2", "x * 4"))
    run_cli("deploy", store=store, cwd=root)
    run_cli("alias", "set", "b", "prod", "1", store=store, cwd=root)
    return root, store


def test_version():
    proc = run_cli("--version", store="unused")
    assert proc.stdout == f"framework {framework.__version__}\n"


def _leaves(group: click.Group, path: str = "framework") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += _leaves(command, f"{path} {name}")
        else:
            found.append((f"{path} {name}", command))
    return found


def test_every_command_has_a_one_line_help_and_every_option_a_default():
    ctx = click.Context(cli, info_name="framework")
    leaves = _leaves(cli)
    assert len(leaves) == 15, [p for p, _ in leaves]
    for path, command in leaves:
        short = command.get_short_help_str(limit=66)
        assert short and not short.endswith("..."), (path, short)
        for param in command.params:
            if not isinstance(param, click.Option) or param.is_flag or param.required:
                continue
            # The group's show_default=True shows a real default; dynamic ones say theirs in words.
            assert isinstance(param.show_default, str) or param.get_default(ctx) is not None, (
                path, param.name)


@pytest.mark.parametrize("args, shown", [
    (["serve", "--help"], ["[default: info]", "server.port in deploy.yaml, else 8000",
                           "$FRAMEWORK_CONFIG, else ./deploy.yaml"]),
    (["batch", "--help"], ["[default: 10000]", "[default: local]", "CPU count"]),
    (["promote", "--help"], ["[default: latest]", "deploy.yaml's branch, else main"]),
    (["--help"], ["deploy", "Package deploy.yaml's deployments and publish what changed."]),
])
def test_help_shows_defaults(args, shown):
    out = " ".join(run_cli(*args, store="unused").stdout.split())  # unwrap click's line wrapping
    for text in shown:
        assert text in out, (text, out)


def test_config_goes_before_or_after_the_command(tmp_path):
    root = project(tmp_path / "p", "other.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = str(root / "other.yaml")
    after = run_cli("deploy", "--config", config, store=tmp_path / "s1", cwd=elsewhere)
    before = run_cli("--config", config, "deploy", store=tmp_path / "s2", cwd=elsewhere)
    for proc in (after, before):
        assert [line.split()[0] for line in proc.stdout.splitlines()[1:]] == ["a", "b", "c"]
    # Given twice, the one after the command wins.
    both = run_cli("--config", str(tmp_path / "missing.yaml"), "list", "--config", config,
                   store=tmp_path / "s1", cwd=elsewhere)
    assert both.stdout.splitlines()[0].split() == ["NAME", "BRANCH", "LATEST", "ALIASES"]
    assert LocalStore(tmp_path / "s2").versions("main", "c") == [1]


def test_list_json_matches_the_store(deployed):
    root, store = deployed
    doc = json.loads(run_cli("list", "--json", store=store, cwd=root).stdout)
    assert doc["store"] == str(store)
    real = LocalStore(store)
    assert doc["deployments"] == [
        {"name": name, "branch": branch, "latest": latest, "aliases": real.aliases(branch, name)}
        for branch, name, latest in real.deployments()]
    assert {d["name"]: (d["latest"], d["aliases"]) for d in doc["deployments"]} == {
        "a": (1, {}), "b": (2, {"prod": 1}), "c": (1, {})}


def test_versions_json_matches_the_manifests(deployed):
    root, store = deployed
    doc = json.loads(run_cli("versions", "b", "--json", store=store, cwd=root).stdout)
    assert (doc["name"], doc["branch"]) == ("b", "main")
    assert [v["version"] for v in doc["versions"]] == [1, 2]
    for shown in doc["versions"]:
        m = LocalStore(store).read_manifest("main", "b", shown["version"])
        assert shown["sha256"] == m["sha256"] and shown["size"] == m["size"]
        assert shown["created_at"] == m["created_at"]
        assert set(shown["git"]) == {"commit", "branch", "author"}
    assert doc["versions"][0]["sha256"] != doc["versions"][1]["sha256"]


def test_show_json_is_the_manifest(deployed):
    root, store = deployed
    by_alias = json.loads(run_cli("show", "b", "prod", "--json", store=store, cwd=root).stdout)
    assert by_alias == LocalStore(store).read_manifest("main", "b", 1)
    latest = json.loads(run_cli("show", "c", "--json", store=store, cwd=root).stdout)
    assert latest["version"] == 1 and "def c(x: int, y: int = 1)" in latest["source"]
    # Without --json, off a terminal, the same document.
    assert json.loads(run_cli("show", "b", "prod", store=store, cwd=root).stdout) == by_alias


@pytest.mark.parametrize("args, words", [
    ([], ["missing command", "`framework --help`"]),
    (["keys"], ["missing command", "`framework keys --help`"]),
    (["list", "--bogus"], ["no such option", "--bogus", "`framework list --help`"]),
    (["versions"], ["missing argument 'NAME'", "`framework versions --help`"]),
    (["promote", "a"], ["missing option '--from'", "`framework promote --help`"]),
    (["alias", "move", "a"], ["no such command 'move'", "`framework alias --help`"]),
    (["batch", "a", "--input", "x.csv", "--output", "o.csv", "--chunk-rows", "many"],
     ["--chunk-rows", "'many' is not a valid integer"]),
])
def test_a_usage_error_is_one_line_and_exit_2(tmp_path, args, words):
    proc = run_cli(*args, store=tmp_path / "store", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_an_unknown_deployment_keeps_exit_5_with_json(deployed):
    root, store = deployed
    for args in (["versions", "nope", "--json"], ["show", "nope", "--json"]):
        proc = run_cli(*args, store=store, cwd=root, check=False)
        assert proc.returncode == 5 and proc.stdout == "", proc
        assert proc.stderr.startswith("error: ") and "nope" in proc.stderr


def test_deploy_reports_each_deployment_as_it_goes(tmp_path):
    root, store = project(tmp_path / "p"), tmp_path / "store"
    first = run_cli("deploy", store=store, cwd=root).stderr.splitlines()
    for line in ("imported mod_a: a", "imported mod_b: b, c", "published a v1", "published c v1"):
        assert line in first, (line, first)
    for name in "abc":
        packed = next(i for i, line in enumerate(first) if line.startswith(f"packed {name} ("))
        assert first.index(f"imported mod_{'a' if name == 'a' else 'b'}: "
                           f"{'a' if name == 'a' else 'b, c'}") < packed
        assert packed < first.index(f"published {name} v1")
    (root / "mod_a.py").write_text(FILES["mod_a.py"].replace("x + 1", "x + 2"))
    dry = run_cli("deploy", "--dry-run", store=store, cwd=root).stderr.splitlines()
    assert "would publish a (dry run)" in dry and "unchanged b v1" in dry
    second = run_cli("deploy", "--json", store=store, cwd=root)
    assert "published a v2" in second.stderr.splitlines()
    assert "unchanged c v1" in second.stderr.splitlines()
    records = [json.loads(line) for line in second.stdout.splitlines()]
    assert [(r["name"], r["version"], r["status"]) for r in records] == [
        ("a", 2, "new"), ("b", 1, "unchanged"), ("c", 1, "unchanged")]


def _on_a_terminal(args: list[str], store: Path, cwd: Path, timeout: float = 120,
                   stdout: Path | None = None) -> str:
    """Run the CLI with stderr (and stdout, unless a file is given) on a pseudo-terminal;
    what it drew, as text."""
    main, child = pty.openpty()
    out_file = open(stdout, "w") if stdout else None  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "framework", *args], cwd=cwd, stdin=child,
                            stdout=out_file or child, stderr=child,
                            env=cli_env(store, TERM="xterm", COLUMNS="120"))
    os.close(child)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 1)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
        assert proc.wait(30) == 0, out.decode(errors="replace")
    finally:
        os.close(main)
        if out_file:
            out_file.close()
        stop_process(proc)
    return out.decode(errors="replace")


def test_on_a_terminal_deploy_and_list_use_rich(tmp_path):
    root, store = project(tmp_path / "p"), tmp_path / "store"
    deployed = _on_a_terminal(["deploy"], store, root)
    for text in ("imported mod_b: b, c", "packed c (", "published c v1", "SHA256"):
        assert text in deployed, (text, deployed)
    listed = _on_a_terminal(["list"], store, root)
    assert "NAME" in listed and "─" * 10 in listed  # rich's rule under the header
    assert LocalStore(store).versions("main", "c") == [1]


def test_deploy_json_to_a_file_while_the_terminal_shows_progress(tmp_path):
    root, store, records = project(tmp_path / "p"), tmp_path / "store", tmp_path / "out.jsonl"
    drawn = _on_a_terminal(["deploy", "--json"], store, root, stdout=records)
    assert "published b v1" in drawn and '"status"' not in drawn
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert [(r["name"], r["status"]) for r in lines] == [("a", "new"), ("b", "new"), ("c", "new")]
    assert lines[0]["url"].endswith("/v1/a/main/1")


def test_ctrl_c_during_deploy_exits_130_without_a_traceback(tmp_path):
    root, store = project(tmp_path / "p"), tmp_path / "store"
    marker = tmp_path / "importing"
    (root / "mod_a.py").write_text(  # holds the deploy inside the import, where Ctrl-C lands
        f"import pathlib, time\npathlib.Path({str(marker)!r}).write_text('x')\ntime.sleep(60)\n"
        + FILES["mod_a.py"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "framework", "deploy"], cwd=root, env=cli_env(store),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell's background job inherits SIGINT ignored; the CLI under test must see it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "no import"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        stop_process(proc)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in stderr
    assert not store.exists() or LocalStore(store).deployments() == []
