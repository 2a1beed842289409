"""Observability: Prometheus metrics, one JSON log line per request, liveness and readiness.

One pure ASGI middleware times each request and reads what the handlers left
in the ASGI scope: `Runtime.infer` puts the resolved version's runner and the
parsed call under SCOPE_CALL, the error handlers put the exception under
SCOPE_ERROR. Metric labels come only from *resolved* versions, never from
the raw URL, so random paths cannot blow up the number of series.

`/metrics`, `/livez`, `/readyz` and `/healthz` are neither counted nor logged:
they are scraped and probed every few seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from bisect import bisect_left
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Awaitable, Iterator

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
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
FLUSH_INTERVAL_S = 0.05  # the most often access-log lines are written out
CHUNK = 128  # requests counted and logged together
LINE_CACHE = 4096  # kinds of request whose log line is kept encoded

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


LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class _Histogram:
    """Bucket counts (not cumulative; the last is +Inf) and a sum, for one label set."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        buckets = list(zip(map(floatToGoString, self.bounds + (math.inf,)), accumulate(self.counts)))
        family.add_metric(labels, buckets, self.total)


class _Series:
    """What one resolved version (or the unresolved requests) has counted."""

    __slots__ = ("statuses", "rows", "row_errors", "latency", "batch")

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.rows = 0
        self.row_errors = 0
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.batch = _Histogram(BATCH_BUCKETS)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (not the global one).

    Counted in plain Python numbers and turned into metric families only when
    scraped: prometheus-client's own Counter and Histogram take a lock and
    look up a child per update, several times the cost of the rest of the
    bookkeeping. Updates and scrapes both run on the event loop, so plain
    numbers need no lock.
    """

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.series: dict[tuple[str, str, str], _Series] = {}
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.registry.register(_LoadedVersions(rt.versions))

    def add(self, seen: list[Seen]) -> None:
        for labels, _, status, start, end, rows, errors, batch, _, _, _, _, _ in seen:
            series = self.series.get(labels)
            if series is None:
                series = self.series[labels] = _Series()
            series.statuses[status] = series.statuses.get(status, 0) + 1
            latency = series.latency
            latency.counts[bisect_left(LATENCY_BUCKETS, end - start)] += 1  # bucket `le` holds values <= le
            latency.total += end - start
            series.rows += rows
            series.row_errors += errors
            if batch:
                series.batch.counts[bisect_left(BATCH_BUCKETS, rows)] += 1
                series.batch.total += rows

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("framework_requests", "Requests answered, by status",
                                       labels=LABELS + ("status",))
        rows = CounterMetricFamily("framework_rows", "Rows run (1 per single call)", labels=LABELS)
        row_errors = CounterMetricFamily(
            "framework_row_errors", "Rows whose function raised or whose result could not be encoded",
            labels=LABELS)
        latency = HistogramMetricFamily("framework_request_duration_seconds",
                                        "Time to answer a request", labels=LABELS)
        batch = HistogramMetricFamily("framework_batch_rows", "Rows per batch request", labels=LABELS)
        for key, series in list(self.series.items()):
            labels = list(key)
            for status, count in series.statuses.items():
                requests.add_metric(labels + [str(status)], count)
            rows.add_metric(labels, series.rows)
            row_errors.add_metric(labels, series.row_errors)
            series.latency.add_to(latency, labels)
            series.batch.add_to(batch, labels)
        inflight = GaugeMetricFamily("framework_requests_in_flight", "Inference requests being answered")
        inflight.add_metric([], self.rt.inflight)
        yield from (requests, rows, row_errors, latency, batch, inflight)


def _row_errors(call: Any, error: BaseException | None) -> int:
    if isinstance(error, RowsFailed):
        return len(error.errors)
    if isinstance(error, DeploymentFailed):
        return 1
    return call.failed


class AccessLog:
    """JSON lines on stderr, or through the `framework.access` logger where the
    embedding application gave it handlers.

    Most requests differ from an earlier one only in their time and duration:
    the rest of their line is encoded once per kind of request (deployment,
    path, status, rows, error, key) and kept, up to `LINE_CACHE` kinds: a
    dictionary encoded per line cost 11,000 instructions a one-row request,
    this 6,800.
    """

    def __init__(self) -> None:
        self.logger = access_log if access_log.handlers else None
        self.lines: list[bytes] = []  # encoded, not written yet
        self._millisecond = -1
        self._stamp = b""
        self._parts: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}

    def timestamp(self, seconds: float) -> bytes:
        """`seconds` since the epoch as ISO 8601 UTC with milliseconds, formatted once
        per millisecond."""
        millisecond = int(seconds * 1000)
        if millisecond != self._millisecond:
            self._millisecond = millisecond
            second, fraction = divmod(millisecond, 1000)
            self._stamp = b"%s.%03d+00:00" % (
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode(), fraction)
        return self._stamp

    def _around(self, kind: tuple[Any, ...], payloads: _Payloads | None) -> tuple[bytes, bytes]:
        """A line's JSON around its duration: from `"method"` to `"duration_ms":`, and
        from `,"error"` to the end."""
        labels, version, status, rows, errors, error, key, method, path = kind
        line: dict[str, Any] = {
            "method": method,
            "path": path[:200],
            "status": status,
            "deployment": labels[0] or None,
            "branch": labels[1] or None,
            "version": version,
            "rows": rows,
            "row_errors": errors,
            "duration_ms": 0,
            "error": error,
            "key_id": None if key is None else key.id,
        }
        if payloads is not None:
            line["request_body"] = payloads.request[:PAYLOAD_LOG_LIMIT].decode("utf-8", "replace")
            line["response_body"] = payloads.response[:PAYLOAD_LOG_LIMIT].decode("utf-8", "replace")
        head, _, tail = orjson.dumps(line).partition(b'"duration_ms":0')
        return head[1:] + b'"duration_ms":', tail + b"\n"

    def encode(self, seen: list[Seen]) -> None:
        """The lines of `seen`, kept for `write`."""
        # The wall clock now, less the monotonic one: each request's end as wall time.
        epoch = time.time() - time.perf_counter()
        parts = self._parts
        lines = self.lines
        for labels, version, status, start, end, rows, errors, _, error, key, method, path, payloads in seen:
            kind = (labels, version, status, rows, errors, error, key, method, path)
            if payloads is not None:
                head, tail = self._around(kind, payloads)  # bodies differ: never kept
            else:
                found = parts.get(kind)
                if found is None:
                    if len(parts) >= LINE_CACHE:
                        parts.clear()
                    found = parts[kind] = self._around(kind, None)
                head, tail = found
            # Milliseconds with three decimals, as `%d.%03d` of the microseconds: a float's repr costs more.
            lines += (b'{"ts":"', self.timestamp(epoch + end), b'",', head,
                      b"%d.%03d" % divmod(int((end - start) * 1e6), 1000), tail)

    def write(self) -> None:
        """Writes out the lines encoded so far."""
        if not self.lines:
            return
        data = b"".join(self.lines)
        self.lines.clear()
        if self.logger is None:
            self._out(data)
        else:
            for line in data.splitlines():
                self.logger.info(line.decode())

    @staticmethod
    def _out(data: bytes) -> None:
        try:
            sys.stderr.flush()  # what went to stderr before, first
            out = getattr(sys.stderr, "buffer", None)
            if out is None:  # stderr replaced by a text-only stream
                sys.stderr.write(data.decode())
                sys.stderr.flush()
                return
            out.write(data)
            out.flush()
        except (OSError, ValueError):
            pass  # stderr closed or a broken pipe: losing log lines beats failing requests


class _Payloads:
    """One request's bodies, as far as the log keeps them (`server.log_payloads`)."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive, self._send = receive, send
        self.request = bytearray()
        self.response = bytearray()

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request" and len(self.request) < PAYLOAD_LOG_LIMIT:
            self.request += message.get("body", b"")
        return message

    def send(self, message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.body" and len(self.response) < PAYLOAD_LOG_LIMIT:
            self.response += message.get("body", b"")
        return self._send(message)


# What a request leaves behind: its version's metric labels and number (UNRESOLVED and
# None where no version was resolved), status,
# start and end (perf_counter), rows, row errors, whether a batch, the name of the
# exception it raised, its API key, method, path, and its bodies (`server.log_payloads`).
Seen = tuple[tuple[str, str, str], Any, int, float, float, int, int, bool, Any, Any, str, str, Any]


class Observer:
    """What the middleware saw, turned into metrics and log lines in bulk.

    A request only leaves a tuple behind; every `CHUNK` of them are counted
    and their log lines encoded together. The same work, done in the path of
    each request, gave about 8% less single-row throughput over HTTP; done
    for all of 50 ms at once, it held up the requests behind it (p99 latency
    1.8x the bare app's). The lines are written out at most every
    `FLUSH_INTERVAL_S` under load, at the end of its turn after a quiet spell,
    and at shutdown: a write per request, or per event-loop turn, had cost a
    tenth of single-row throughput. A scrape of `/metrics` counts the rest first.
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

        payloads = _Payloads(receive, sending) if self.observer.log_payloads else None
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
            detail = orjson.dumps({"error": f"the store cannot be read ({type(exc).__name__}: "
                                            f"{exc}); check FRAMEWORK_STORE and its permissions"})
            return Response(detail, 503, media_type="application/json")
        body = {"status": "ready", "loaded": len(rt.versions.loaded())}
        return Response(orjson.dumps(body), media_type="application/json")

    out = [Route("/livez", livez, methods=["GET"]), Route("/readyz", readyz, methods=["GET"])]
    if metrics is not None:
        out.append(Route("/metrics", scrape, methods=["GET"]))
    return out
