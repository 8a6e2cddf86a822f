"""Prometheus metrics on a private registry, recorded in the front-end process only.

Two sets, both always on:

- TorchServe's names and labels, so existing dashboards and alerts keep working: ``Requests2XX/4XX/5XX``,
  ``ts_inference_requests_total``, ``ts_inference_latency_microseconds``, ``ts_queue_latency_microseconds``,
  ``QueueTime``, ``WorkerThreadTime``, ``WorkerLoadTime``, the host gauges (``CPUUtilization``, ``MemoryUsed``,
  ...), and whatever handlers emit through ``context.metrics`` (``HandlerTime``, ``PredictionTime``, custom ones).
  TorchServe's counters without a ``_total`` suffix are exposed untyped under their exact names.
- servekit's own, per model and version: requests by outcome, histograms of latency, queue time, handler time and
  batch size, and (read from the registry at scrape time) queue depth, workers alive and busy, worker restarts.

Label values come only from registered model names and versions, never from URL input.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from servekit.protocol import MetricRecord

logger = logging.getLogger("servekit.metrics")

HOST = socket.gethostname()
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_CUSTOM_SERIES = 10_000
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def outcome(status: int) -> str:
    """The outcome label of an HTTP status."""
    if status < 400:
        return "success"
    if status == 499:
        return "cancelled"
    if status == 503:
        return "rejected"
    if status == 504:
        return "timed_out"
    return "client_error" if status < 500 else "server_error"


@dataclass(frozen=True, slots=True)
class ModelState:
    """What the registry reports about one model version at scrape time."""

    name: str
    version: str
    queue_depth: int
    workers_alive: int
    workers_busy: int
    restarts: int


class Sums(Collector):
    """Untyped accumulating series with exact names (TorchServe's counters and handler metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, tuple[str, str, dict[tuple[tuple[str, str], ...], float]]] = {}
        self._series = 0

    def add(self, name: str, kind: str, help_text: str, labels: tuple[tuple[str, str], ...], value: float) -> None:
        """Add to a counter (``kind`` "counter") or set a gauge (anything else)."""
        with self._lock:
            _, _, series = self._families.setdefault(name, (kind, help_text, {}))
            if labels not in series:
                if self._series >= MAX_CUSTOM_SERIES:
                    return
                self._series += 1
                series[labels] = 0.0
            series[labels] = series[labels] + value if kind == "counter" else value

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            families = [(n, k, h, dict(s)) for n, (k, h, s) in self._families.items()]
        for name, kind, help_text, series in families:
            metric = Metric(name, help_text, "unknown" if kind == "counter" else "gauge")
            for labels, value in series.items():
                metric.add_sample(name, dict(labels), value)
            yield metric


class HostCollector(Collector):
    """TorchServe's host gauges, read from /proc and the disk at scrape time."""

    def __init__(self) -> None:
        self._last_cpu: tuple[float, float] | None = None

    def _cpu_percent(self) -> float:
        try:
            fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return 0.0
        idle, total = fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)
        last, self._last_cpu = self._last_cpu, (idle, total)
        if last is None or total <= last[1]:
            return 0.0
        return 100.0 * (1 - (idle - last[0]) / (total - last[1]))

    def collect(self) -> Iterator[Metric]:
        labels = ["Level", "Hostname"]
        values = ["Host", HOST]
        meminfo: dict[str, float] = {}
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                key, _, rest = line.partition(":")
                meminfo[key] = float(rest.split()[0]) / 1024  # kB -> MB
        except (OSError, ValueError, IndexError):
            pass
        total, available = meminfo.get("MemTotal", 0.0), meminfo.get("MemAvailable", 0.0)
        disk = shutil.disk_usage("/")
        gauges = {
            "CPUUtilization": ("Percent", self._cpu_percent()),
            "MemoryUsed": ("Megabytes", total - available),
            "MemoryAvailable": ("Megabytes", available),
            "MemoryUtilization": ("Percent", 100 * (total - available) / total if total else 0.0),
            "DiskUsage": ("Gigabytes", disk.used / 2**30),
            "DiskAvailable": ("Gigabytes", disk.free / 2**30),
            "DiskUtilization": ("Percent", 100 * disk.used / disk.total if disk.total else 0.0),
        }
        for name, (unit, value) in gauges.items():
            family = GaugeMetricFamily(name, f"Torchserve prometheus gauge metric with unit: {unit}", labels=labels)
            family.add_metric(values, value)
            yield family


