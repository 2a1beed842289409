"""The `@deployment` decorator: a thin layer over an explicit `register`.

Like Flask's and huey's registries, declaring two deployments under one name
fails loudly at import time, with the fix in the message. Re-running the same
definition (a notebook cell, a reloaded module) replaces the old entry.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from framework.errors import RegistryError

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,99}$")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistryError(
            f"invalid deployment name {name!r}: use letters, digits, '_' or '-', "
            "starting with a letter or '_' (at most 100 characters)"
        )
    return name


@dataclass(frozen=True)
class Options:
    """What a deployment declares besides its function."""

    python_packages: tuple[str, ...] = ()
    setup: Callable[[], Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The JSON-able form recorded in the manifest."""
        return {
            "python_packages": list(self.python_packages),
            "setup": getattr(self.setup, "__qualname__", None),
            **self.extra,
        }


class Deployment:
    """A registered function. Calling it calls the function unchanged."""

    def __init__(self, fn: Callable[..., Any], name: str, options: Options) -> None:
        self.fn = fn
        self.name = name
        self.options = options
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Deployment {self.name!r} {self.fn.__module__}.{self.fn.__qualname__}>"

    def deploy(self, **kwargs: Any) -> int:
        """Publish this deployment; see `framework.deploy`."""
        from framework.publish import deploy

        return deploy(self, **kwargs)


_registry: dict[str, Deployment] = {}


def _origin(fn: Callable[..., Any]) -> str:
    code = getattr(fn, "__code__", None)
    where = f" ({code.co_filename}:{code.co_firstlineno})" if code else ""
    return f"{fn.__module__}.{fn.__qualname__}{where}"


def _make_options(python_packages: Any, setup: Any) -> Options:
    if isinstance(python_packages, str) or not all(
        isinstance(p, str) and p.strip() for p in (python_packages or ())
    ):
        raise RegistryError(
            f"python_packages must be a list of requirement strings such as "
            f"['scikit-learn==1.5.2'], got {python_packages!r}"
        )
    if setup is not None and not callable(setup):
        raise RegistryError(f"setup must be a function taking no arguments, got {setup!r}")
    return Options(python_packages=tuple(python_packages or ()), setup=setup)


def make(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    python_packages: list[str] | tuple[str, ...] | None = None,
    setup: Callable[[], Any] | None = None,
) -> Deployment:
    """Wrap `fn` as a `Deployment` without registering it."""
    if isinstance(fn, Deployment):
        fn = fn.fn
    if not callable(fn) or inspect.isclass(fn):
        raise RegistryError(f"a deployment needs a function, got {fn!r}")
    if name is None and fn.__name__ == "<lambda>":
        raise RegistryError("a lambda has no name: give one, e.g. deploy(fn, name='scorer')")
    name = check_name(name if name is not None else fn.__name__)
    return Deployment(fn, name, _make_options(python_packages, setup))


def register(fn: Callable[..., Any], **options: Any) -> Deployment:
    """Register `fn` as a deployment and return the wrapping `Deployment`."""
    dep = make(fn, **options)
    old = _registry.get(dep.name)
    if old is not None and (old.fn.__module__, old.fn.__qualname__) != (
        dep.fn.__module__,
        dep.fn.__qualname__,
    ):
        raise RegistryError(
            f"two deployments are named {dep.name!r}: {_origin(old.fn)} and {_origin(dep.fn)}; "
            f"rename one with @deployment(name='...')"
        )
    _registry[dep.name] = dep
    return dep


def deployment(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Decorator: `@deployment` or `@deployment(name=..., python_packages=[...], setup=...)`."""
    allowed = {"name", "python_packages", "setup"}
    unknown = set(options) - allowed
    if unknown:
        raise RegistryError(
            f"unknown @deployment option(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    if fn is not None:
        return register(fn, **options)
    # Validate now, so a bad option fails at decoration time, not at deploy.
    if "name" in options:
        check_name(options["name"])
    _make_options(options.get("python_packages"), options.get("setup"))
    return lambda f: register(f, **options)


def registered() -> dict[str, Deployment]:
    """A copy of the registry, by name."""
    return dict(_registry)


def clear() -> None:
    """Forget every registration (for a fresh `framework deploy` run in tests)."""
    _registry.clear()
