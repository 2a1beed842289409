"""The `framework` command line.

Exit codes: 0 success (an all-unchanged deploy included); 2 bad configuration
or usage; 3 a deployment could not be packaged; 4 the store could not be read
or written (or is damaged); 5 an unknown deployment, version or alias; 1
anything else; 130 interrupted. Every error is one `error: ...` line saying
what to do, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any, Callable

from framework import config as cfgmod
from framework.build import releases
from framework.store import manifest as mf
from framework.build import registry
from framework.errors import (
    ConfigError,
    FrameworkError,
    NotFound,
    PackagingError,
    RegistryError,
    StoreDamaged,
    StoreError,
)
from framework.build.publish import Result
from framework.store.base import Store

EXIT_CODES: dict[type[FrameworkError], int] = {
    ConfigError: 2,
    RegistryError: 2,
    PackagingError: 3,
    StoreError: 4,
    StoreDamaged: 4,
    NotFound: 5,
}
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: give a number from 1 to 65535")
    return port


def _workers(text: str) -> int:
    try:
        workers = int(text)
    except ValueError:
        workers = 0
    if workers < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of worker processes, at least 1")
    return workers


def _root_path(text: str) -> str:
    if not text.startswith("/") or text.endswith("/") or "//" in text:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give the prefix the proxy strips, starting with '/' and without a "
            "trailing '/', e.g. /ml")
    return text


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
    from framework.build.publish import import_modules, publish_all, roots_of

    if cfg.path is None:
        raise ConfigError(
            f"no {cfgmod.CONFIG_NAME} in {os.getcwd()}: run `framework deploy` in the project's "
            f"directory, or pass --config PATH (or set $FRAMEWORK_CONFIG); {cfgmod.CONFIG_NAME} "
            "lists the modules to deploy, e.g.  modules: [deployments]"
        )
    branch = releases.deploy_branch(args.branch, cfg)
    import_modules(cfg)
    deps = list(registry.registered().values())
    if not deps:
        raise ConfigError(
            f"{cfg.path or cfgmod.CONFIG_NAME}: modules {cfg.modules} define no @deployment functions"
        )
    store = cfg.open_store()
    if cfg.aliases and not releases.pins_for(cfg, branch):
        print(f"note: the aliases in {cfg.path} apply to branch {cfg.branch!r}, not {branch!r}",
              file=sys.stderr)
    print(f"packaging {len(deps)} deployment(s) for branch {branch!r} into {cfg.store}"
          f"{' (dry run: nothing is published)' if args.dry_run else ''}", file=sys.stderr)

    def record(r: Result) -> None:
        # Streamed, so a pipeline keeps the records of what was published before a failure.
        print(json.dumps({**r.as_dict(), "url": releases.url_of(cfg, r)}), flush=True)

    names = [d.name for d in deps]
    results = publish_all(
        store, deps, branch=branch, roots=roots_of(cfg), dry_run=args.dry_run,
        on_result=record if args.json else None,
        before_publish=lambda changed: releases.check_pins(cfg, store, branch, names, changed),
    )
    if not args.dry_run:
        for name, alias, version in releases.apply_pins(cfg, store, branch):
            print(f"alias {alias} of {name} -> v{version} (pinned in {cfg.path})", file=sys.stderr)
    if not args.json:
        print(_table(
            [[r.name, r.branch, r.version, r.status, _size(r.size), r.sha256[:12]] for r in results],
            ["NAME", "BRANCH", "VERSION", "STATUS", "SIZE", "SHA256"],
        ))
    return 0


def _check_port(host: str, port: int) -> None:
    """Fail with the fix in the message, before loading anything, when the address is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {exc.strerror}; stop the other server or pass "
                "--port N (or set server.port in deploy.yaml)"
            ) from None


def cmd_serve(args: argparse.Namespace, cfg: cfgmod.Config) -> int:
    import uvicorn

    from framework.serve.server import HTTPProtocol

    s = cfg.server
    host, port = args.host or s["host"], args.port or s["port"]
    workers = args.workers or s["workers"]
    if not 1 <= port <= 65535:
        raise ConfigError(f"{cfg.path or cfgmod.CONFIG_NAME}: server.port: {port} is not a TCP port; "
                          "give a number from 1 to 65535")
    _check_port(host, port)
    root_path = args.root_path or ""
    print(f"serving store {cfg.store} on http://{host}:{port} ({workers} worker(s))",
          file=sys.stderr)
    if workers == 1:
        from framework.serve.app import serving_app

        uvicorn.run(serving_app(cfg), host=host, port=port, log_level=args.log_level,
                    http=HTTPProtocol, access_log=not s["access_log"],
                    root_path=root_path)  # ours replaces uvicorn's access lines
    else:
        # Each worker process builds its own app from the same settings.
        if cfg.path:
            os.environ["FRAMEWORK_CONFIG"] = str(cfg.path)
        os.environ["FRAMEWORK_STORE"] = cfg.store
        uvicorn.run("framework.serve.app:app_from_env", factory=True, host=host, port=port,
                    workers=workers, log_level=args.log_level, http=HTTPProtocol,
                    access_log=not s["access_log"], root_path=root_path)
    return 0


