"""Packing a deployment into an artifact (`framework.execute.loading` loads it back).

Packing pickles the function *by value* with cloudpickle, together with the
project's own modules (anything imported from under the project root), so a
runtime needs none of the project's source. Installed third-party packages
are pickled by reference; their versions are recorded in the manifest.

An artifact carries no path of the machine that built it: the project's
code objects are pickled with project-relative file names, and the module
attributes cloudpickle records (`__file__`, `__path__`) made relative too, so
the same commit packed from two checkouts is the same content (`unchanged`).
The text of those files goes into the manifest (`sources`), and loading seeds
`linecache` with it: tracebacks name `deployments/x.py` and show its lines.
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

from framework.store import manifest as mf
from framework.errors import PackagingError
from framework.build.project import captured, detected_requirements, project_packages
from framework.build.registry import Deployment

log = logging.getLogger("framework.build.packing")

PROTOCOL = 5
# The project files whose text a manifest carries for tracebacks, at most this much in all.
MAX_SOURCES_BYTES = 2 * 1024 * 1024


@dataclass
class Package:
    """A packed deployment, ready to publish."""

    name: str
    artifact: bytes
    manifest: dict[str, Any]


# -- which modules travel by value -------------------------------------------


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


# -- no machine paths in the pickle -------------------------------------------


class _RelativePickler(cloudpickle.Pickler):
    """cloudpickle, with the project's file names made relative to its root.

    cloudpickle writes every code object's file as "<dynamic-code>" and keeps each
    function module's absolute `__file__`; this writes the project-relative name in
    both places instead, and notes the files, whose text the manifest carries.
    """

    def __init__(self, file: Any, roots: list[Path], **kw: Any) -> None:
        super().__init__(file, **kw)
        self.roots = [os.path.realpath(r) + os.sep for r in roots]
        self.files: dict[str, str] = {}  # relative name -> absolute path

    def relative(self, path: Any) -> Any:
        if not isinstance(path, str) or not os.path.isabs(path):
            return path
        real = os.path.realpath(path)
        for root in self.roots:
            if real.startswith(root):
                rel = Path(os.path.relpath(real, root)).as_posix()
                self.files[rel] = real
                return rel
        return path

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.CodeType):
            rel = self.relative(obj.co_filename)
            if rel is not obj.co_filename:
                make, args = _cp._code_reduce(obj)
                # The one argument that is the file name: "<dynamic-code>" since cloudpickle 3.1.
                for written in ("<dynamic-code>", obj.co_filename):
                    if written in args:
                        at = args.index(written)
                        return make, args[:at] + (rel,) + args[at + 1:]
                return make, args
        if isinstance(obj, types.ModuleType) and not _cp._should_pickle_by_reference(obj):
            make, (name, state) = _cp._module_reduce(obj)
            state = {**state, "__file__": self.relative(state.get("__file__")),
                     "__cached__": None, "__spec__": None, "__loader__": None}
            if isinstance(state.get("__path__"), list):
                state["__path__"] = [self.relative(p) for p in state["__path__"]]
            return make, (name, state)
        return super().reducer_override(obj)

    def _function_getnewargs(self, func: Any) -> Any:
        code, base_globals, *rest = super()._function_getnewargs(func)
        # One dict per module, shared by its functions: fixing it again is a no-op.
        if "__file__" in base_globals:
            base_globals["__file__"] = self.relative(base_globals["__file__"])
        if isinstance(base_globals.get("__path__"), list):
            base_globals["__path__"] = [self.relative(p) for p in base_globals["__path__"]]
        return (code, base_globals, *rest)


def _dumps(payload: Any, roots: list[Path]) -> tuple[bytes, dict[str, str]]:
    """The artifact's bytes, and the project files its code came from (relative -> absolute)."""
    buf = io.BytesIO()
    pickler = _RelativePickler(buf, roots, protocol=PROTOCOL)
    pickler.dump(payload)
    return buf.getvalue(), pickler.files


def _sources(files: dict[str, str]) -> dict[str, str]:
    out, total = {}, 0
    for rel, path in sorted(files.items()):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        total += len(text)
        if total > MAX_SOURCES_BYTES:
            log.warning("the manifest carries the source of the first %d file(s) only", len(out))
            break
        out[rel] = text
    return out


# -- fingerprint: "is this the same content as the latest version?" ----------

_fingerprint_lock = threading.Lock()


class _FingerprintPickler(_RelativePickler):
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


def _fingerprint(payload: Any, options: dict[str, Any], roots: list[Path]) -> str:
    buf = io.BytesIO()
    with _fingerprint_lock:
        original = _cp._get_or_create_tracker_id
        _cp._get_or_create_tracker_id = lambda cls: f"{cls.__module__}.{cls.__qualname__}"
        try:
            _FingerprintPickler(buf, roots, protocol=PROTOCOL).dump(payload)
        finally:
            _cp._get_or_create_tracker_id = original
    buf.write(mf.dumps(options))
    return hashlib.sha256(buf.getvalue()).hexdigest()


# -- error reporting ------------------------------------------------------------


def _unpicklable(fn: Callable[..., Any]) -> list[str]:
    bad = []
    for name, value in captured(fn).items():
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
            artifact, files = _dumps(payload, roots)
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
        content = _fingerprint(payload, options, roots)
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
    m["sources"] = _sources(files)
    # Not signed here: the store signs at publish, once the version number is claimed.
    return Package(dep.name, artifact, m)
