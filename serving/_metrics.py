"""Prometheus metrics of the gateway, on a private ``CollectorRegistry`` (one per gateway, so several gateways
in one process — tests — do not collide).

Label values come only from the routing table (never from a request's unknown function name), so the number
of series stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNKNOWN = "_unknown"  # function label of requests that named no known function

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class _Gauges(Collector):
    """Gauges read at scrape time from the gateway's live state."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, str, int, int]]], ready: Callable[[], bool]):
        self._source = source
        self._ready = ready

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily(
            "depin_gateway_queue_rows", "Rows waiting for a batch", labels=["function", "version"]
        )
        in_flight = GaugeMetricFamily(
            "depin_gateway_in_flight_rows", "Rows in batches being run", labels=["function", "version"]
        )
        loaded = 0
        for name, version, queued, running in self._source():
            queue.add_metric([name, version], queued)
            in_flight.add_metric([name, version], running)
            loaded += 1
        yield queue
        yield in_flight
        yield GaugeMetricFamily("depin_gateway_loaded_versions", "Function versions loaded", value=loaded)
        yield GaugeMetricFamily(
            "depin_gateway_ready", "1 when every aliased version is loaded and warm", value=int(self._ready())
        )


class GatewayMetrics:
    """Counters and histograms updated on the hot path (label children cached), gauges read on scrape."""

    def __init__(
        self, state: Callable[[], Iterable[tuple[str, str, int, int]]], ready: Callable[[], bool]
    ) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "depin_gateway_requests",
            "Invoke requests by function, version and HTTP status",
            ["function", "version", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "depin_gateway_request_seconds",
            "Invoke latency inside the gateway (body read to response)",
            ["function", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._batch_rows = Histogram(
            "depin_gateway_batch_rows",
            "Rows per model call",
            ["function", "version"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._batch_seconds = Histogram(
            "depin_gateway_batch_seconds",
            "Seconds per model call (incl. concatenation and splitting)",
            ["function", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._rows = Counter(
            "depin_gateway_rows",
            "Input rows accepted for inference",
            ["function", "version"],
            registry=self.registry,
        )
        self.registry.register(_Gauges(state, ready))
        self._children: dict[tuple[Any, ...], Any] = {}
        self._by_request: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, function: str, version: str, status: int, seconds: float) -> None:
        """Count one invoke request and its latency."""
        key = (function, version, status)
        children = self._by_request.get(key)
        if children is None:
            children = self._by_request[key] = (
                self._requests.labels(function, version, str(status)),
                self._latency.labels(function, version),
            )
        children[0].inc()
        children[1].observe(seconds)

    def batch_observer(self, function: str, version: str) -> Callable[[int, float], None]:
        """An ``on_batch(rows, seconds)`` callback for the batcher of ``function``@``version``."""
        rows_hist = self._child(self._batch_rows, function, version)
        secs_hist = self._child(self._batch_seconds, function, version)

        def observe(rows: int, seconds: float) -> None:
            rows_hist.observe(rows)
            secs_hist.observe(seconds)

        return observe

    def render(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)
