"""Observability: Prometheus metrics, one JSON log line per request, liveness and readiness.

One pure ASGI middleware times each request and reads what the handlers left
in the ASGI scope: `Runtime.infer` puts the resolved (branch, name, version,
call) under SCOPE_CALL, the error handlers put the exception under
SCOPE_ERROR. Metric labels come only from *resolved* versions, never from
the raw URL, so random paths cannot blow up the number of series.

`/metrics`, `/livez`, `/readyz` and `/healthz` are neither counted nor logged:
they are scraped and probed every few seconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, Iterator

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from framework.errors import DeploymentFailed, RowsFailed, StoreError

if TYPE_CHECKING:
    from framework.app import Runtime
    from framework.cache import VersionCache

SCOPE_CALL = "framework.call"
SCOPE_ERROR = "framework.error"
SCOPE_KEY = "framework.key"  # the caller's auth.Key, where API keys are on
OPS_PATHS = frozenset({"/metrics", "/livez", "/readyz", "/healthz"})
LABELS = ("deployment", "branch", "version")
UNRESOLVED = ("", "", "")
PAYLOAD_LOG_LIMIT = 64 * 1024

access_log = logging.getLogger("framework.access")


class _LoadedVersions:
    """`framework_loaded_versions`: one series per version held in memory, read at scrape time."""

    def __init__(self, versions: VersionCache) -> None:
        self.versions = versions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "framework_loaded_versions", "Versions loaded in memory (1 per version)", labels=LABELS)
        for v in self.versions.loaded():
            family.add_metric([v["name"], v["branch"], str(v["version"])], 1)
        yield family


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (not the global one)."""

    def __init__(self, rt: Runtime) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("framework_requests", "Requests answered, by status",
                                LABELS + ("status",), registry=r)
        self.rows = Counter("framework_rows", "Rows run (1 per single call)", LABELS, registry=r)
        self.row_errors = Counter("framework_row_errors", "Rows whose function raised or whose "
                                  "result could not be encoded", LABELS, registry=r)
        self.latency = Histogram("framework_request_duration_seconds", "Time to answer a request",
                                 LABELS, registry=r, buckets=(
                                     .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30,
                                     60, 300))
        self.batch = Histogram("framework_batch_rows", "Rows per batch request", LABELS, registry=r,
                               buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000))
        inflight = Gauge("framework_requests_in_flight", "Inference requests being answered",
                         registry=r)
        inflight.set_function(lambda: rt.inflight)
        r.register(_LoadedVersions(rt.versions))
        self._children: dict[tuple[str, ...], tuple[Any, ...]] = {}

    def record(self, labels: tuple[str, str, str], status: int, seconds: float, rows: int,
               errors: int, batch: bool) -> None:
        # `.labels()` takes a lock and builds a key on every call; its results never change.
        key = labels + (str(status),)
        kids = self._children.get(key)
        if kids is None:
            kids = self._children[key] = (
                self.requests.labels(*key), self.rows.labels(*labels),
                self.row_errors.labels(*labels), self.latency.labels(*labels),
                self.batch.labels(*labels))
        requests, rows_c, errors_c, latency, batch_h = kids
        requests.inc()
        latency.observe(seconds)
        if rows:
            rows_c.inc(rows)
        if errors:
            errors_c.inc(errors)
        if batch:
            batch_h.observe(rows)

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def _row_errors(call: Any, error: BaseException | None, body: bytes) -> int:
    if isinstance(error, RowsFailed):
        return len(error.errors)
    if isinstance(error, DeploymentFailed):
        return 1
    if call.partial and call.batch and body and not body.endswith(b'"errors":[]}'):
        # Only a partial answer that has failed rows is parsed again.
        return len(orjson.loads(body).get("errors") or ())
    return 0


def configure_access_log() -> None:
    """JSON lines on stderr, unless the embedding application set up its own handlers."""
    if not access_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False


class ObserveMiddleware:
    """Counts, times and logs every request; pure ASGI to stay cheap on the hot path."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None, log_requests: bool,
                 log_payloads: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests
        self.log_payloads = log_payloads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPS_PATHS:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        body = b""
        request_body: list[bytes] = []

        async def sending(message: Message) -> None:
            nonlocal status, body
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                call = scope.get(SCOPE_CALL)
                if self.log_payloads or (call is not None and call[3].partial):
                    body += message.get("body", b"")
            await send(message)

        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "http.request" and sum(map(len, request_body)) < PAYLOAD_LOG_LIMIT:
                request_body.append(message.get("body", b""))
            return message

        try:
            await self.app(scope, receiving if self.log_payloads else receive, sending)
        except Exception as exc:
            scope.setdefault(SCOPE_ERROR, exc)
            raise
        finally:
            self._done(scope, status, time.perf_counter() - start, body, b"".join(request_body))

    def _done(self, scope: Scope, status: int, seconds: float, body: bytes, request_body: bytes) -> None:
        resolved = scope.get(SCOPE_CALL)
        error = scope.get(SCOPE_ERROR)
        if resolved is None:
            labels, rows, errors, batch = UNRESOLVED, 0, 0, False
        else:
            branch, name, version, call = resolved
            labels = (name, branch, str(version))
            rows = len(call.ids) if call.batch else 1
            try:
                errors = _row_errors(call, error, body)
            except orjson.JSONDecodeError:
                errors = 0  # a body cut short by a client that went away
            batch = call.batch
        if self.metrics is not None:
            self.metrics.record(labels, status, seconds, rows, errors, batch)
        if self.log_requests:
            key = scope.get(SCOPE_KEY)
            line: dict[str, Any] = {
                "ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                "method": scope["method"],
                "path": scope["path"][:200],
                "status": status,
                "deployment": labels[0] or None,
                "branch": labels[1] or None,
                "version": resolved[2] if resolved else None,
                "rows": rows,
                "row_errors": errors,
                "duration_ms": round(seconds * 1000, 3),
                "error": type(error).__name__ if error is not None else None,
                "key_id": key.id if key is not None else None,
            }
            if self.log_payloads:
                line["request_body"] = request_body[:PAYLOAD_LOG_LIMIT].decode("utf-8", "replace")
                line["response_body"] = body[:PAYLOAD_LOG_LIMIT].decode("utf-8", "replace")
            access_log.info(orjson.dumps(line).decode())


def routes(rt: Runtime, metrics: Metrics | None) -> list[Route]:
    """`/livez`, `/readyz`, and `/metrics` when metrics are on."""

    async def livez(request: Request) -> Response:
        # Answering at all is the proof: the event loop is not stuck.
        return Response(b'{"status":"alive"}', media_type="application/json")

    async def readyz(request: Request) -> Response:
        try:
            await asyncio.wait_for(asyncio.to_thread(rt.store.branches), 5)
        except (StoreError, OSError, asyncio.TimeoutError) as exc:
            detail = orjson.dumps({"error": f"the store cannot be read ({type(exc).__name__}: "
                                            f"{exc}); check FRAMEWORK_STORE and its permissions"})
            return Response(detail, 503, media_type="application/json")
        body = {"status": "ready", "loaded": len(rt.versions.loaded())}
        return Response(orjson.dumps(body), media_type="application/json")

    out = [Route("/livez", livez, methods=["GET"]), Route("/readyz", readyz, methods=["GET"])]
    if metrics is not None:
        out.append(Route("/metrics", metrics.endpoint, methods=["GET"]))
    return out
