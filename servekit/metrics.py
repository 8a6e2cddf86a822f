"""Prometheus metrics, recorded in the front-end process only.

Two sets, both always on:

- TorchServe's, with its names, labels and text form (issue 14; ``servekit.exposition``), so that dashboards, alert
  rules and scripts written against TorchServe keep working: ``Requests2XX/4XX/5XX``, ``ts_inference_requests_total``,
  ``ts_inference_latency_microseconds``, ``ts_queue_latency_microseconds``, ``QueueTime``, ``WorkerThreadTime``,
  ``WorkerLoadTime``, the host gauges (``CPUUtilization``, ``MemoryUsed``, ...), and whatever handlers emit through
  ``context.metrics`` (``HandlerTime``, ``PredictionTime``, custom ones) as with ``model_metrics_auto_detect``.
- servekit's own on a private ``prometheus_client`` registry, per model and version: requests by outcome, histograms
  of latency, queue time, handler time and batch size, and (read from the registry at scrape time) queue depth, workers
  alive and busy, worker restarts.

Label values come only from registered model names and versions, never from URL input.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from servekit.exposition import Family, Labels, write
from servekit.protocol import MetricRecord

logger = logging.getLogger("servekit.metrics")

HOST = socket.gethostname()
HOST_LABELS: Labels = (("Level", "Host"), ("Hostname", HOST))
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_CUSTOM_SERIES = 10_000
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# TorchServe's default metrics.yaml, in its order: (name, kind, unit). Its label names are fixed by the code that
# records each one below; the backend's two are declared with unit "ms", which their HELP line shows.
FRONTEND = (
    *((name, "counter", "Count") for name in ("Requests2XX", "Requests4XX", "Requests5XX")),
    ("ts_inference_requests_total", "counter", "Count"),
    ("ts_inference_latency_microseconds", "counter", "Microseconds"),
    ("ts_queue_latency_microseconds", "counter", "Microseconds"),
    *((name, "gauge", "Milliseconds") for name in ("QueueTime", "WorkerThreadTime", "WorkerLoadTime")),
    ("CPUUtilization", "gauge", "Percent"),
    ("MemoryUsed", "gauge", "Megabytes"),
    ("MemoryAvailable", "gauge", "Megabytes"),
    ("MemoryUtilization", "gauge", "Percent"),
    ("DiskUsage", "gauge", "Gigabytes"),
    ("DiskUtilization", "gauge", "Percent"),
    ("DiskAvailable", "gauge", "Gigabytes"),
)
BACKEND = (("HandlerTime", "gauge", "ms"), ("PredictionTime", "gauge", "ms"))
FRONTEND_NAMES = frozenset(name for name, _, _ in FRONTEND)


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


class Host:
    """TorchServe's host gauges, read from /proc and the disk when ``/metrics`` is read."""

    def __init__(self, families: dict[str, Family]) -> None:
        self.families = families
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

    def refresh(self) -> None:
        meminfo: dict[str, float] = {}
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                key, _, rest = line.partition(":")
                meminfo[key] = float(rest.split()[0]) / 1024  # kB -> MB
        except (OSError, ValueError, IndexError):
            pass
        total, available = meminfo.get("MemTotal", 0.0), meminfo.get("MemAvailable", 0.0)
        disk = shutil.disk_usage("/")
        # percentages rounded to 0.1 and disk use of the space not reserved, as psutil gives them to TorchServe
        values = {
            "CPUUtilization": round(self._cpu_percent(), 1),
            "MemoryUsed": total - available,
            "MemoryAvailable": available,
            "MemoryUtilization": round(100 * (total - available) / total, 1) if total else 0.0,
            "DiskUsage": disk.used / 2**30,
            "DiskUtilization": round(100 * disk.used / (disk.used + disk.free), 1) if disk.used + disk.free else 0.0,
            "DiskAvailable": disk.free / 2**30,
        }
        for name, value in values.items():
            self.families[name].add(HOST_LABELS, value)


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
    """The series of one model version, bound once so that the request path only adds numbers."""

    def __init__(self, metrics: Metrics, name: str, version: str) -> None:
        self._metrics = metrics
        self.name = name
        self.version = version
        self._latency = metrics.latency.labels(name, version)
        self._queue = metrics.queue_time.labels(name, version)
        self._handler = metrics.handler_time.labels(name, version)
        self._batch = metrics.batch_size.labels(name, version)
        ts = metrics.families
        self._ts_requests = ts["ts_inference_requests_total"]
        self._ts_latency = ts["ts_inference_latency_microseconds"]
        self._ts_queue = ts["ts_queue_latency_microseconds"]
        self._queue_time = ts["QueueTime"]
        self._worker_thread_time = ts["WorkerThreadTime"]
        self._ts_labels: dict[str, Labels] = {}  # by the version the URL named ("default" when none)
        self._requests: dict[int, Counter] = {}  # ``servekit_requests_total``'s series, by HTTP status

    def _labels(self, url_version: str) -> Labels:
        labels = self._ts_labels.get(url_version)
        if labels is None:
            labels = (("model_name", self.name), ("model_version", url_version), ("hostname", HOST))
            self._ts_labels[url_version] = labels
        return labels

    def request(self, url_version: str, status: int, seconds: float, queued_s: float | None = None) -> None:
        """One answered inference request (``url_version`` is "default" when the URL named none). ``queued_s`` is
        how long it waited for a worker when a worker answered it, whatever the status the handler set; ``None``
        when it failed or was refused, which TorchServe's latency and queue families do not count (only
        ``ts_inference_requests_total`` and ``RequestsNXX`` do)."""
        labels = self._count(url_version, status)
        self._latency.observe(seconds)
        if queued_s is not None:
            self._ts_latency.add(labels, seconds * 1e6)
            self._ts_queue.add(labels, queued_s * 1e6)
            self._queue_time.add(HOST_LABELS, float(int(queued_s * 1000)))  # whole milliseconds, as TorchServe's

    def refused(self, url_version: str, status: int) -> None:
        """One request refused from its head (overload): counted as ``request`` counts a request, but not in the
        latency histogram, where a flood's thousands of refusals a second, each at zero, would hide the latency of
        the requests served."""
        self._count(url_version, status)

    def _count(self, url_version: str, status: int) -> Labels:
        """Count an answer in ``servekit_requests_total`` and ``ts_inference_requests_total``; the latter's labels."""
        requests = self._requests.get(status)
        if requests is None:  # a lookup of labels costs more than the rest of a refusal's metrics
            requests = self._requests[status] = self._metrics.requests.labels(self.name, self.version, outcome(status))
        requests.inc()
        labels = self._labels(url_version)
        self._ts_requests.add(labels, 1.0)
        return labels

    def queued(self, seconds: float) -> None:
        """One request left the queue after ``seconds``."""
        self._queue.observe(seconds)

    def batch(self, size: int, handler_ms: float, roundtrip_ms: float, records: Sequence[MetricRecord]) -> None:
        """One batch came back from a worker after ``roundtrip_ms``, with the handler's own metrics."""
        self._batch.observe(size)
        self._handler.observe(handler_ms / 1000)
        self._worker_thread_time.add(HOST_LABELS, float(int(max(0.0, roundtrip_ms - handler_ms))))
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
        # TorchServe's families, in its order; the handlers' own are added as they first appear
        self.families = {name: Family(name, kind, unit) for name, kind, unit in (*FRONTEND, *BACKEND)}
        self._responses = {code: self.families[f"Requests{code}XX"] for code in (2, 4, 5)}
        self._host = Host(self.families)
        self._handler_series = 0
        self._dropped_records = 0
        self._valid_shapes: set[tuple[str, ...]] = set()  # handler metrics' names, kinds and label names, checked

    def watch(self, source: Callable[[], Iterable[ModelState]]) -> None:
        """Read per-model state (queue depth, workers) from ``source`` at every scrape."""
        self.registry.register(StateCollector(source))

    def model(self, name: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, name, version)

    def response(self, status: int) -> None:
        """Any HTTP response on any port (TorchServe's ``Requests2XX/4XX/5XX``; 5XX is anything not 2xx or 4xx)."""
        code = 2 if 200 <= status < 300 else 4 if 400 <= status < 500 else 5
        self._responses[code].add(HOST_LABELS, 1.0)

    def worker_loaded(self, worker_name: str, seconds: float) -> None:
        labels = (("WorkerName", worker_name), *HOST_LABELS)
        self.families["WorkerLoadTime"].add(labels, float(int(seconds * 1000)))

    def record(self, model: str, record: MetricRecord) -> None:
        """A metric a handler emitted, labelled as TorchServe labels it (the handler's dimensions, then
        ``Hostname``). Malformed ones (from untrusted workers), ones named as the front end's and new series past
        ``MAX_CUSTOM_SERIES`` are dropped."""
        labels = (*record.dimensions, ("Hostname", HOST))
        family = self.families.get(record.name)
        kind = family.kind if family else record.kind if record.kind in ("counter", "histogram") else "gauge"
        shape = (record.name, kind, *(label for label, _ in labels))
        if not (
            (shape in self._valid_shapes or self._check(shape))
            and math.isfinite(record.value)
            and not (kind == "counter" and record.value < 0)
        ):
            self._dropped_records += 1
            if self._dropped_records == 1:
                logger.warning("model %s emitted a malformed metric %r; dropping such metrics", model, record.name)
            return
        if family is None or labels not in family:
            if self._handler_series >= MAX_CUSTOM_SERIES:
                return
            self._handler_series += 1
        if family is None:
            family = self.families[record.name] = Family(record.name, kind, record.unit)
        family.add(labels, record.value)

    def _check(self, shape: tuple[str, ...]) -> bool:
        """Whether a handler metric's name, kind and label names make a valid family (remembered if so)."""
        name, kind, *label_names = shape
        valid = (
            bool(NAME.fullmatch(name))
            and name not in FRONTEND_NAMES
            and not name.startswith("servekit_")
            and all(LABEL.fullmatch(label) and not label.startswith("__") for label in label_names)
            and len(set(label_names)) == len(label_names)
            and not (kind == "histogram" and "le" in label_names)
        )
        if valid and len(self._valid_shapes) < MAX_CUSTOM_SERIES:
            self._valid_shapes.add(shape)
        return valid

    def render(self, names: Sequence[str] = ()) -> bytes:
        """The exposition, TorchServe's families first; only the families (or samples) in ``names`` (TorchServe's
        ``name[]``) if given."""
        self._host.refresh()
        wanted = set(names)
        own = generate_latest(_Only(self.registry, wanted) if wanted else self.registry)
        return write(list(self.families.values()), wanted).encode() + own


class _Only(Collector):
    def __init__(self, registry: CollectorRegistry, names: set[str]) -> None:
        self.registry = registry
        self.names = names

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            if metric.name in self.names or f"{metric.name}_total" in self.names:
                yield metric
