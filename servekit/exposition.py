"""TorchServe's metric families, written byte for byte as TorchServe 0.12 writes them on ``/metrics``.

TorchServe registers each metric with the Java Prometheus client 0.9.0 and prints it with its ``TextFormat.write004``
(``frontend/server/src/main/java/org/pytorch/serve/metrics/format/prometheous/``)::

    # HELP Requests2XX Torchserve prometheus counter metric with unit: Count
    # TYPE Requests2XX counter
    Requests2XX{Level="Host",Hostname="vm",} 2.0

Labels in the order the metric declares them, each followed by a comma; values as Java's ``Double.toString``
(``2.0``, ``1.2345678E7``); counters under their exact names (no ``_total`` added, no ``_created``); histograms with
the client's default buckets and no ``_created``; a family with no series yet is still printed (its two comment lines)
unless ``name[]`` filters. Prometheus's text parser reads this form (a trailing comma is allowed in a label set).

Values are kept as numbers and formatted only when ``/metrics`` is read. Standard library only.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from decimal import Decimal

Labels = tuple[tuple[str, str], ...]  # (name, value) pairs, in the order they are printed

# io.prometheus.client.Histogram's default buckets (TorchServe gives none)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, math.inf)


def java_double(value: float) -> str:
    """``value`` as the Java client writes it (``Collector.doubleToGoString``: ``Double.toString`` but for ``+Inf``,
    ``-Inf`` and ``NaN``): ``0.0``, ``2.0``, ``0.25`` from 10^-3 up to 10^7, else ``1.2345678E7``, ``1.0E-4``."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    value = float(value)
    if value == 0 or 1e-3 <= abs(value) < 1e7:
        return repr(value)  # the shortest digits that read back, and at least one after the point, as in Java
    sign, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)
    mantissa = "".join(map(str, digits))
    return f"{'-' if sign else ''}{mantissa[0]}.{mantissa[1:] or '0'}E{exponent + len(digits) - 1}"


def _escape(text: str, quote: bool) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quote else text


def _labels(labels: Labels) -> str:
    return "{" + "".join(f'{name}="{_escape(value, True)}",' for name, value in labels) + "}" if labels else ""


class Family:
    """One metric family: ``kind`` "counter" adds up, "gauge" keeps the last value, "histogram" counts observations
    into ``BUCKETS``. Its series keep the order in which they first appeared."""

    __slots__ = ("_lock", "_series", "help", "kind", "name")

    def __init__(self, name: str, kind: str, unit: str) -> None:
        self.name = name
        self.kind = kind
        self.help = f"Torchserve prometheus {kind} metric with unit: {unit}"
        self._series: dict[Labels, list[float]] = {}
        self._lock = threading.Lock()

    def __contains__(self, labels: Labels) -> bool:
        return labels in self._series

    def add(self, labels: Labels, value: float) -> None:
        """Record ``value`` as the family's kind does: add it, set it, or observe it."""
        if self.kind == "gauge":
            self._series[labels] = [value]
            return
        with self._lock:
            if self.kind == "counter":
                series = self._series.setdefault(labels, [0.0])
                series[0] += value
                return
            # a histogram: the observations per bucket (not cumulative), their count and their sum
            series = self._series.setdefault(labels, [0.0] * (len(BUCKETS) + 2))
            series[next(i for i, bound in enumerate(BUCKETS) if value <= bound)] += 1
            series[-2] += 1
            series[-1] += value

    def lines(self, names: set[str]) -> list[str]:
        """The sample lines, only those named in ``names`` (the family's name names them all) if it is not empty."""
        series = list(self._series.items())
        out: list[str] = []
        if self.kind != "histogram":
            if not names or self.name in names:
                out = [f"{self.name}{_labels(labels)} {java_double(values[0])}" for labels, values in series]
            return out
        wanted = {s for s in ("_bucket", "_count", "_sum") if not names or self.name in names or self.name + s in names}
        for labels, values in series:
            if "_bucket" in wanted:
                cumulative = 0.0
                for bound, count in zip(BUCKETS, values, strict=False):
                    cumulative += count
                    le = (*labels, ("le", java_double(bound)))
                    out.append(f"{self.name}_bucket{_labels(le)} {java_double(cumulative)}")
            if "_count" in wanted:
                out.append(f"{self.name}_count{_labels(labels)} {java_double(values[-2])}")
            if "_sum" in wanted:
                out.append(f"{self.name}_sum{_labels(labels)} {java_double(values[-1])}")
        return out


def write(families: Iterable[Family], names: set[str]) -> str:
    """The families as TorchServe prints them; with ``names`` (``name[]``), only the samples so named and the families
    that have one, as TorchServe does."""
    out: list[str] = []
    for family in families:
        lines = family.lines(names)
        if names and not lines:
            continue
        out.append(f"# HELP {family.name} {_escape(family.help, False)}")
        out.append(f"# TYPE {family.name} {family.kind}")
        out.extend(lines)
    return "".join(line + "\n" for line in out)