def cmd_list(args: argparse.Namespace, cfg: cfgmod.Config) -> int:
    store = cfg.open_store()
    rows = []
    for branch, name, latest in store.deployments():
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
                     (git.get("commit") or "")[:10] or None, git.get("branch"), git.get("author"),
                     releases.origin_of(m)])
    print(_table(rows, ["VERSION", "CREATED", "SIZE", "SHA256", "COMMIT", "GIT BRANCH", "AUTHOR",
                        "ORIGIN"]))
    return 0


def cmd_show(args: argparse.Namespace, cfg: cfgmod.Config) -> int:
    store = cfg.open_store()
    branch = args.branch or cfg.branch
    version = store.resolve(branch, args.name, args.ref)
    print(mf.dumps(store.read_manifest(branch, args.name, version)).decode())
    return 0


def cmd_alias(args: argparse.Namespace, cfg: cfgmod.Config) -> int:
    store = cfg.open_store()
    branch = args.branch or cfg.branch
    where = f"{args.name} on branch {branch!r}"
    if args.action == "list":
        if not store.versions(branch, args.name):
            raise NotFound(f"no deployment {args.name!r} on branch {branch!r}; see `framework list`")
        found = sorted(store.aliases(branch, args.name).items())
        print(_table([list(kv) for kv in found], ["ALIAS", "VERSION"]) if found else
              f"{where} has no aliases; add one with `framework alias set {args.name} ALIAS VERSION`")
        return 0
    alias = releases.alias_name(args.alias)
    if alias in releases.pins_for(cfg, branch).get(args.name, {}):
        print(f"note: {cfg.path} pins {alias!r}; the next `framework deploy` puts it back",
              file=sys.stderr)
    if args.action == "rm":
        store.set_alias(branch, args.name, alias, None)
        print(f"{where}: removed alias {alias}")
    else:
        version = store.resolve(branch, args.name, args.version)
        store.set_alias(branch, args.name, alias, version)
        print(f"{where}: {alias} -> v{version}")
    return 0


def _now_runs(store: Store, result: Result) -> None:
    """Say what `latest` runs after a promote or rollback, and where its artifact came from."""
    m = store.read_manifest(result.branch, result.name, result.version)
    commit = ((m.get("git") or {}).get("commit") or "")[:10]
    print(f"{result.name} on branch {result.branch!r}: {result.status}; latest is now "
          f"v{result.version} ({releases.origin_of(m) or 'as deployed'}, sha256 "
          f"{result.sha256[:12]}{f', commit {commit}' if commit else ''})")


def cmd_promote(args: argparse.Namespace, cfg: cfgmod.Config) -> int:
    store = cfg.open_store()
    _now_runs(store, releases.promote(store, args.name, src=args.from_branch,
                                       dst=args.to or cfg.branch, ref=args.version))
    return 0


def cmd_rollback(args: argparse.Namespace, cfg: cfgmod.Config) -> int:
    store = cfg.open_store()
    _now_runs(store, releases.rollback(store, args.name, branch=args.branch or cfg.branch,
                                        to=args.to))
    return 0


def cmd_keys(args: argparse.Namespace, cfg: cfgmod.Config) -> int:
    from framework.serve import auth

    store = cfg.open_store()
    if args.action == "create":
        limited = [d.strip() for d in args.deployments.split(",") if d.strip()] if args.deployments else None
        key_id, key = auth.create_key(store, deployments=limited, note=args.note)
        print(key)
        print(f"created API key {key_id} for {', '.join(limited) if limited else 'every deployment'}; "
              "it is shown only this once: store it now", file=sys.stderr)
    elif args.action == "list":
        rows = [[k["id"], k["created_at"], ", ".join(k["deployments"] or ["*"]),
                 "revoked " + k["revoked_at"] if k["revoked_at"] else "active", k["note"] or None]
                for k in auth.list_keys(store)]
        print(_table(rows, ["ID", "CREATED", "DEPLOYMENTS", "STATUS", "NOTE"]) if rows else
              "no API keys: calls need none; `framework keys create` turns keys on")
    else:
        print(f"revoked API key {auth.revoke_key(store, args.key_id)}", file=sys.stderr)
    return 0


