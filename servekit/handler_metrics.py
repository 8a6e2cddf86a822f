"""``context.metrics``: TorchServe's handler metrics API (``ts.metrics``), in the worker process.

What a handler emits during a batch is collected here, sent back with the batch's result, and exposed by the front
end's ``/metrics`` labelled as TorchServe labels it (``ts/metrics/metric_cache_abstract.py``): the helpers
(``add_metric``, ``add_counter``, ``add_time``, ...) label with the handler's dimensions in their order, then
``ModelName`` and ``Level="Model"`` unless given (``add_error``: ``Level="Error"`` only); a metric declared with
``add_metric_to_cache`` has exactly its declared dimensions; the front end adds ``Hostname`` last. Units are written as
TorchServe writes them (``ms`` -> ``Milliseconds``, ...). Counters add up, gauges keep the last value, histograms count
into buckets. Standard library only; never imports asyncio or fastapi.
"""

from __future__ import annotations

import enum
from typing import Any


class MetricTypes(enum.Enum):
    """TorchServe's ``ts.metrics.metric_type_enum.MetricTypes``."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


class Dimension:
    """TorchServe's ``ts.metrics.dimension.Dimension``: one label of a metric."""

    def __init__(self, name: str, value: str) -> None:
        self.name = name
        self.value = value

    def __str__(self) -> str:
        return f"{self.name}:{self.value}"


# (name, value, unit, kind, ((label, value), ...)): what a handler emitted, for the worker to send back
Record = tuple[str, float, str, str, tuple[tuple[str, str], ...]]

# ts/metrics/unit.py: the units TorchServe writes out in full; any other is kept as given
UNITS = {
    "ms": "Milliseconds",
    "s": "Seconds",
    "percent": "Percent",
    "count": "Count",
    "MB": "Megabytes",
    "GB": "Gigabytes",
    "kB": "Kilobytes",
    "B": "Bytes",
    "": "unit",
}


def _pairs(dimensions: Any) -> list[tuple[str, str]]:
    if not dimensions:
        return []
    return [(str(d.name), str(d.value)) if isinstance(d, Dimension) else (str(d[0]), str(d[1])) for d in dimensions]


class CachedMetric:
    """A metric declared with ``add_metric_to_cache``; ``add_or_update``/``update`` emit it."""

    def __init__(self, cache: Metrics, name: str, unit: str, dimension_names: list[str], kind: MetricTypes) -> None:
        self.cache = cache
        self.name = name
        self.unit = UNITS.get(unit, unit)
        self.dimension_names = dimension_names
        self.kind = kind

    def add_or_update(self, value: float, dimension_values: list[str] | None = None, request_id: str = "") -> None:
        values = list(dimension_values or [])
        if len(values) != len(self.dimension_names):
            raise ValueError(f"metric {self.name} has dimensions {self.dimension_names}, got values {values}")
        self.cache.emit(self.name, value, self.unit, self.kind, list(zip(self.dimension_names, values, strict=True)))

    def update(self, value: float, request_id: str = "", dimensions: list[Dimension] | None = None) -> None:
        self.cache.emit(self.name, value, self.unit, self.kind, _pairs(dimensions))


class Metrics:
    """``context.metrics``: the metrics a handler emits during a batch, kept for the worker to send back."""

    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
        self.records: list[Record] = []
        self._cache: dict[tuple[str, MetricTypes], CachedMetric] = {}

    def emit(self, name: str, value: float, unit: str, kind: MetricTypes, dimensions: list[tuple[str, str]]) -> None:
        """Record a metric with exactly these dimensions, in this order."""
        self.records.append((name, float(value), UNITS.get(unit, unit), kind.value, tuple(dimensions)))

    def _emit_with_defaults(
        self, name: str, value: float, unit: str, kind: MetricTypes, dimensions: Any, level: str = "Model"
    ) -> None:
        pairs = _pairs(dimensions)
        given = {label for label, _ in pairs}
        if level == "Model" and "ModelName" not in given:
            pairs.append(("ModelName", self.model_name))
        if "Level" not in given:
            pairs.append(("Level", level))
        self.emit(name, value, unit, kind, pairs)

    def take(self) -> list[Record]:
        """The records emitted since the last call."""
        records, self.records = self.records, []
        return records

    def add_metric_to_cache(
        self,
        metric_name: str,
        unit: str,
        dimension_names: list[str] | None = None,
        metric_type: MetricTypes = MetricTypes.COUNTER,
    ) -> CachedMetric:
        metric = CachedMetric(self, metric_name, unit, list(dimension_names or []), metric_type)
        self._cache[(metric_name, metric_type)] = metric
        return metric

    def get_metric(self, metric_name: str, metric_type: MetricTypes = MetricTypes.COUNTER) -> CachedMetric:
        try:
            return self._cache[(metric_name, metric_type)]
        except KeyError:
            raise KeyError(f"metric {metric_name} of type {metric_type.value} was not added to the cache") from None

    def add_metric(
        self,
        name: str,
        value: float,
        unit: str = "",
        idx: Any = None,
        dimensions: Any = None,
        metric_type: MetricTypes = MetricTypes.COUNTER,
    ) -> None:
        self._emit_with_defaults(name, value, unit, metric_type, dimensions)

    def add_counter(self, name: str, value: float, idx: Any = None, dimensions: Any = None) -> None:
        self.add_metric(name, value, "count", idx, dimensions, MetricTypes.COUNTER)

    def add_error(self, name: str, value: float, dimensions: Any = None) -> None:
        self._emit_with_defaults(name, value, "", MetricTypes.COUNTER, dimensions, level="Error")

    def add_time(
        self,
        name: str,
        value: float,
        idx: Any = None,
        unit: str = "ms",
        dimensions: Any = None,
        metric_type: MetricTypes = MetricTypes.GAUGE,
    ) -> None:
        self.add_metric(name, value, unit, idx, dimensions, metric_type)

    def add_size(
        self,
        name: str,
        value: float,
        idx: Any = None,
        unit: str = "MB",
        dimensions: Any = None,
        metric_type: MetricTypes = MetricTypes.GAUGE,
    ) -> None:
        self.add_metric(name, value, unit, idx, dimensions, metric_type)

    def add_percent(
        self,
        name: str,
        value: float,
        idx: Any = None,
        dimensions: Any = None,
        metric_type: MetricTypes = MetricTypes.GAUGE,
    ) -> None:
        self.add_metric(name, value, "percent", idx, dimensions, metric_type)
