"""What of a deployment is the project's own (packed by value) and what it requires.

A module imported from under the project's root, and not an installed package,
travels inside the artifact; installed distributions the function refers to are
recorded in the manifest (`requirements.detected`) with their versions.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any, Callable


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


def _referenced_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _referenced_names(const)
    return names


def captured(fn: Callable[..., Any]) -> dict[str, Any]:
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
    import importlib.metadata  # here, not at the top: it slows every server start

    dists = importlib.metadata.packages_distributions()
    tops: set[str] = set()
    values = list(captured(fn).values())
    for name in by_value:
        values.extend(vars(sys.modules[name]).values())
    for value in values:
        mod = value.__name__ if isinstance(value, types.ModuleType) else (
            getattr(value, "__module__", None) or type(value).__module__
        )
        if isinstance(mod, str):
            tops.add(mod.partition(".")[0])
    found = {}
    for top in tops - set(sys.stdlib_module_names) - set(by_value) - {"builtins", "__main__", "framework"}:
        for dist in dists.get(top, ()):
            try:
                found[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
    return dict(sorted(found.items()))
