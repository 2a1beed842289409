"""Prometheus metrics: plain counters per resolved version, made into metric families
only when scraped.

Labels come only from *resolved* versions, never from the raw URL, so random
paths cannot blow up the number of series. `framework.serve.observe` hands in
what requests did, in bulk.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from itertools import accumulate
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from framework.serve.runtime import Runtime
    from framework.execute.versions import VersionCache
    from framework.serve.scope import Seen

LABELS = ("deployment", "branch", "version")
UNRESOLVED = ("", "", "")  # the labels of requests that resolved no version


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

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bucket `le` holds values <= le
        self.total += value

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
            series.latency.observe(end - start)
            series.rows += rows
            series.row_errors += errors
            if batch:
                series.batch.observe(rows)

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
