"""`deploy.yaml` and the environment variables that override it.

Lookup: `--config PATH`, else $FRAMEWORK_CONFIG, else `./deploy.yaml`; with
no file at all, the defaults below apply (store `.framework-store` in the
current directory, branch `main`). $FRAMEWORK_STORE and $FRAMEWORK_BRANCH
override `store:` and `branch:`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from framework.errors import ConfigError, StoreError

CONFIG_NAME = "deploy.yaml"
DEFAULT_STORE = ".framework-store"

SERVER_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 8000,
    "workers": 1,
    "max_body_bytes": 32 * 1024 * 1024,
    # A client still sending its body after this long gets 408: a slow or stalled
    # sender must not keep its connection and memory for ever.
    "body_timeout_seconds": 10.0,
    # Rows per batch request; more answer 413 (docs/protocol.md: what a row costs in memory).
    "max_rows": 1_000_000,
    "max_concurrency": 1024,
    "timeout_seconds": 300.0,
    "cache_size": 64,
    # Loaded versions kept, in bytes of their artifacts (0: no bound but cache_size).
    "cache_bytes": 4 * 1024**3,
    # Where sync deployments run unless they say: "thread" (their own threads in the
    # server) or "process" (warm worker processes); see docs/execution.md.
    "isolation": "thread",
    # Worker processes run this much nicer than the server (0 to 19; 0: as the server), so
    # that on busy cores the event loop, which answers every deployment, runs first.
    "worker_nice": 5,
    # Per-deployment environments (docs/environments.md): where they are built
    # ("": $FRAMEWORK_CACHE_DIR/envs, else ~/.cache/framework/envs), whether those of
    # `latest` and aliases are built before /readyz says ready, and interpreters of
    # other Python versions to build them from.
    "env_dir": "",
    "prebuild": False,
    # Load the versions `latest` and aliases name before /readyz says ready, and again
    # when they move (docs/many-machines.md): no caller pays a cold load after a deploy.
    "preload": True,
    "pythons": [],
    "debug": False,
    # Operations and security (README "Operations and security").
    "require_api_keys": False,
    "metrics": True,
    "access_log": True,
    "log_payloads": False,
    # Modelbit's response_webhook and response_format "links" (docs/async.md).
    "async_timeout_seconds": 900.0,
    "async_concurrency": 8,
    "async_lease_seconds": 30.0,
    "async_poll_seconds": 1.0,
    "async_retention_seconds": 86400.0,
    "webhook_allow": [],
    "webhook_attempts": 8,
    "webhook_backoff_seconds": 1.0,
    "webhook_backoff_max_seconds": 60.0,
    "webhook_timeout_seconds": 10.0,
    "link_ttl_seconds": 3600.0,
    "link_base_url": "",
}

# The smallest value each numeric server setting may take.
SERVER_MINIMUMS: dict[str, float] = {
    "port": 1, "workers": 1, "max_body_bytes": 1, "body_timeout_seconds": 0.001, "max_rows": 1, "max_concurrency": 1,
    "timeout_seconds": 0.001, "cache_size": 1, "cache_bytes": 0, "worker_nice": 0,
    "async_timeout_seconds": 0.001, "async_concurrency": 1,
    "async_lease_seconds": 0.1, "async_poll_seconds": 0.01, "async_retention_seconds": 0,
    "webhook_attempts": 1, "webhook_backoff_seconds": 0, "webhook_backoff_max_seconds": 0,
    "webhook_timeout_seconds": 0.001, "link_ttl_seconds": 0.001,
}
# The largest value a numeric server setting may take.
SERVER_MAXIMUMS: dict[str, float] = {"worker_nice": 19}
# The values a string setting may take.
SERVER_CHOICES: dict[str, tuple[str, ...]] = {"isolation": ("thread", "process")}

TOP_KEYS = {"store", "branch", "modules", "aliases", "server"}


@dataclass
class Config:
    path: Path | None
    root: Path
    store: str
    branch: str = "main"
    modules: list[str] = field(default_factory=list)
    aliases: dict[str, dict[str, int]] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=lambda: dict(SERVER_DEFAULTS))

    def open_store(self) -> Any:
        from framework.store import open_store

        return open_store(self.store)


def _fail(path: Path | None, key: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{path or CONFIG_NAME}: {key}: {problem}; {fix}")


def _check_server(path: Path | None, raw: Any) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _fail(path, "server", "must be a mapping", f"allowed keys: {sorted(SERVER_DEFAULTS)}")
    out = {k: list(v) if isinstance(v, list) else v for k, v in SERVER_DEFAULTS.items()}
    for key, value in raw.items():
        if key not in SERVER_DEFAULTS:
            raise _fail(path, f"server.{key}", "unknown key", f"allowed: {sorted(SERVER_DEFAULTS)}")
        want = type(SERVER_DEFAULTS[key])
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else (
            isinstance(value, want) and (want is bool or not isinstance(value, bool))
        )
        if want is list and ok and not all(isinstance(v, str) for v in value):
            ok = False
        if not ok:
            raise _fail(path, f"server.{key}", f"must be a {want.__name__}, got {value!r}", "fix it")
        if key in SERVER_CHOICES and value not in SERVER_CHOICES[key]:
            raise _fail(path, f"server.{key}", f"must be one of {list(SERVER_CHOICES[key])}, "
                        f"got {value!r}", "pick one")
        if key in SERVER_MINIMUMS and value < SERVER_MINIMUMS[key]:
            raise _fail(path, f"server.{key}", f"must be at least {SERVER_MINIMUMS[key]:g}, "
                        f"got {value!r}", "raise it")
        if key in SERVER_MAXIMUMS and value > SERVER_MAXIMUMS[key]:
            raise _fail(path, f"server.{key}", f"must be at most {SERVER_MAXIMUMS[key]:g}, "
                        f"got {value!r}", "lower it")
        out[key] = value
    return out


def _check_aliases(path: Path | None, raw: Any) -> dict[str, dict[str, int]]:
    # Imported here, as in Config.open_store: the store module pulls in manifest and registry.
    from framework.store.names import check_alias

    if raw is None:
        return {}
    fix = "write it as  aliases: {deployment_name: {alias_name: version_number}}"
    if not isinstance(raw, dict):
        raise _fail(path, "aliases", "must be a mapping", fix)
    for name, pins in raw.items():
        if not isinstance(pins, dict) or not all(
            isinstance(a, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
            for a, v in pins.items()
        ):
            raise _fail(path, f"aliases.{name}", "must map alias names to version numbers", fix)
        for alias in pins:
            try:
                check_alias(alias)
            except StoreError as exc:
                raise _fail(path, f"aliases.{name}.{alias}", str(exc), "rename it") from None
    return raw


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read the configuration; raises ConfigError naming the file, the key and the fix."""
    explicit = path or os.environ.get("FRAMEWORK_CONFIG")
    file = Path(explicit) if explicit else Path.cwd() / CONFIG_NAME
    raw: Any = {}
    if file.exists():
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: must be a mapping of settings ({sorted(TOP_KEYS)})")
    elif explicit:
        raise ConfigError(f"config file {file} does not exist; check --config / FRAMEWORK_CONFIG")
    else:
        file = None
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise _fail(file, ", ".join(sorted(unknown)), "unknown key", f"allowed: {sorted(TOP_KEYS)}")
    root = file.parent.resolve() if file else Path.cwd()
    store = os.environ.get("FRAMEWORK_STORE") or raw.get("store") or DEFAULT_STORE
    if not isinstance(store, str):
        raise _fail(file, "store", f"must be a directory path, got {store!r}", "quote it")
    if "://" not in store and not os.path.isabs(store):
        store = str(root / store)
    branch = os.environ.get("FRAMEWORK_BRANCH") or raw.get("branch") or "main"
    if not isinstance(branch, str):
        raise _fail(file, "branch", f"must be a string, got {branch!r}", "quote it")
    modules = raw.get("modules") or []
    if isinstance(modules, str) or not all(isinstance(m, str) for m in modules):
        raise _fail(file, "modules", "must be a list of module names", "e.g. [deployments]")
    return Config(
        path=file,
        root=root,
        store=store,
        branch=branch,
        modules=list(modules),
        aliases=_check_aliases(file, raw.get("aliases")),
        server=_check_server(file, raw.get("server")),
    )
