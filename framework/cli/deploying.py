"""`framework deploy` and `framework build`: the steps CI runs before serving."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

import click

from framework import config as cfgmod
from framework.build import releases, registry
from framework.cli.common import config_option, load_config, note, print_table, size
from framework.errors import ConfigError, NotFound

if TYPE_CHECKING:  # only in annotations
    from framework.build.publish import Result
    from framework.store.base import Store


class Steps:
    """Says each deployment's import, packing and publishing as it happens, on stderr.

    On a terminal a rich spinner names the step under way and finished steps
    scroll above it; otherwise each step is one plain line, as a CI log wants.
    """

    def __init__(self) -> None:
        self.console = self.live = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live
            from rich.spinner import Spinner

            self.console = Console(stderr=True, highlight=False)
            self.spinner = Spinner("dots", "importing modules")
            # stdout is redirected through the display only when it is this terminal too:
            # `deploy --json > records.jsonl` must still write its records to the file.
            self.live = Live(self.spinner, console=self.console, transient=True,
                             redirect_stdout=sys.stdout.isatty(), redirect_stderr=False)
            self.live.start()

    def line(self, text: str, next_step: str | None = None) -> None:
        if self.console is None:
            print(text, file=sys.stderr, flush=True)
            return
        self.console.print(text, markup=False)
        if next_step:
            self.spinner.update(text=next_step)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


@click.command("deploy")
@click.option("--branch", metavar="BRANCH", help="branch to publish into",
              show_default="deploy.yaml's branch, else main")
@click.option("--dry-run", is_flag=True, help="package and validate everything, publish nothing")
@click.option("--json", "as_json", is_flag=True,
              help="print one JSON record per deployment on stdout instead of a table")
@config_option
def deploy(branch: str | None, dry_run: bool, as_json: bool) -> int:
    """Package deploy.yaml's deployments and publish what changed."""
    cfg = load_config()
    if cfg.path is None:
        raise ConfigError(
            f"no {cfgmod.CONFIG_NAME} in {os.getcwd()}: run `framework deploy` in the project's "
            f"directory, or pass --config PATH (or set $FRAMEWORK_CONFIG); {cfgmod.CONFIG_NAME} "
            "lists the modules to deploy, e.g.  modules: [deployments]"
        )
    branch = releases.deploy_branch(branch, cfg)
    steps = Steps()
    try:
        store, results = _deploy(cfg, branch, dry_run, as_json, steps)
    finally:
        steps.stop()
    if not dry_run:
        for name, alias, version in releases.apply_pins(cfg, store, branch):
            note(f"alias {alias} of {name} -> v{version} (pinned in {cfg.path})")
    if not as_json:
        print_table(
            [[r.name, r.branch, r.version, r.status, size(r.size), r.sha256[:12]] for r in results],
            ["NAME", "BRANCH", "VERSION", "STATUS", "SIZE", "SHA256"],
        )
    return 0


def _deploy(cfg: cfgmod.Config, branch: str, dry_run: bool, as_json: bool, steps: Steps
            ) -> tuple[Store, list[Result]]:
    from framework.build.publish import import_modules, publish_all, roots_of

    seen: set[str] = set()

    def imported(module: str) -> None:
        found = [n for n in registry.registered() if n not in seen]
        seen.update(found)
        steps.line(f"imported {module}: {', '.join(found) or 'no deployments'}", "importing")

    import_modules(cfg, on_imported=imported)
    deps = list(registry.registered().values())
    if not deps:
        raise ConfigError(
            f"{cfg.path or cfgmod.CONFIG_NAME}: modules {cfg.modules} define no @deployment functions"
        )
    store = cfg.open_store()
    if cfg.aliases and not releases.pins_for(cfg, branch):
        steps.line(f"note: the aliases in {cfg.path} apply to branch {cfg.branch!r}, not {branch!r}")
    steps.line(f"packaging {len(deps)} deployment(s) for branch {branch!r} into {cfg.store}"
               f"{' (dry run: nothing is published)' if dry_run else ''}", "packing")
    packed: list[str] = []

    def on_packed(package: Any) -> None:
        packed.append(package.name)
        steps.line(f"packed {package.name} ({size(len(package.artifact))}, sha256 "
                   f"{package.manifest['sha256'][:12]})",
                   f"packing ({len(packed)}/{len(deps)})" if len(packed) < len(deps)
                   else "publishing")

    def on_result(r: Result) -> None:
        shown = {"new": f"published {r.name} v{r.version}",
                 "unchanged": f"unchanged {r.name} v{r.version}",
                 "dry-run": f"would publish {r.name} (dry run)"}.get(r.status, f"{r.status} {r.name}")
        steps.line(shown, "publishing")
        if as_json:  # streamed, so a pipeline keeps the records of what was published before a failure
            print(json.dumps({**r.as_dict(), "url": releases.url_of(cfg, r)}), flush=True)

    names = [d.name for d in deps]
    return store, publish_all(
        store, deps, branch=branch, roots=roots_of(cfg), dry_run=dry_run,
        on_result=on_result, on_packed=on_packed,
        before_publish=lambda changed: releases.check_pins(cfg, store, branch, names, changed),
    )


@click.command("build")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--all", "every_version", is_flag=True,
              help="every version, not only latest and aliased ones")
@config_option
def build(names: tuple[str, ...], every_version: bool) -> int:
    """Build the environments deployments' packages need (CI, images).

    NAME limits the build to those deployments (default: every one).
    """
    from framework.execute.environments import Environments, build_all, wanted

    cfg = load_config()
    s = cfg.server
    envs = Environments(s["env_dir"] or None, s["pythons"])
    manifests = wanted(cfg.open_store(), every_version=every_version, names=list(names) or None)
    if names and not manifests:
        raise NotFound(f"no deployment named {', '.join(names)}; see `framework list`")

    def report(m: dict[str, Any], outcome: str) -> None:
        shown = {"here": "runs in the server's own environment", "built": "built",
                 "reused": "already built"}.get(outcome, f"FAILED: {outcome}")
        print(f"{m['name']} v{m['version']} ({m['branch']}): {shown}", file=sys.stderr, flush=True)

    note(f"building environments under {envs.root}")
    results = build_all(envs, manifests, rebuild_failed=True, report=report)
    return 1 if any(o not in ("here", "built", "reused") for _, o in results) else 0
