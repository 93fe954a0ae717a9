"""Every Prometheus metric of the server, defined in one place, in base units.

Labels are bounded: route, status class, model and method, never a stream id (per-stream
detail is on ``GET /v1/streams/{id}/drift``). Each app instance owns its registry, so several
apps in one process (tests) never collide. The server runs one process per device (one
model worker thread each); every process exposes its own ``/metrics`` and Prometheus scrapes
each of them, so no multi-process aggregation is needed.

Besides the ``tta_*`` metrics the registry carries prometheus_client's process collector
(``process_*``: resident memory, CPU seconds, open file descriptors, start time) and platform
collector (``python_info``), and ``tta_build_info`` (value 1, labels: server version, Python,
torch), so a dashboard can tell which build a process runs and whether it leaks. The HTTP verb
label is ``http_method``, never ``method``: on every other metric ``method`` is the adaptation
method. Counters whose label values are known up front start at 0 (see :data:`STORE_OPERATIONS`),
so their series exist before the first event and ``rate()``/``increase()`` see the first one.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from tta_server.hot_metrics import CounterSeries, HistogramSeries, HotCounter, HotHistogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
UNIT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
ENTROPY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0)

STORE_OPERATIONS = (
    "create_stream",
    "get_stream",
    "list_streams",
    "delete_stream",
    "load_state",
    "save_state",
    "state_summaries",
    "restore",
    "flush",
    "flush_conflict",
    "version_conflict",
    "replica_wait",
)
"""The ``operation`` values of ``tta_store_errors_total``, each exported at 0 from the start.

A store that counts an operation not listed here still works (its series appears at its
first error); list it here so that its alert and dashboard panel see a 0 before that.
"""


RequestSeries = tuple[CounterSeries, HistogramSeries]
"""The count and latency series of one (route, verb, status)."""

EVICTION_REASONS = ("lru", "ttl")
"""The ``reason`` values of ``tta_streams_evicted_total`` (the memory store's), each exported at 0."""


def _version(distribution: str) -> str:
    """The installed version of ``distribution``, or ``unknown`` (e.g. running from a bare checkout)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """The server's metrics, registered in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = HotCounter(
            "tta_http_requests_total",
            "HTTP requests by route, HTTP verb and status code",
            ["route", "http_method", "status"],
            registry=r,
        )
        self.latency = HotHistogram(
            "tta_http_request_duration_seconds",
            "HTTP request latency by route and HTTP verb",
            ["route", "http_method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("tta_queue_depth", "requests waiting in the batcher queue", registry=r)
        self.queue_rejections = Counter("tta_queue_rejections_total", "requests refused with 429", registry=r)
        self.deadline_exceeded = Counter(
            "tta_deadline_exceeded_total", "requests failed with 504 before running", registry=r
        )
        self.batch_images = HotHistogram(
            "tta_batch_images", "images per batch (all fused streams together)", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_streams = HotHistogram(
            "tta_batch_streams",
            "streams fused into one batch (one forward pass; 1 when fusion is off or nothing could join)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = HotHistogram(
            "tta_batch_requests", "requests coalesced per adaptation batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference = HotHistogram(
            "tta_inference_duration_seconds",
            "adapter step time per batch (forward and adaptation)",
            ["model", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = HotCounter("tta_images_total", "images predicted", ["model", "method"], registry=r)
        self.adaptation_steps = HotCounter(
            "tta_adaptation_steps_total", "batches that updated a stream state", ["model", "method"], registry=r
        )
        self.samples_filtered = Counter(
            "tta_samples_filtered_total", "samples excluded from updates by a filter", ["model", "method"], registry=r
        )
        self.auto_switches = Counter(
            "tta_auto_switches_total",
            "regime switches of `auto` streams, by the regime switched to (no stream id: bounded labels)",
            ["model", "method", "to"],
            registry=r,
        )
        self.resets = Counter(
            "tta_resets_total", "stream resets (collapse recovery or API)", ["model", "method", "reason"], registry=r
        )
        self.active_streams = Gauge("tta_active_streams", "streams registered in this process's store", registry=r)
        self.streams_evicted = Counter(
            "tta_streams_evicted_total",
            "streams the memory store dropped with their state: lru = over memory_max_streams, ttl = idle too long",
            ["reason"],
            registry=r,
        )
        self.store_errors = Counter(
            "tta_store_errors_total", "failed state store operations", ["operation"], registry=r
        )
        self.store_cache = Counter(
            "tta_store_cache_total",
            "Redis store state loads: hit = served by the hot cache (no state bytes read), miss = read from Redis",
            ["result"],
            registry=r,
        )
        self.observer_errors = Counter(
            "tta_observer_errors_total",
            "exceptions raised by step observers (metrics, drift); the answer and the stream are unaffected",
            ["observer"],
            registry=r,
        )
        self.store_pending_states = Gauge(
            "tta_store_pending_states",
            "streams whose newest state is only in this process (write-behind, or Redis unreachable)",
            registry=r,
        )
        self.state_bytes = HotHistogram(
            "tta_stream_state_bytes",
            "bytes of adapted state per stream at write",
            ["model", "method"],
            buckets=(1e3, 1e4, 1e5, 1e6, 1e7, 1e8),
            registry=r,
        )
        self.entropy = HotHistogram(
            "tta_prediction_entropy_nats",
            "mean prediction entropy per batch",
            ["model", "method"],
            buckets=ENTROPY_BUCKETS,
            registry=r,
        )
        self.confidence = HotHistogram(
            "tta_prediction_confidence",
            "mean max-probability per batch",
            ["model", "method"],
            buckets=UNIT_BUCKETS,
            registry=r,
        )
        self.disagreement = Histogram(
            "tta_source_disagreement_ratio",
            "share of sampled images where the adapted and the source prediction differ",
            ["model", "method"],
            buckets=UNIT_BUCKETS,
            registry=r,
        )
        self.bn_shift = Histogram(
            "tta_bn_statistics_shift",
            "mean |batch mean - source mean| / source std over BN layers, on sampled batches",
            ["model", "method"],
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0),
            registry=r,
        )
        self.build_info = Gauge(
            "tta_build_info",
            "always 1; the labels say which build this process runs",
            ["version", "python", "torch"],
            registry=r,
        )
        self.build_info.labels(_version("tta-server"), platform.python_version(), _version("torch")).set(1)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        for operation in STORE_OPERATIONS:
            self.store_errors.labels(operation)
        for result in ("hit", "miss"):
            self.store_cache.labels(result)
        for reason in EVICTION_REASONS:
            self.streams_evicted.labels(reason)
        # looked up once per (route, verb, status): ``labels()`` takes a lock and builds its key on every
        # call, and this runs for every request; bounded, since a client can send any verb
        self._request_series: Callable[[str, str, int], RequestSeries] = functools.lru_cache(1024)(
            self._labelled_request
        )

    def _labelled_request(self, route: str, http_method: str, status: int) -> RequestSeries:
        return self.requests.labels(route, http_method, str(status)), self.latency.labels(route, http_method)

    def record_request(self, route: str, http_method: str, status: int, seconds: float) -> None:
        """Count and time one HTTP answer under its route template (the middleware and the predict fast path)."""
        count, latency = self._request_series(route, http_method, status)
        count.inc()
        latency.observe(seconds)

    def track_gauge(self, gauge: Gauge, fn: Callable[[], float]) -> None:
        """Read a gauge's value from ``fn`` at scrape time."""
        gauge.set_function(fn)

    def render(self) -> bytes:
        return generate_latest(self.registry)