class StateCollector(Collector):
    """Queue depth, workers alive and busy, and worker restarts, read from the registry at scrape time."""

    def __init__(self, source: Callable[[], Iterable[ModelState]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "model_version"]
        depth = GaugeMetricFamily("servekit_queue_depth", "Requests waiting for a worker.", labels=labels)
        alive = GaugeMetricFamily("servekit_workers_alive", "Worker processes ready to serve.", labels=labels)
        busy = GaugeMetricFamily("servekit_workers_busy", "Worker processes running a batch.", labels=labels)
        restarts = CounterMetricFamily("servekit_worker_restarts", "Worker processes restarted.", labels=labels)
        for state in self.source():
            key = [state.name, state.version]
            depth.add_metric(key, state.queue_depth)
            alive.add_metric(key, state.workers_alive)
            busy.add_metric(key, state.workers_busy)
            restarts.add_metric(key, state.restarts)
        yield from (depth, alive, busy, restarts)


class ModelMetrics:
    """The series of one model version, bound once so that the request path only increments."""

    def __init__(self, metrics: Metrics, name: str, version: str) -> None:
        self._metrics = metrics
        self.name = name
        self.version = version
        self._latency = metrics.latency.labels(name, version)
        self._queue = metrics.queue_time.labels(name, version)
        self._handler = metrics.handler_time.labels(name, version)
        self._batch = metrics.batch_size.labels(name, version)
        self._ts_requests: dict[str, Counter] = {}

    def request(self, url_version: str, status: int, seconds: float) -> None:
        """One answered inference request (``url_version`` is "default" when the URL named none)."""
        m = self._metrics
        m.requests.labels(self.name, self.version, outcome(status)).inc()
        self._latency.observe(seconds)
        ts_labels = (("hostname", HOST), ("model_name", self.name), ("model_version", url_version))
        if url_version not in self._ts_requests:
            self._ts_requests[url_version] = m.ts_requests.labels(self.name, url_version, HOST)
        self._ts_requests[url_version].inc()
        m.sums.add(
            "ts_inference_latency_microseconds",
            "counter",
            "Cumulative inference duration in microseconds",
            ts_labels,
            seconds * 1e6,
        )

    def queued(self, seconds: float) -> None:
        """One request left the queue after ``seconds``."""
        self._queue.observe(seconds)
        labels = (("hostname", HOST), ("model_name", self.name), ("model_version", "default"))
        self._metrics.sums.add(
            "ts_queue_latency_microseconds",
            "counter",
            "Cumulative queue duration in microseconds",
            labels,
            seconds * 1e6,
        )
        self._metrics.queue_time_gauge.set(seconds * 1000)

    def batch(self, size: int, handler_ms: float, roundtrip_ms: float, records: Sequence[MetricRecord]) -> None:
        """One batch came back from a worker after ``roundtrip_ms``, with the handler's own metrics."""
        self._batch.observe(size)
        self._handler.observe(handler_ms / 1000)
        self._metrics.worker_thread_time.set(max(0.0, roundtrip_ms - handler_ms))
        for record in records:
            self._metrics.record(self.name, record)


class Metrics:
    """The server's metrics; ``render`` gives the Prometheus text exposition."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series, as in TorchServe
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        per_model = ["model_name", "model_version"]
        self.requests = Counter(
            "servekit_requests", "Inference requests by outcome.", [*per_model, "outcome"], registry=r
        )
        self.latency = Histogram(
            "servekit_request_latency_seconds", "Arrival to response.", per_model, buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "servekit_queue_time_seconds",
            "Arrival to dispatch to a worker.",
            per_model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.handler_time = Histogram(
            "servekit_handler_time_seconds",
            "Handler time per batch, in the worker.",
            per_model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "servekit_batch_size", "Requests per batch.", per_model, buckets=BATCH_BUCKETS, registry=r
        )
        self.ts_requests = Counter(
            "ts_inference_requests",
            "Total number of inference requests.",
            ["model_name", "model_version", "hostname"],
            registry=r,
        )
        host = ["Level", "Hostname"]
        self.queue_time_gauge = Gauge(
            "QueueTime", "Torchserve prometheus gauge metric with unit: Milliseconds", host, registry=r
        ).labels("Host", HOST)
        self.worker_thread_time = Gauge(
            "WorkerThreadTime",
            "Torchserve prometheus gauge metric with unit: Milliseconds (batch round trip minus handler time)",
            host,
            registry=r,
        ).labels("Host", HOST)
        self.worker_load_time = Gauge(
            "WorkerLoadTime",
            "Torchserve prometheus gauge metric with unit: Milliseconds",
            ["WorkerName", *host],
            registry=r,
        )
        self.sums = Sums()
        r.register(self.sums)
        r.register(HostCollector())
        self._dropped_records = 0
        self._valid_shapes: set[tuple[str, ...]] = set()  # metric names and label names already checked

    def watch(self, source: Callable[[], Iterable[ModelState]]) -> None:
        """Read per-model state (queue depth, workers) from ``source`` at every scrape."""
        self.registry.register(StateCollector(source))

    def model(self, name: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, name, version)

    def response(self, status: int) -> None:
        """Any HTTP response on any port (TorchServe's ``Requests2XX/4XX/5XX``)."""
        bucket = "Requests2XX" if status < 300 else "Requests4XX" if 400 <= status < 500 else "Requests5XX"
        self.sums.add(
            bucket,
            "counter",
            "Torchserve prometheus counter metric with unit: Count",
            (("Hostname", HOST), ("Level", "Host")),
            1,
        )

    def worker_loaded(self, worker_name: str, seconds: float) -> None:
        self.worker_load_time.labels(worker_name, "Host", HOST).set(seconds * 1000)

    def record(self, model: str, record: MetricRecord) -> None:
        """A metric a handler emitted; malformed ones (from untrusted workers) are dropped."""
        labels = (("Hostname", HOST), *record.dimensions)
        if not (
            NAME.fullmatch(record.name) and all(LABEL.fullmatch(k) for k, _ in labels) and math.isfinite(record.value)
        ):
            self._dropped_records += 1
            if self._dropped_records == 1:
                logger.warning("model %s emitted a malformed metric %r; dropping such metrics", model, record.name)
            return
        help_text = f"Torchserve prometheus {record.kind} metric with unit: {record.unit}"
        self.sums.add(record.name, record.kind, help_text, tuple(sorted(labels)), record.value)

    def render(self, names: Sequence[str] = ()) -> bytes:
        """The exposition, restricted to the metric families in ``names`` (TorchServe's ``name[]``) if given."""
        return generate_latest(_Only(self.registry, set(names)) if names else self.registry)


class _Only(Collector):
    def __init__(self, registry: CollectorRegistry, names: set[str]) -> None:
        self.registry = registry
        self.names = names

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            if metric.name in self.names or f"{metric.name}_total" in self.names:
                yield metric
