"""The `framework` command line.

Exit codes: 0 success (an all-unchanged deploy included); 2 bad configuration
or usage; 3 a deployment could not be packaged; 4 the store could not be read
or written; 5 an unknown deployment, version or alias; 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from framework import config as cfgmod
from framework import manifest as mf
from framework import registry
from framework.errors import ConfigError, FrameworkError, NotFound, PackagingError, RegistryError, StoreError

EXIT_CODES: dict[type[FrameworkError], int] = {
    ConfigError: 2,
    RegistryError: 2,
    PackagingError: 3,
    StoreError: 4,
    NotFound: 5,
}


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_deploy(args: argparse.Namespace, cfg: cfgmod.Config) -> int:
    from framework.publish import import_modules, publish_all, roots_of

    import_modules(cfg)
    deps = list(registry.registered().values())
    if not deps:
        raise ConfigError(
            f"{cfg.path or cfgmod.CONFIG_NAME}: modules {cfg.modules} define no @deployment functions"
        )
    branch = args.branch or cfg.branch
    print(f"packaging {len(deps)} deployment(s) for branch {branch!r} into {cfg.store}",
          file=sys.stderr)
    results = publish_all(cfg.open_store(), deps, branch=branch, roots=roots_of(cfg))
    print(_table(
        [[r.name, r.branch, r.version, r.status, _size(r.size), r.sha256[:12]] for r in results],
        ["NAME", "BRANCH", "VERSION", "STATUS", "SIZE", "SHA256"],
    ))
    return 0


def cmd_serve(args: argparse.Namespace, cfg: cfgmod.Config) -> int:
    import uvicorn

    s = cfg.server
    host, port = args.host or s["host"], args.port or s["port"]
    workers = args.workers or s["workers"]
    print(f"serving store {cfg.store} on http://{host}:{port} ({workers} worker(s))",
          file=sys.stderr)
    if workers == 1:
        from framework.app import create_app

        uvicorn.run(create_app(cfg), host=host, port=port, log_level=args.log_level)
    else:
        # Each worker process builds its own app from the same settings.
        if cfg.path:
            os.environ["FRAMEWORK_CONFIG"] = str(cfg.path)
        os.environ["FRAMEWORK_STORE"] = cfg.store
        uvicorn.run("framework.app:app_from_env", factory=True, host=host, port=port,
                    workers=workers, log_level=args.log_level)
    return 0


def cmd_list(args: argparse.Namespace, cfg: cfgmod.Config) -> int:
    store = cfg.open_store()
    rows = []
    for branch in store.branches():
        for name in store.names(branch):
            latest = store.latest(branch, name)
            if latest is not None:
                aliases = ", ".join(f"{a}->{v}" for a, v in sorted(store.aliases(branch, name).items()))
                rows.append([name, branch, latest, aliases or None])
    print(_table(rows, ["NAME", "BRANCH", "LATEST", "ALIASES"]) if rows else
          f"no deployments in {cfg.store}; run `framework deploy`")
    return 0


def cmd_versions(args: argparse.Namespace, cfg: cfgmod.Config) -> int:
    store = cfg.open_store()
    branch = args.branch or cfg.branch
    numbers = store.versions(branch, args.name)
    if not numbers:
        raise NotFound(f"no deployment {args.name!r} on branch {branch!r}; see `framework list`")
    rows = []
    for v in numbers:
        m = store.read_manifest(branch, args.name, v)
        git = m.get("git") or {}
        rows.append([v, m["created_at"], _size(m["size"]), m["sha256"][:12],
                     (git.get("commit") or "")[:10] or None, git.get("branch"), git.get("author")])
    print(_table(rows, ["VERSION", "CREATED", "SIZE", "SHA256", "COMMIT", "GIT BRANCH", "AUTHOR"]))
    return 0


def cmd_show(args: argparse.Namespace, cfg: cfgmod.Config) -> int:
    store = cfg.open_store()
    branch = args.branch or cfg.branch
    version = store.resolve(branch, args.name, args.ref)
    print(mf.dumps(store.read_manifest(branch, args.name, version)).decode())
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace, cfgmod.Config], int], str]] = {
    "deploy": (cmd_deploy, "package every deployment in deploy.yaml's modules and publish"),
    "serve": (cmd_serve, "serve the store over HTTP (Modelbit's REST protocol)"),
    "list": (cmd_list, "deployments with their latest version"),
    "versions": (cmd_versions, "every version of a deployment"),
    "show": (cmd_show, "a version's manifest, source included"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="framework", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="path to deploy.yaml (default: $FRAMEWORK_CONFIG or ./deploy.yaml)")
    sub = p.add_subparsers(dest="command", required=True)
    subs = {name: sub.add_parser(name, help=text, description=text) for name, (_, text) in COMMANDS.items()}
    subs["deploy"].add_argument("--branch", help="branch to publish into (default: deploy.yaml, else main)")
    subs["serve"].add_argument("--host")
    subs["serve"].add_argument("--port", type=int)
    subs["serve"].add_argument("--workers", type=int)
    subs["serve"].add_argument("--log-level", default="info")
    for name in ("versions", "show"):
        subs[name].add_argument("name")
        subs[name].add_argument("--branch")
    subs["show"].add_argument("ref", nargs="?", default="latest", help="latest, a version or an alias")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = cfgmod.load(args.config)
        return COMMANDS[args.command][0](args, cfg)
    except FrameworkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return next((c for cls, c in EXIT_CODES.items() if isinstance(exc, cls)), 1)
