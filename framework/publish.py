"""Deploying: import the configured modules, pack every deployment, publish.

Everything is packed before anything is published, so a deployment that
cannot be packaged stops the whole deploy with nothing written.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from framework import config as cfgmod
from framework import registry, signing
from framework.errors import ConfigError
from framework.packaging import Package, pack
from framework.store import Store, check_branch, open_store


@dataclass
class Result:
    name: str
    branch: str
    version: int | None
    status: str  # "new", "unchanged" or "dry-run"
    size: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def import_modules(cfg: cfgmod.Config) -> None:
    """Import `modules:` from deploy.yaml, with the config's directory importable."""
    if not cfg.modules:
        raise ConfigError(
            f"{cfg.path or cfgmod.CONFIG_NAME}: modules: nothing to deploy; list the modules "
            "that define deployments, e.g.  modules: [deployments]"
        )
    root = str(cfg.root)
    if root not in sys.path:
        sys.path.insert(0, root)
    for module in cfg.modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure is a config problem
            last = traceback.format_exception_only(exc)[-1].strip()
            raise ConfigError(
                f"{cfg.path or cfgmod.CONFIG_NAME}: modules: cannot import {module!r}: {last}; "
                "fix the module or remove it from the list"
            ) from exc


def roots_of(cfg: cfgmod.Config) -> list[Path]:
    """Directories whose modules travel by value: the project, and a script's own folder."""
    roots = [cfg.root]
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file:
        roots.append(Path(main_file).resolve().parent)
    return roots


def unchanged_version(store: Store, branch: str, name: str, content_sha256: str) -> int | None:
    """The latest version of (branch, name) when its content is `content_sha256`, else None."""
    latest = store.latest(branch, name)
    if latest is None:
        return None
    m = store.read_manifest(branch, name, latest)
    # An unsigned (or other-key) latest is republished once a signing key is set,
    # or the server that requires signatures could never load it.
    same = m.get("content_sha256") == content_sha256 and signing.signed_with(m, signing.current_key())
    return latest if same else None


def publish_all(
    store: Store,
    deployments: list[registry.Deployment],
    *,
    branch: str,
    roots: list[Path],
    dry_run: bool = False,
    on_result: Callable[[Result], None] | None = None,
    before_publish: Callable[[list[str]], None] | None = None,
) -> list[Result]:
    """Pack all, then publish each whose content differs from its latest version.

    `before_publish` gets the names that would get a new version, once everything
    is packed and before anything is written (dry runs included): it may raise
    to stop the deploy.
    """
    check_branch(branch)
    # Fail on an unwritable store before spending minutes packing large models.
    store.check_writable()
    packages: list[Package] = [pack(d, branch=branch, roots=roots) for d in deployments]
    unchanged = {p.name: unchanged_version(store, branch, p.name, p.manifest["content_sha256"])
                 for p in packages}
    if before_publish is not None:
        before_publish([p.name for p in packages if unchanged[p.name] is None])
    results = []
    for p in packages:
        if unchanged[p.name] is not None:
            version, status = unchanged[p.name], "unchanged"
        elif dry_run:
            version, status = None, "dry-run"
        else:
            version, status = store.publish(branch, p.name, p.artifact, p.manifest), "new"
        result = Result(p.name, branch, version, status, len(p.artifact), p.manifest["sha256"])
        results.append(result)
        if on_result:
            on_result(result)
    return results


def deploy(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    branch: str | None = None,
    store: str | None = None,
    config: str | None = None,
    python_packages: list[str] | None = None,
    setup: Callable[[], Any] | None = None,
) -> int:
    """Publish one function (a script, a notebook cell, a lambda) and return its version.

    `store` and `branch` default to deploy.yaml / $FRAMEWORK_STORE / $FRAMEWORK_BRANCH.
    """
    cfg = cfgmod.load(config)
    dep = fn if isinstance(fn, registry.Deployment) and not (name or python_packages or setup) \
        else registry.make(fn, name=name, python_packages=python_packages, setup=setup)
    target = open_store(store) if store else cfg.open_store()
    [result] = publish_all(target, [dep], branch=branch or cfg.branch, roots=roots_of(cfg))
    return result.version  # type: ignore[return-value]
