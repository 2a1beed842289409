"""Deploying: import the configured modules, pack every deployment, publish.

Everything is packed before anything is published, so a deployment that
cannot be packaged stops the whole deploy with nothing written.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from framework import config as cfgmod
from framework.build import registry
from framework.store import signing
from framework.errors import ConfigError, IntegrityError, StoreDamaged
from framework.build.packing import Package, pack
from framework.build.project import project_files
from framework.store.base import Store
from framework.store.names import check_branch
from framework.store import open_store


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


class _SourceLoader(importlib.machinery.SourceFileLoader):
    """Compiles a project module from its source, never from a cached .pyc.

    Python trusts a .pyc whose source has the same mtime (in whole seconds) and
    size, so a module edited within a second of its last import (a CI step
    that rewrites a file, a quick fix) would otherwise deploy the old code.
    """

    def get_code(self, fullname: str) -> Any:
        path = self.get_filename(fullname)
        return self.source_to_code(self.get_data(path), path)


class _ProjectFinder:
    """Finds modules as usual, giving the project's own a `_SourceLoader`."""

    def __init__(self, root: Path) -> None:
        self.own = project_files([root])

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        origin = getattr(spec, "origin", None) or ""
        if not origin.endswith(".py") or not self.own(origin):
            return None
        spec.loader = _SourceLoader(name, origin)
        return spec


def import_modules(cfg: cfgmod.Config, on_imported: Callable[[str], None] | None = None) -> None:
    """Import `modules:` from deploy.yaml, with the config's directory importable.
    `on_imported` gets each module's name once it is imported (the CLI shows progress)."""
    if not cfg.modules:
        raise ConfigError(
            f"{cfg.path or cfgmod.CONFIG_NAME}: modules: nothing to deploy; list the modules "
            "that define deployments, e.g.  modules: [deployments]"
        )
    root = str(cfg.root)
    if root not in sys.path:
        sys.path.insert(0, root)
    finder = _ProjectFinder(cfg.root)
    sys.meta_path.insert(0, finder)
    try:
        for module in cfg.modules:
            try:
                importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - any import failure is a config problem
                last = traceback.format_exception_only(exc)[-1].strip()
                raise ConfigError(
                    f"{cfg.path or cfgmod.CONFIG_NAME}: modules: cannot import {module!r}: {last}; "
                    "fix the module or remove it from the list"
                ) from exc
            if on_imported is not None:
                on_imported(module)
    finally:
        sys.meta_path.remove(finder)


def roots_of(cfg: cfgmod.Config) -> list[Path]:
    """Directories whose modules travel by value: the project, and a script's own folder."""
    roots = [cfg.root]
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file:
        roots.append(Path(main_file).resolve().parent)
    return roots


def holds(store: Store, branch: str, name: str, version: int, content_sha256: str) -> bool:
    """Whether `version` of (branch, name) holds `content_sha256`, intact and loadable here."""
    try:
        m = store.read_manifest(branch, name, version)
    except StoreDamaged:  # a damaged latest can never load: the fix is a fresh copy
        return False
    key = signing.current_key()
    # An unsigned (or other-key) latest is republished once a signing key is set,
    # or the server that requires signatures could never load it.
    if m.get("content_sha256") != content_sha256 or not signing.signed_with(m, key):
        return False
    # A latest changed on disk since its deploy can never load: the fix is a fresh copy.
    try:
        signing.check_integrity(store.read_artifact(branch, name, version), m, key)
    except IntegrityError:
        return False
    return True


def unchanged_version(store: Store, branch: str, name: str, content_sha256: str) -> int | None:
    """The latest version of (branch, name) when its content is `content_sha256`, else None."""
    latest = store.latest(branch, name)
    if latest is None or not holds(store, branch, name, latest, content_sha256):
        return None
    return latest


def publish_changed(store: Store, branch: str, name: str, artifact: bytes,
                    manifest: dict[str, Any]) -> tuple[int, bool]:
    """Publish unless the latest version holds this content: (version, whether new).
    The store checks and publishes in one step, so racing identical deploys publish once."""
    content = manifest["content_sha256"]
    return store.publish_changed(branch, name, artifact, manifest,
                                 lambda v: holds(store, branch, name, v, content))


def publish_all(
    store: Store,
    deployments: list[registry.Deployment],
    *,
    branch: str,
    roots: list[Path],
    dry_run: bool = False,
    on_result: Callable[[Result], None] | None = None,
    before_publish: Callable[[list[str]], None] | None = None,
    on_packed: Callable[[Package], None] | None = None,
) -> list[Result]:
    """Pack all, then publish each whose content differs from its latest version.

    `before_publish` gets the names that would get a new version, once everything
    is packed and before anything is written (dry runs included): it may raise
    to stop the deploy. `on_packed` gets each package as it is packed.
    """
    check_branch(branch)
    # Fail on an unwritable store before spending minutes packing large models.
    store.check_writable()
    packages: list[Package] = []
    for d in deployments:
        packages.append(pack(d, branch=branch, roots=roots))
        if on_packed is not None:
            on_packed(packages[-1])
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
            version, new = publish_changed(store, branch, p.name, p.artifact, p.manifest)
            status = "new" if new else "unchanged"
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
    **options: Any,
) -> int:
    """Publish one function (a script, a notebook cell, a lambda) and return its version.

    `options` are those of `@deployment` (python_packages, setup, vectorized,
    max_batch_rows, max_wait_ms); for a decorated function they override what
    the decorator declared. `store` and `branch` default to deploy.yaml /
    $FRAMEWORK_STORE / $FRAMEWORK_BRANCH.
    """
    cfg = cfgmod.load(config)
    if cfg.path is None and store is None and not os.environ.get("FRAMEWORK_STORE"):
        # A notebook's working directory is easy to mistake: say where the version goes.
        warnings.warn(
            f"no {cfgmod.CONFIG_NAME} in {os.getcwd()} and no $FRAMEWORK_STORE: publishing to "
            f"the default store {cfg.store}; pass store=... (or set $FRAMEWORK_STORE) to publish "
            "where your server reads", UserWarning, stacklevel=2)
    if isinstance(fn, registry.Deployment):
        options = {**fn.options.as_kwargs(), **options}
        name = name or fn.name
    dep = registry.make(fn, name=name, **options)
    target = open_store(store) if store else cfg.open_store()
    [result] = publish_all(target, [dep], branch=branch or cfg.branch, roots=roots_of(cfg))
    # A notebook user needs to know which store got it: the server must serve the same one.
    print(f"{result.name} v{result.version} on branch {result.branch!r} ({result.status}) in {target}",
          file=sys.stderr)
    return result.version  # type: ignore[return-value]