def cmd_build(args: argparse.Namespace, cfg: cfgmod.Config) -> int:
    from framework.execute.environments import Environments, build_all, wanted

    s = cfg.server
    envs = Environments(s["env_dir"] or None, s["pythons"])
    manifests = wanted(cfg.open_store(), every_version=args.all, names=args.names or None)
    if args.names and not manifests:
        raise NotFound(f"no deployment named {', '.join(args.names)}; see `framework list`")

    def report(m: dict[str, Any], outcome: str) -> None:
        shown = {"here": "runs in the server's own environment", "built": "built",
                 "reused": "already built"}.get(outcome, f"FAILED: {outcome}")
        print(f"{m['name']} v{m['version']} ({m['branch']}): {shown}", file=sys.stderr, flush=True)

    print(f"building environments under {envs.root}", file=sys.stderr)
    results = build_all(envs, manifests, rebuild_failed=True, report=report)
    return 1 if any(o not in ("here", "built", "reused") for _, o in results) else 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace, cfgmod.Config], int], str]] = {
    "deploy": (cmd_deploy, "package every deployment in deploy.yaml's modules and publish"),
    "serve": (cmd_serve, "serve the store over HTTP (Modelbit's REST protocol)"),
    "list": (cmd_list, "deployments with their latest version"),
    "versions": (cmd_versions, "every version of a deployment"),
    "show": (cmd_show, "a version's manifest, source included"),
    "alias": (cmd_alias, "set, remove or list a deployment's aliases (movable names for versions)"),
    "promote": (cmd_promote, "republish a branch's version as the next version of another branch"),
    "rollback": (cmd_rollback, "republish an older version as the new latest"),
    "keys": (cmd_keys, "create, list or revoke API keys (the first one turns keys on)"),
    "build": (cmd_build, "build the environments that deployments' packages need (for CI or an image)"),
}


def cmd_batch(args: argparse.Namespace, cfg: cfgmod.Config) -> int:
    from framework.batch.command import run

    return run(args, cfg)


COMMANDS["batch"] = (cmd_batch, "score a table (Parquet or CSV) offline with one pinned version")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="framework", description=__doc__.split("\n")[0])
    from framework import __version__

    p.add_argument("--version", action="version", version=f"framework {__version__}")
    p.add_argument("--config", help="path to deploy.yaml (default: $FRAMEWORK_CONFIG or ./deploy.yaml)")
    sub = p.add_subparsers(dest="command", required=True)
    subs = {name: sub.add_parser(name, help=text, description=text) for name, (_, text) in COMMANDS.items()}
    subs["deploy"].add_argument("--branch", help="branch to publish into (default: deploy.yaml, else main)")
    subs["serve"].add_argument("--host")
    subs["serve"].add_argument("--port", type=_port, help="1-65535 (default: server.port, 8000)")
    subs["serve"].add_argument("--workers", type=_workers, help="processes (default: server.workers, 1)")
    subs["serve"].add_argument("--log-level", default="info", choices=LOG_LEVELS)
    subs["serve"].add_argument(
        "--root-path", type=_root_path, metavar="PATH",
        help="the path prefix a reverse proxy strips before forwarding (e.g. /ml): links and "
             "the key check see the app as mounted there")
    subs["deploy"].add_argument("--dry-run", action="store_true",
                                help="package and validate everything, publish nothing")
    subs["deploy"].add_argument("--json", action="store_true",
                                help="print one JSON record per deployment instead of a table")
    for name in ("versions", "show", "rollback", "promote"):
        subs[name].add_argument("name")
    for name in ("versions", "show", "rollback"):
        subs[name].add_argument("--branch")
    subs["show"].add_argument("ref", nargs="?", default="latest", help="latest, a version or an alias")
    subs["rollback"].add_argument("--to", metavar="VERSION",
                                  help="version or alias to go back to (default: the one before latest)")
    subs["promote"].add_argument("--from", dest="from_branch", required=True, metavar="BRANCH")
    subs["promote"].add_argument("--to", metavar="BRANCH", help="default: deploy.yaml's branch, else main")
    subs["promote"].add_argument("--version", default="latest", metavar="REF",
                                 help="latest (default), a version or an alias of --from")
    subs["build"].add_argument("names", nargs="*", metavar="NAME",
                               help="deployments to build for (default: every one)")
    subs["build"].add_argument("--all", action="store_true",
                               help="every version, not only latest and aliased ones")
    actions = subs["alias"].add_subparsers(dest="action", required=True)
    for action, text in (("set", "point ALIAS at VERSION (a number, latest or another alias)"),
                         ("rm", "remove ALIAS"), ("list", "every alias and its version")):
        a = actions.add_parser(action, help=text, description=text)
        a.add_argument("name")
        if action != "list":
            a.add_argument("alias")
        if action == "set":
            a.add_argument("version")
        a.add_argument("--branch")
    keys = subs["keys"].add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="print a new key (shown once; the store keeps its hash)")
    create.add_argument("--deployments", metavar="A,B", help="only these deployments (default: all)")
    create.add_argument("--note", default="", help="who or what the key is for")
    keys.add_parser("list", help="every key: id, deployments, status (never the key itself)")
    keys.add_parser("revoke", help="revoke a key (a running server refuses it within a second)"
                    ).add_argument("key_id", help="the key's id (from `keys list`) or the key")
    from framework.batch.command import add_arguments as batch_arguments  # stdlib-only module

    batch_arguments(subs["batch"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = cfgmod.load(args.config)
        return COMMANDS[args.command][0](args, cfg)
    except FrameworkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return next((c for cls, c in EXIT_CODES.items() if isinstance(exc, cls)), 1)
    except OSError as exc:  # the file system refused something none of the checks foresaw
        print(f"error: {exc.strerror or exc}"
              f"{f': {exc.filename}' if exc.filename else ''}; check the path and its permissions",
              file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
