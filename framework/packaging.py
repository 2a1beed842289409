"""Packing a deployment into an artifact, and loading it back.

Packing pickles the function *by value* with cloudpickle, together with the
project's own modules (anything imported from under the project root), so a
runtime needs none of the project's source. Installed third-party packages
are pickled by reference; their versions are recorded in the manifest.

Loading (`load`) is the one place where an artifact is unpickled: it checks
the sha256 (and the signature, when a key is set) and the Python version
*before* running any of the pickle's code.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import logging
import os
import sys
import threading
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import cloudpickle
from cloudpickle import cloudpickle as _cp

from framework import manifest as mf
from framework import signing
from framework.errors import IncompatibleArtifact, IntegrityError, PackagingError
from framework.registry import Deployment

log = logging.getLogger("framework.packaging")

PROTOCOL = 5


@dataclass
class Package:
    """A packed deployment, ready to publish."""

    name: str
    artifact: bytes
    manifest: dict[str, Any]


# -- which modules travel by value -------------------------------------------


def _site_dirs() -> list[str]:
    import site
    import sysconfig

    dirs = set(site.getsitepackages() + [site.getusersitepackages()])
    dirs.update(sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib", "platstdlib"))
    return [os.path.realpath(d) for d in dirs if d]


def project_files(roots: list[Path]) -> Callable[[str], bool]:
    """A test for "this file is the project's own": under `roots`, not an installed package."""
    prefixes = tuple(os.path.realpath(r) + os.sep for r in roots)
    site_prefixes = tuple(d + os.sep for d in _site_dirs())

    def own(path: str) -> bool:
        real = os.path.realpath(path)
        return real.startswith(prefixes) and not real.startswith(site_prefixes)

    return own


def project_packages(roots: list[Path]) -> list[str]:
    """Top-level modules imported from under `roots` that are not installed packages."""
    own = project_files(roots)
    found = set()
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None)
        if not path or name == "__main__" or not own(path):
            continue
        top = name.partition(".")[0]
        # The framework is installed wherever the runtime runs; never ship it.
        if top != "framework":
            found.add(top)
    return sorted(found)


@contextmanager
def _by_value(module_names: list[str]) -> Iterator[None]:
    registered = []
    try:
        for name in module_names:
            if name in sys.modules:
                try:
                    cloudpickle.register_pickle_by_value(sys.modules[name])
                    registered.append(name)
                except ValueError:
                    pass  # already registered by the user
        yield
    finally:
        for name in registered:
            cloudpickle.unregister_pickle_by_value(sys.modules[name])


# -- fingerprint: "is this the same content as the latest version?" ----------

_fingerprint_lock = threading.Lock()


class _FingerprintPickler(cloudpickle.Pickler):
    """cloudpickle with set order fixed, so equal content gives equal bytes.

    cloudpickle's output is not reproducible across processes: sets follow the
    per-process string hash seed, and classes defined by value get a random
    tracker id. The artifact keeps cloudpickle's behaviour; this pickler is
    only used to compute `content_sha256`.
    """

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) in (set, frozenset):
            return type(obj), (sorted(obj, key=repr),)
        return super().reducer_override(obj)


def _fingerprint(payload: Any, options: dict[str, Any]) -> str:
    buf = io.BytesIO()
    with _fingerprint_lock:
        original = _cp._get_or_create_tracker_id
        _cp._get_or_create_tracker_id = lambda cls: f"{cls.__module__}.{cls.__qualname__}"
        try:
            _FingerprintPickler(buf, protocol=PROTOCOL).dump(payload)
        finally:
            _cp._get_or_create_tracker_id = original
    buf.write(mf.dumps(options))
    return hashlib.sha256(buf.getvalue()).hexdigest()


# -- requirements and error reporting ----------------------------------------


def _referenced_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _referenced_names(const)
    return names


def _captured(fn: Callable[..., Any]) -> dict[str, Any]:
    """The globals and closure values a function refers to, by name."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return {}
    out = {}
    g = getattr(fn, "__globals__", {})
    for name in sorted(_referenced_names(code)):
        if name in g:
            out[name] = g[name]
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            out[name] = cell.cell_contents
        except ValueError:
            pass
    return out


