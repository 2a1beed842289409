"""The `@deployment` decorator: a thin layer over an explicit `register`.

Like Flask's and huey's registries, declaring two deployments under one name
fails loudly at import time, with the fix in the message. Re-running the same
definition (a notebook cell, a reloaded module) replaces the old entry.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from framework.errors import RegistryError
from framework.store.names import check_name

@dataclass(frozen=True)
class Options:
    """What a deployment declares besides its function."""

    python_packages: tuple[str, ...] = ()
    setup: Callable[[], Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `make` that declare these options again."""
        return {"python_packages": self.python_packages, "setup": self.setup, **self.extra}

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


_registry: dict[str, Deployment] = {}


def _origin(fn: Callable[..., Any]) -> str:
    code = getattr(fn, "__code__", None)
    where = f" ({code.co_filename}:{code.co_firstlineno})" if code else ""
    return f"{fn.__module__}.{fn.__qualname__}{where}"


# Batching options of `vectorized=True` deployments, with their defaults: a call
# gets at most MAX_BATCH_ROWS rows, and waits at most MAX_WAIT_MS for more rows.
BATCH_DEFAULTS: dict[str, Any] = {"max_batch_rows": 1024, "max_wait_ms": 0.0}
# Every option of @deployment and deploy(), for the message naming a mistyped one.
OPTIONS = {"name", "python_packages", "setup", "vectorized", "inline", "concurrency", "isolation",
           *BATCH_DEFAULTS}


def _batching(vectorized: Any, batching: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(vectorized, bool):
        raise RegistryError(f"vectorized must be True or False, got {vectorized!r}")
    unknown = set(batching) - set(BATCH_DEFAULTS)
    if unknown:
        raise RegistryError(f"unknown option(s) {sorted(unknown)}; allowed: {sorted(OPTIONS)}")
    if not vectorized:
        if batching:
            raise RegistryError(
                f"{sorted(batching)} only apply to vectorized deployments; add vectorized=True"
            )
        return {}
    out = {"vectorized": True, **BATCH_DEFAULTS}
    rows = batching.get("max_batch_rows", out["max_batch_rows"])
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise RegistryError(f"max_batch_rows must be a whole number of rows >= 1, got {rows!r}")
    wait = batching.get("max_wait_ms", out["max_wait_ms"])
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 10_000:
        raise RegistryError(f"max_wait_ms must be a number of milliseconds in [0, 10000], got {wait!r}")
    return {**out, "max_batch_rows": rows, "max_wait_ms": float(wait)}


def _check_vectorizable(fn: Callable[..., Any]) -> None:
    """A vectorized function gets one list per parameter, so each needs a name and a place."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return
    odd = [p.name for p in params if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if odd or not params:
        raise RegistryError(
            f"vectorized deployment {fn.__qualname__} must take plain parameters, each receiving "
            f"a list with one value per row (not *args, **kwargs or keyword-only: {odd})"
        )


ISOLATIONS = ("thread", "process")


def _execution(inline: Any, concurrency: Any, isolation: Any) -> dict[str, Any]:
    """Where calls run (see docs/execution.md), checked; only what was declared is recorded."""
    if inline is not None and not isinstance(inline, bool):
        raise RegistryError(f"inline must be True or False, got {inline!r}")
    if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1):
        raise RegistryError(
            f"concurrency must be a whole number >= 1 (the threads or processes that may call "
            f"one loaded version at once), got {concurrency!r}")
    if isolation is not None and isolation not in ISOLATIONS:
        raise RegistryError(f"isolation must be one of {list(ISOLATIONS)}, got {isolation!r}")
    if inline and (concurrency not in (None, 1) or isolation == "process"):
        raise RegistryError(
            "inline=True runs every call on the server's event loop, one at a time: it cannot "
            "be combined with concurrency > 1 or isolation='process'; drop one of them")
    declared = {"inline": inline, "concurrency": concurrency, "isolation": isolation}
    return {k: v for k, v in declared.items() if v is not None}


def _make_options(python_packages: Any, setup: Any, vectorized: Any = False,
                  inline: Any = None, concurrency: Any = None, isolation: Any = None,
                  **batching: Any) -> Options:
    if isinstance(python_packages, str) or not all(
        isinstance(p, str) and p.strip() for p in (python_packages or ())
    ):
        raise RegistryError(
            f"python_packages must be a list of requirement strings such as "
            f"['scikit-learn==1.5.2'], got {python_packages!r}"
        )
    if setup is not None and not callable(setup):
        raise RegistryError(f"setup must be a function taking no arguments, got {setup!r}")
    extra = {**_batching(vectorized, batching), **_execution(inline, concurrency, isolation)}
    return Options(python_packages=tuple(python_packages or ()), setup=setup, extra=extra)


def make(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    python_packages: list[str] | tuple[str, ...] | None = None,
    setup: Callable[[], Any] | None = None,
    vectorized: bool = False,
    **batching: Any,
) -> Deployment:
    """Wrap `fn` as a `Deployment` without registering it."""
    if isinstance(fn, Deployment):
        fn = fn.fn
    if not callable(fn) or inspect.isclass(fn):
        raise RegistryError(f"a deployment needs a function, got {fn!r}")
    if name is None and fn.__name__ == "<lambda>":
        raise RegistryError("a lambda has no name: give one, e.g. deploy(fn, name='scorer')")
    name = check_name(name if name is not None else fn.__name__)
    options = _make_options(python_packages, setup, vectorized, **batching)
    if vectorized:
        _check_vectorizable(fn)
    return Deployment(fn, name, options)


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
    """Decorator: `@deployment` or `@deployment(name=..., python_packages=[...], setup=...)`.

    `vectorized=True` makes the function receive all rows of a call at once (one
    list per parameter) and return a list of results, one per row; concurrent
    requests are then gathered into calls of at most `max_batch_rows` rows, waiting
    at most `max_wait_ms` for more rows when a call is not full.

    Where calls run (docs/execution.md): on the version's own threads, at most
    `concurrency` at once (default 1, so a model that is not thread-safe is
    safe); in warm worker processes with `isolation="process"`; on the event
    loop itself with `inline=True`, the author's promise that the function is
    pure, sub-millisecond and never blocks.
    """
    allowed = OPTIONS
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
    rest = {k: v for k, v in options.items() if k != "name"}
    _make_options(rest.pop("python_packages", None), rest.pop("setup", None), **rest)
    return lambda f: register(f, **options)


def registered() -> dict[str, Deployment]:
    """A copy of the registry, by name."""
    return dict(_registry)


def clear() -> None:
    """Forget every registration (for a fresh `framework deploy` run in tests)."""
    _registry.clear()
