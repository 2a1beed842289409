"""A worker process: one loaded version, called over a pipe (`isolation="process"`).

Started as `python -m framework.execute.worker` by `framework.execute.isolation`, from the
server's interpreter (or, later, from a deployment's own environment: the
child needs only this module's imports, cloudpickle and the artifact's
packages). The protocol is pickled messages framed by
`multiprocessing.connection` on the child's stdin and stdout:

1. parent -> child `("load", artifact, manifest)`; the child verifies and
   unpickles it (`loading.load`: sha256, signature, Python version) and
   answers `("ready", signature, is_async)`, or `("error", kind, message)`
   where kind is "integrity", "incompatible" or "load".
2. parent -> child `("call", [(kind, arg, deadline), ...])`; the child runs
   them in order and answers each as soon as it is done with
   `("done", ok, value)`, or `("expired",)` for a call whose deadline
   (`time.monotonic()`, one clock for the whole machine) passed before it
   started. `kind` is a method of `framework.execute.calls.Calls`: `body` (a request's
   raw body, which the child parses, runs and encodes), `answer` (a parsed
   request) or `vector` (a micro-batch's rows, turned into columns here).
   A vectorized version's child may gather raw bodies into one call
   (`framework.execute.gathering`); it first sends `("group", n)`, n being
   how many of the calls it has not answered yet that call holds.
3. The parent closing the child's stdin ends it.

So the parent always knows which call is running: the first one of the
message it sent without an answer, with those a `group` names. A call past
its deadline is stopped by killing the child, a crash fails only the
requests the running call held, and the calls behind them, which never
started, are sent to the next worker.
"""

from __future__ import annotations

import gc
import inspect
import os
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

# The youngest objects are collected every this many new ones, as `framework serve` tunes
# its own collector (framework/serve/server.py): a call sees the same collector in both modes,
# and the default (700) ran several collections per 1,000-row request.
GC_YOUNGEST = 10_000


def shape(fn: Any) -> bytes | None:
    """The function's signature without annotations, pickled: what the server needs to
    bind rows to parameters without unpickling the function."""
    try:
        sig = inspect.signature(fn)
        sig = sig.replace(parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
                          return_annotation=sig.empty)
        return cloudpickle.dumps(sig)
    except Exception:  # noqa: BLE001 - no signature (a builtin), or defaults that do not pickle
        return None


def _load(conn_out: Connection, artifact: bytes, manifest: dict[str, Any]) -> Any:
    from framework.execute import loading
    from framework.execute.calls import Calls
    from framework.errors import IncompatibleArtifact, IntegrityError

    try:
        loaded = loading.load(artifact, manifest)
    except IntegrityError as exc:
        conn_out.send(("error", "integrity", str(exc)))
        return None
    except IncompatibleArtifact as exc:
        conn_out.send(("error", "incompatible", str(exc)))
        return None
    except BaseException as exc:  # noqa: BLE001 - unpickling or setup ran user code
        from framework.protocol import error_text

        conn_out.send(("error", "load", error_text(exc)))
        return None
    label = f"{manifest['name']} v{manifest['version']} ({manifest['branch']})"
    if inspect.iscoroutinefunction(loaded.fn):  # awaited here, on a loop of the worker's own
        from framework.execute.async_calls import AsyncCalls

        calls = AsyncCalls(loaded.fn, label)
    else:
        calls = Calls(loaded.fn, label)
    conn_out.send(("ready", shape(loaded.fn), False))
    gc.freeze()  # the modules and the loaded version are never garbage: not walked again
    gc.set_threshold(GC_YOUNGEST, *gc.get_threshold()[1:])
    return calls


def main() -> int:
    # The protocol keeps the pipes; what the deployment prints goes to stderr (the server's log).
    conn_in = Connection(os.dup(0), writable=False)
    conn_out = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdout = sys.stderr
    calls = None
    gatherer = None
    while True:
        try:
            message = conn_in.recv()
        except (EOFError, OSError):
            return 0
        if message[0] == "load":
            calls = _load(conn_out, message[1], message[2])
            if calls is None:
                return 1
            from framework.execute.gathering import Gatherer, gathers_raw

            options = message[2].get("options") or {}
            if gathers_raw(options):
                gatherer = Gatherer(calls, options["max_batch_rows"])
            continue
        assert calls is not None, "a call before the load"
        if gatherer is not None:
            gatherer.run(message[1], conn_out.send, lambda *item: _one(calls, *item))
            continue
        for item in message[1]:
            conn_out.send(_one(calls, *item))


def _one(calls: Any, kind: str, arg: Any, deadline: float) -> tuple[Any, ...]:
    """The answer to one call of a message."""
    if time.monotonic() >= deadline:
        return ("expired",)
    try:
        return ("done", True, getattr(calls, kind)(arg))
    except BaseException as exc:  # noqa: BLE001 - Calls catches user errors; this is ours
        return ("done", False, f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
