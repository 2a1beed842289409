"""Reading and moving versions: list, versions, show, alias, promote, rollback."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from framework.build import releases
from framework.store import manifest as mf
from framework.cli.common import (
    branch_option,
    config_option,
    fancy,
    json_option,
    load_config,
    note,
    print_json,
    print_table,
    size,
)
from framework.errors import NotFound

if TYPE_CHECKING:  # only in annotations
    from framework.build.publish import Result
    from framework.store.base import Store


@click.command("list")
@json_option("the deployments")
@config_option
def list_(as_json: bool) -> int:
    """Deployments with their latest version and aliases."""
    cfg = load_config()
    store = cfg.open_store()
    found = [(branch, name, latest, dict(sorted(store.aliases(branch, name).items())))
             for branch, name, latest in store.deployments()]
    if as_json:
        print_json({"store": cfg.store, "deployments": [
            {"name": name, "branch": branch, "latest": latest, "aliases": aliases}
            for branch, name, latest, aliases in found]})
    elif found:
        print_table([[name, branch, latest, ", ".join(f"{a}->{v}" for a, v in aliases.items()) or None]
                     for branch, name, latest, aliases in found],
                    ["NAME", "BRANCH", "LATEST", "ALIASES"])
    else:
        click.echo(f"no deployments in {cfg.store}; run `framework deploy`")
    return 0


def _missing(name: str, branch: str) -> NotFound:
    return NotFound(f"no deployment {name!r} on branch {branch!r}; see `framework list`")


@click.command("versions")
@click.argument("name")
@branch_option()
@json_option("the versions")
@config_option
def versions(name: str, branch: str | None, as_json: bool) -> int:
    """Every version of a deployment: time, size, sha256, commit."""
    cfg = load_config()
    store = cfg.open_store()
    branch = branch or cfg.branch
    numbers = store.versions(branch, name)
    if not numbers:
        raise _missing(name, branch)
    found = []
    for v in numbers:
        m = store.read_manifest(branch, name, v)
        git = m.get("git") or {}
        found.append({"version": v, "created_at": m["created_at"], "size": m["size"],
                      "sha256": m["sha256"], "origin": releases.origin_of(m),
                      "git": {k: git.get(k) for k in ("commit", "branch", "author")}})
    if as_json:
        print_json({"name": name, "branch": branch, "versions": found})
        return 0
    print_table([[f["version"], f["created_at"], size(f["size"]), f["sha256"][:12],
                  (f["git"]["commit"] or "")[:10] or None, f["git"]["branch"], f["git"]["author"],
                  f["origin"]] for f in found],
                ["VERSION", "CREATED", "SIZE", "SHA256", "COMMIT", "GIT BRANCH", "AUTHOR", "ORIGIN"])
    return 0


@click.command("show")
@click.argument("name")
@click.argument("ref", default="latest")
@branch_option()
@json_option("the manifest (the same document, never highlighted)")
@config_option
def show(name: str, ref: str, branch: str | None, as_json: bool) -> int:
    """A version's manifest, source included. REF: latest (default), a version or an alias."""
    cfg = load_config()
    store = cfg.open_store()
    branch = branch or cfg.branch
    text = mf.dumps(store.read_manifest(branch, name, store.resolve(branch, name, ref))).decode()
    if fancy() and not as_json:
        from rich.console import Console
        from rich.syntax import Syntax

        Console().print(Syntax(text, "json", word_wrap=True))
    else:
        click.echo(text)
    return 0


@click.group("alias", no_args_is_help=False)
def alias() -> None:
    """Set, remove or list aliases (movable names for versions)."""


def _alias_change(name: str, alias_: str, branch: str | None) -> tuple[Any, Store, str, str]:
    cfg = load_config()
    store = cfg.open_store()
    branch = branch or cfg.branch
    checked = releases.alias_name(alias_)
    if checked in releases.pins_for(cfg, branch).get(name, {}):
        note(f"note: {cfg.path} pins {checked!r}; the next `framework deploy` puts it back")
    return cfg, store, branch, checked


@alias.command("set")
@click.argument("name")
@click.argument("alias_", metavar="ALIAS")
@click.argument("version")
@branch_option()
@config_option
def alias_set(name: str, alias_: str, version: str, branch: str | None) -> int:
    """Point ALIAS at VERSION (a number, latest or another alias)."""
    _, store, branch, checked = _alias_change(name, alias_, branch)
    number = store.resolve(branch, name, version)
    store.set_alias(branch, name, checked, number)
    click.echo(f"{name} on branch {branch!r}: {checked} -> v{number}")
    return 0


@alias.command("rm")
@click.argument("name")
@click.argument("alias_", metavar="ALIAS")
@branch_option()
@config_option
def alias_rm(name: str, alias_: str, branch: str | None) -> int:
    """Remove ALIAS."""
    _, store, branch, checked = _alias_change(name, alias_, branch)
    store.set_alias(branch, name, checked, None)
    click.echo(f"{name} on branch {branch!r}: removed alias {checked}")
    return 0


@alias.command("list")
@click.argument("name")
@branch_option()
@config_option
def alias_list(name: str, branch: str | None) -> int:
    """Every alias of NAME and its version."""
    cfg = load_config()
    store = cfg.open_store()
    branch = branch or cfg.branch
    if not store.versions(branch, name):
        raise _missing(name, branch)
    found = sorted(store.aliases(branch, name).items())
    if found:
        print_table([list(kv) for kv in found], ["ALIAS", "VERSION"])
    else:
        click.echo(f"{name} on branch {branch!r} has no aliases; add one with "
                   f"`framework alias set {name} ALIAS VERSION`")
    return 0


def _now_runs(store: Store, result: Result) -> None:
    """Say what `latest` runs after a promote or rollback, and where its artifact came from."""
    m = store.read_manifest(result.branch, result.name, result.version)
    commit = ((m.get("git") or {}).get("commit") or "")[:10]
    click.echo(f"{result.name} on branch {result.branch!r}: {result.status}; latest is now "
               f"v{result.version} ({releases.origin_of(m) or 'as deployed'}, sha256 "
               f"{result.sha256[:12]}{f', commit {commit}' if commit else ''})")


@click.command("promote")
@click.argument("name")
@click.option("--from", "from_branch", required=True, metavar="BRANCH",
              help="the branch whose version is promoted")
@click.option("--to", metavar="BRANCH", help="the branch that gets it as its next version",
              show_default="deploy.yaml's branch, else main")
@click.option("--version", "ref", default="latest", metavar="REF",
              help="a version number or an alias of --from")
@config_option
def promote(name: str, from_branch: str, to: str | None, ref: str) -> int:
    """Republish a branch's version as another branch's next version."""
    cfg = load_config()
    store = cfg.open_store()
    _now_runs(store, releases.promote(store, name, src=from_branch, dst=to or cfg.branch, ref=ref))
    return 0


@click.command("rollback")
@click.argument("name")
@click.option("--to", metavar="VERSION", help="version or alias to go back to",
              show_default="the one before latest")
@branch_option()
@config_option
def rollback(name: str, to: str | None, branch: str | None) -> int:
    """Republish an older version as the new latest."""
    cfg = load_config()
    store = cfg.open_store()
    _now_runs(store, releases.rollback(store, name, branch=branch or cfg.branch, to=to))
    return 0


COMMANDS = (list_, versions, show, alias, promote, rollback)
