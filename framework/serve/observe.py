"""Observability: what each request did, for the metrics and the access log;
liveness and readiness.

One pure ASGI middleware times each request and reads what the handlers left
in the ASGI scope: `Runtime.infer` puts the resolved version's runner and the
parsed call under SCOPE_CALL, the error handlers put the exception under
SCOPE_ERROR. An `Observer` hands that, in bulk, to `framework.serve.metrics` and
`framework.serve.accesslog`.

`/metrics`, `/livez`, `/readyz` and `/healthz` are neither counted nor logged:
they are scraped and probed every few seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Awaitable

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from framework.serve.accesslog import AccessLog, Payloads
from framework.errors import DeploymentFailed, RowsFailed, StoreError
from framework.serve.metrics import UNRESOLVED, Metrics
from framework.serve.scope import SCOPE_CALL, SCOPE_DISCONNECTED, SCOPE_ERROR, SCOPE_KEY, Seen

if TYPE_CHECKING:
    from framework.serve.runtime import Runtime

CLIENT_CLOSED = 499  # the status noted for those (nginx's): no answer was sent, nothing failed
OPS_PATHS = frozenset({"/metrics", "/livez", "/readyz", "/healthz"})
FLUSH_INTERVAL_S = 0.05  # the most often access-log lines are written out
CHUNK = 128  # requests counted and logged together


def _row_errors(call: Any, error: BaseException | None) -> int:
    if isinstance(error, RowsFailed):
        return len(error.errors)
    if isinstance(error, DeploymentFailed):
        return 1
    return call.failed


class Observer:
    """What the middleware saw, turned into metrics and log lines in bulk.

    A request only leaves a tuple behind; every `CHUNK` of them are counted
    and their log lines encoded together: done per request it slows every
    request, done for a long spell at once it holds up those behind it. Lines
    are written out at most every `FLUSH_INTERVAL_S` under load, at the end of
    its turn after a quiet spell, and at shutdown. A scrape of `/metrics`
    counts the rest first (docs/design.md has the measurements).
    """

    def __init__(self, metrics: Metrics | None, log: AccessLog | None, log_payloads: bool) -> None:
        self.metrics = metrics
        self.log = log
        self.log_payloads = log_payloads and log is not None
        self.seen: list[Seen] = []
        self._due = False  # a flush is scheduled
        self._flushed = -math.inf  # loop time of the last flush

    def note(self, seen: Seen) -> None:
        self.seen.append(seen)
        if len(self.seen) >= CHUNK:
            self.count()
        if not self._due:
            self._due = True
            loop = asyncio.get_running_loop()
            delay = self._flushed + FLUSH_INTERVAL_S - loop.time()
            if delay > 0:
                loop.call_later(delay, self.flush)
            else:
                loop.call_soon(self.flush)

    def count(self) -> None:
        """Counts the requests noted since the last count, and encodes their log lines."""
        seen, self.seen = self.seen, []
        if seen and self.metrics is not None:
            self.metrics.add(seen)
        if seen and self.log is not None:
            self.log.encode(seen)

    def flush(self) -> None:
        self._due = False
        try:
            self._flushed = asyncio.get_running_loop().time()
        except RuntimeError:  # at shutdown, after the loop
            pass
        self.count()
        if self.log is not None:
            self.log.write()


class ObserveMiddleware:
    """Times every request and notes what it did; pure ASGI to stay cheap on the hot path."""

    def __init__(self, app: ASGIApp, observer: Observer) -> None:
        self.app = app
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPS_PATHS:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        # A plain function that hands on send's awaitable: a coroutine of its own per
        # message was a tenth of what this middleware costs.
        def sending(message: Message) -> Awaitable[None]:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        payloads = Payloads(receive, sending) if self.observer.log_payloads else None
        try:
            if payloads is None:
                await self.app(scope, receive, sending)
            else:
                await self.app(scope, payloads.receive, payloads.send)
        except Exception as exc:
            scope.setdefault(SCOPE_ERROR, exc)
            raise
        finally:
            end = time.perf_counter()
            if SCOPE_DISCONNECTED in scope:
                status = CLIENT_CLOSED
            resolved, error = scope.get(SCOPE_CALL), scope.get(SCOPE_ERROR)
            if resolved is None:
                labels, version, rows, errors, batch = UNRESOLVED, None, 0, 0, False
            else:  # no call or runner is kept: they hold the request's rows, the version's model
                runner, call = resolved
                labels, version, batch = runner.labels, runner.version, call.batch
                rows = len(call.ids) if batch else 1
                errors = call.failed if error is None else _row_errors(call, error)
            self.observer.note((labels, version, status, start, end, rows, errors, batch,
                                None if error is None else type(error).__name__,
                                scope.get(SCOPE_KEY), scope["method"], scope["path"], payloads))


def routes(rt: Runtime, metrics: Metrics | None, observer: Observer | None) -> list[Route]:
    """`/livez`, `/readyz`, and `/metrics` when metrics are on."""

    async def scrape(request: Request) -> Response:
        assert metrics is not None
        if observer is not None:
            observer.count()  # the requests not counted yet
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def livez(request: Request) -> Response:
        # Answering at all is the proof: the event loop is not stuck.
        return Response(b'{"status":"alive"}', media_type="application/json")

    async def readyz(request: Request) -> Response:
        try:
            await asyncio.wait_for(asyncio.to_thread(rt.store.branches), 5)
        except (StoreError, OSError, asyncio.TimeoutError) as exc:
            # The detail names server paths: it goes to the log, not to whoever probes.
            logging.getLogger("framework.runtime").error("/readyz: the store cannot be read: %s", exc)
            detail = orjson.dumps({"error": f"the store cannot be read ({type(exc).__name__}); "
                                            "see the server log, check FRAMEWORK_STORE and its "
                                            "permissions"})
            return Response(detail, 503, media_type="application/json")
        if rt.not_ready is not None:
            return Response(orjson.dumps({"error": f"not ready: {rt.not_ready}"}), 503,
                            media_type="application/json", headers={"Retry-After": "5"})
        body = {"status": "ready", "loaded": len(rt.versions.loaded())}
        return Response(orjson.dumps(body), media_type="application/json")

    out = [Route("/livez", livez, methods=["GET"]), Route("/readyz", readyz, methods=["GET"])]
    if metrics is not None:
        out.append(Route("/metrics", scrape, methods=["GET"]))
    return out
