"""TorchServe's text form of its metric families (servekit.exposition), against lines TorchServe 0.12 printed."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from servekit.exposition import Family, java_double, write


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0.0"),
        (2, "2.0"),
        (27.9, "27.9"),
        (23019.23046875, "23019.23046875"),
        (0.001, "0.001"),
        (9999999.0, "9999999.0"),
        (1e7, "1.0E7"),
        (12345678.5, "1.23456785E7"),
        (0.0001, "1.0E-4"),
        (-1.5e-7, "-1.5E-7"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_exposition_java_double_writes_numbers_as_java(value: float, text: str) -> None:
    assert java_double(value) == text


def test_exposition_write_prints_families_as_torchserve_with_empty_ones() -> None:
    requests = Family("Requests2XX", "counter", "Count")
    requests.add((("Level", "Host"), ("Hostname", "vm")), 1)
    requests.add((("Level", "Host"), ("Hostname", "vm")), 1)
    empty = Family("Requests5XX", "counter", "Count")
    # as TorchServe 0.12 printed them on a fresh server after two /ping
    assert write([requests, empty], set()) == (
        "# HELP Requests2XX Torchserve prometheus counter metric with unit: Count\n"
        "# TYPE Requests2XX counter\n"
        'Requests2XX{Level="Host",Hostname="vm",} 2.0\n'
        "# HELP Requests5XX Torchserve prometheus counter metric with unit: Count\n"
        "# TYPE Requests5XX counter\n"
    )
    # filtered, a family without a sample of that name is left out, as TorchServe does
    assert write([requests, empty], {"Requests5XX"}) == ""


def test_exposition_write_histograms_and_escapes_label_values() -> None:
    sizes = Family("SizeHist", "histogram", "Megabytes")
    labels = (("Stage", 'a"b\\c\nd'), ("Hostname", "vm"))
    sizes.add(labels, 0.3)
    sizes.add(labels, 20)
    text = write([sizes], set())
    assert 'SizeHist_bucket{Stage="a\\"b\\\\c\\nd",Hostname="vm",le="0.25",} 0.0\n' in text
    assert 'SizeHist_bucket{Stage="a\\"b\\\\c\\nd",Hostname="vm",le="10.0",} 1.0\n' in text
    assert text.endswith(
        'SizeHist_bucket{Stage="a\\"b\\\\c\\nd",Hostname="vm",le="+Inf",} 2.0\n'
        'SizeHist_count{Stage="a\\"b\\\\c\\nd",Hostname="vm",} 2.0\n'
        'SizeHist_sum{Stage="a\\"b\\\\c\\nd",Hostname="vm",} 20.3\n'
    )
    (parsed,) = text_string_to_metric_families(text)
    assert parsed.type == "histogram" and parsed.samples[0].labels["Stage"] == 'a"b\\c\nd'
    assert write([sizes], {"SizeHist_sum"}).splitlines()[2:] == [
        'SizeHist_sum{Stage="a\\"b\\\\c\\nd",Hostname="vm",} 20.3'
    ]