def detected_requirements(fn: Callable[..., Any], by_value: list[str]) -> dict[str, str]:
    """Installed distributions whose modules the function (or its project modules) uses."""
    import importlib.metadata  # here, not at the top: 25 ms of every server start

    dists = importlib.metadata.packages_distributions()
    tops: set[str] = set()
    values = list(_captured(fn).values())
    for name in by_value:
        values.extend(vars(sys.modules[name]).values())
    for value in values:
        mod = value.__name__ if isinstance(value, types.ModuleType) else (
            getattr(value, "__module__", None) or type(value).__module__
        )
        if isinstance(mod, str):
            tops.add(mod.partition(".")[0])
    found = {}
    for top in tops - set(sys.stdlib_module_names) - set(by_value) - {"builtins", "__main__"}:
        for dist in dists.get(top, ()):
            try:
                found[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
    return dict(sorted(found.items()))


def _unpicklable(fn: Callable[..., Any]) -> list[str]:
    bad = []
    for name, value in _captured(fn).items():
        try:
            cloudpickle.dumps(value, protocol=PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - any failure names the culprit
            bad.append(f"{name!r} (a {type(value).__module__}.{type(value).__qualname__}: {exc})")
    return bad


# -- pack --------------------------------------------------------------------


def signature_of(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return {"text": None, "parameters": []}
    params = [
        {
            "name": p.name,
            "kind": p.kind.name,
            "default": None if p.default is p.empty else repr(p.default),
            "annotation": None if p.annotation is p.empty else (
                p.annotation if isinstance(p.annotation, str) else getattr(
                    p.annotation, "__name__", repr(p.annotation))
            ),
        }
        for p in sig.parameters.values()
    ]
    return {"text": f"{fn.__name__}{sig}", "parameters": params}


def source_of(fn: Callable[..., Any]) -> str | None:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return None


def pack(dep: Deployment, *, branch: str, roots: list[Path]) -> Package:
    """Pickle `dep` by value and describe it; raises PackagingError naming the cause."""
    payload = {"fn": dep.fn, "setup": dep.options.setup}
    options = dep.options.describe()
    by_value = project_packages(roots)
    with _by_value(by_value):
        try:
            artifact = cloudpickle.dumps(payload, protocol=PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - reported with the culprit named
            culprits = _unpicklable(dep.fn)
            if dep.options.setup is not None:
                culprits += _unpicklable(dep.options.setup)
            what = ", ".join(culprits) if culprits else f"{type(exc).__name__}: {exc}"
            raise PackagingError(
                f"cannot package deployment {dep.name!r}: it refers to global(s) that cannot be "
                f"pickled: {what}. Create such objects (locks, sockets, clients, open files) "
                f"inside the function, or in a setup= function, instead of at module level."
            ) from exc
        content = _fingerprint(payload, options)
    m = mf.build(
        name=dep.name,
        branch=branch,
        artifact=artifact,
        content_sha256=content,
        signature=signature_of(dep.fn),
        source=source_of(dep.fn),
        options=options,
        requirements={
            "declared": list(dep.options.python_packages),
            "detected": detected_requirements(dep.fn, by_value),
        },
        by_value_modules=by_value,
        root=roots[0],
    )
    # Not signed here: the store signs at publish, once the version number is claimed.
    return Package(dep.name, artifact, m)


# -- load --------------------------------------------------------------------


@dataclass
class Loaded:
    """An unpickled version: the function and its manifest."""

    fn: Callable[..., Any]
    manifest: dict[str, Any]


def _where(manifest: dict[str, Any]) -> str:
    return f"{manifest.get('name')} v{manifest.get('version')} on branch {manifest.get('branch')!r}"


def check_integrity(artifact: bytes, manifest: dict[str, Any], key: bytes | None) -> None:
    """Refuse an artifact that does not match its manifest, or its signature when `key` is set."""
    if key is not None:
        signing.verify(artifact, manifest, key)
    digest = hashlib.sha256(artifact).hexdigest()
    if digest != manifest.get("sha256"):
        raise IntegrityError(
            f"artifact of {_where(manifest)} does not match its manifest (sha256 {digest[:12]} != "
            f"{str(manifest.get('sha256'))[:12]}): the store was changed after deploy; redeploy it"
        )


def check(artifact: bytes, manifest: dict[str, Any]) -> None:
    """Refuse an artifact that does not match its manifest (or signature) or this Python."""
    check_integrity(artifact, manifest, signing.current_key())
    where = _where(manifest)
    built = str(manifest.get("python", ""))
    here = ".".join(map(str, sys.version_info[:3]))
    if built.split(".")[:2] != here.split(".")[:2]:
        raise IncompatibleArtifact(
            f"{where} was built with Python {built} and cannot be loaded by Python {here}: "
            f"run the server on Python {'.'.join(built.split('.')[:2])}, or redeploy from Python "
            f"{'.'.join(here.split('.')[:2])}"
        )
    if built != here:
        log.warning("%s was built with Python %s, running on %s", where, built, here)
    for dist, version in (manifest.get("requirements") or {}).get("detected", {}).items():
        import importlib.metadata  # only for versions that record requirements

        try:
            have = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            log.warning("%s needs %s==%s, which is not installed", where, dist, version)
            continue
        if have != version:
            log.warning("%s was built with %s %s, running with %s", where, dist, version, have)


def load(artifact: bytes, manifest: dict[str, Any]) -> Loaded:
    """Verify, then unpickle, then run the deployment's setup once."""
    check(artifact, manifest)
    payload = cloudpickle.loads(artifact)
    if payload.get("setup") is not None:
        payload["setup"]()
    return Loaded(payload["fn"], manifest)
