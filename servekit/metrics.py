"""Prometheus metrics on a private registry, recorded in the front-end process only."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from servekit.errors import ServekitError


class Metrics:
    """The server's metrics; ``render`` gives the Prometheus text exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ts_inference_requests_total",
            "Inference requests answered, by model, version and HTTP status.",
            ["model_name", "model_version", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "servekit_request_latency_seconds",
            "Time from a request's arrival to its response, by model.",
            ["model_name", "model_version"],
            registry=self.registry,
        )

    @contextmanager
    def track(self, model: str, version: str) -> Iterator[None]:
        """Count one inference request and time it, whatever its outcome."""
        start = time.perf_counter()
        code = 500
        try:
            yield
            code = 200
        except ServekitError as exc:
            code = exc.status_code
            raise
        finally:
            self.requests.labels(model, version, str(code)).inc()
            self.latency.labels(model, version).observe(time.perf_counter() - start)

    def render(self) -> bytes:
        return generate_latest(self.registry)
