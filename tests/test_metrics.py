"""Metrics and logs after real traffic: /metrics parsed with prometheus_client's parser must count exactly what was
sent, errors and timeouts included; TorchServe's families print line for line as TorchServe prints them; handler
metrics appear; label sets stay bounded; logs say what happened."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from servekit.metrics import Metrics
from servekit.protocol import MetricRecord
from tests.helpers import Server, make_archive, running_server, serving_one

HANDLER = """
import time

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.utils.util import PredictionException


class Counted:
    def initialize(self, context):
        context.metrics.add_metric_to_cache("StageTime", "ms", ["Stage"], MetricTypes.GAUGE)
        context.metrics.add_metric_to_cache("SizeHist", "MB", ["Stage"], MetricTypes.HISTOGRAM)

    def handle(self, data, context):
        print("hello from handler", len(data), flush=True)
        out = []
        for row in data:
            action = row["body"]
            if action == "bad":
                raise PredictionException("bad input", 400)
            if action == "boom":
                raise RuntimeError("boom")
            if action == "slow":
                time.sleep(1.0)
            context.metrics.add_counter("ItemsSeen", 2, dimensions=[Dimension("Kind", "text")])
            context.metrics.get_metric("StageTime", MetricTypes.GAUGE).add_or_update(7.5, ["pre"])
            context.metrics.get_metric("SizeHist", MetricTypes.HISTOGRAM).add_or_update(0.3, ["pre"])
            context.metrics.add_error("Mishaps", 1)
            out.append(action)
        return out
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving_one(tmp_path_factory.mktemp("metrics"), "m", HANDLER, "batchSize: 4\n") as srv:
        yield srv


def send(server: Server, action: str, **headers: str) -> httpx.Response:
    return server.post("/predictions/m", content=action.encode(), headers={"content-type": "text/plain", **headers})


def scrape(server: Server, query: str = "") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples by name as written (as Prometheus reads them: prometheus_client's parser adds ``_total`` to a
    counter's samples) and labels."""
    text = httpx.get(f"{server.metrics}/metrics{query}").text
    written = {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if not line.startswith("#")}
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name if sample.name in written else sample.name.removesuffix("_total")
            samples[(name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()]
    assert matches, f"no sample {name} {labels}"
    return sum(matches)


@pytest.fixture(scope="module")
def traffic(server: Server) -> dict[str, list[httpx.Response]]:
    """Real traffic with known outcomes, sent once for the tests of this module."""
    sent: dict[str, list[httpx.Response]] = {"ok": [], "bad": [], "boom": [], "timeout": [], "unknown": []}
    sent["ok"] = [send(server, "ok") for _ in range(10)]
    sent["bad"] = [send(server, "bad") for _ in range(2)]
    sent["boom"] = [send(server, "boom") for _ in range(3)]
    slow = threading.Thread(target=send, args=(server, "slow"))
    slow.start()
    time.sleep(0.3)
    sent["timeout"] = [send(server, "ok", **{"x-servekit-timeout-ms": "100"})]
    slow.join()
    with httpx.Client(base_url=server.inference) as client:
        sent["unknown"] = [client.post(f"/predictions/scan{i}", content=b"x") for i in range(1000)]
    return sent


def test_metrics_count_every_outcome_exactly(server: Server, traffic: dict[str, list[httpx.Response]]) -> None:
    assert [r.status_code for r in traffic["ok"]] == [200] * 10
    assert {r.status_code for r in traffic["bad"]} == {400}
    assert {r.status_code for r in traffic["boom"]} == {500}
    assert traffic["timeout"][0].status_code == 504
    s = scrape(server)
    labels = {"model_name": "m", "model_version": "1.0"}
    assert value(s, "servekit_requests_total", outcome="success", **labels) == 11  # 10 ok + the slow one
    assert value(s, "servekit_requests_total", outcome="client_error", **labels) == 2
    assert value(s, "servekit_requests_total", outcome="server_error", **labels) == 3
    assert value(s, "servekit_requests_total", outcome="timed_out", **labels) == 1
    assert value(s, "servekit_request_latency_seconds_count", **labels) == 17
    assert value(s, "servekit_request_latency_seconds_sum", **labels) >= 1.0  # the slow request alone took 1 s
    # the timed-out request never reached a worker: 16 requests were dispatched, in batches
    assert value(s, "servekit_queue_time_seconds_count", **labels) == 16
    assert value(s, "servekit_batch_size_sum", **labels) == 16
    batches = value(s, "servekit_batch_size_count", **labels)
    assert value(s, "servekit_handler_time_seconds_count", **labels) == batches
    assert value(s, "servekit_handler_time_seconds_sum", **labels) >= 1.0
    ts_labels = {"model_name": "m", "model_version": "default"}
    assert value(s, "ts_inference_requests_total", **ts_labels) == 17
    assert value(s, "ts_inference_latency_microseconds", **ts_labels) >= 1e6
    assert value(s, "ts_queue_latency_microseconds", model_name="m") > 0


def test_metrics_torchserve_http_and_host_metrics(server: Server, traffic: dict[str, list[httpx.Response]]) -> None:
    s = scrape(server)
    assert value(s, "Requests2XX", Level="Host") >= 11
    assert value(s, "Requests4XX", Level="Host") >= 1002  # 2 bad inputs and 1000 unknown models
    assert value(s, "Requests5XX", Level="Host") >= 4  # 3 handler errors and the timeout
    gauges = ("CPUUtilization", "MemoryUsed", "MemoryUtilization", "DiskUsage", "DiskAvailable", "QueueTime")
    for gauge in (*gauges, "WorkerThreadTime"):
        assert value(s, gauge, Level="Host") >= 0
    load = [ls for (n, ls), _ in s.items() if n == "WorkerLoadTime"]
    assert load and dict(load[0])["WorkerName"].endswith("-m_1.0")


def test_metrics_handler_metrics_appear(server: Server, traffic: dict[str, list[httpx.Response]]) -> None:
    s = scrape(server)
    assert value(s, "ItemsSeen", ModelName="m", Level="Model", Kind="text") == 2 * 11
    assert value(s, "StageTime", Stage="pre") == 7.5
    assert value(s, "SizeHist_count", Stage="pre") == 11
    assert value(s, "SizeHist_bucket", Stage="pre", le="0.25") == 0
    assert value(s, "SizeHist_bucket", Stage="pre", le="0.5") == 11
    assert value(s, "Mishaps", Level="Error") == 11
    assert value(s, "PredictionTime", ModelName="m") > 0


# the Java Prometheus client's default buckets, as it writes them
TS_BUCKETS = [
    "0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.25", "0.5", "0.75", "1.0",
    "2.5", "5.0", "7.5", "10.0", r"\+Inf",
]  # fmt: skip


def family(name: str, kind: str, unit: str, *samples: str) -> str:
    """A regular expression for a whole family as TorchServe prints it: HELP, TYPE and the sample lines (regular
    expressions, ``H`` standing for this host's quoted name)."""
    host = '"' + re.escape(socket.gethostname()) + '"'
    header = [f"# HELP {name} Torchserve prometheus {kind} metric with unit: {unit}", f"# TYPE {name} {kind}"]
    return "^" + "\n".join([*map(re.escape, header), *(s.replace("=H,", f"={host},") for s in samples)]) + "$"


def test_metrics_torchserve_families_print_as_torchserve(
    server: Server, traffic: dict[str, list[httpx.Response]]
) -> None:
    """Line for line as TorchServe 0.12 prints them (its Java Prometheus client 0.9.0): HELP and TYPE, the labels in
    its order each followed by a comma, numbers as Java writes them, counters under their exact names."""
    response = httpx.get(f"{server.metrics}/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = response.text
    # the regular expression of TorchServe's own tests (its Postman inference collection)
    assert re.search(r'^Requests2XX\{Level="Host",Hostname=".*",\} \d+\.\d+$', text, re.MULTILINE)
    families = [
        family("Requests4XX", "counter", "Count", r'Requests4XX\{Level="Host",Hostname=H,\} 1\d{3}\.0'),
        family(
            "ts_inference_requests_total",
            "counter",
            "Count",
            r'ts_inference_requests_total\{model_name="m",model_version="default",hostname=H,\} 17\.0',
        ),
        family(
            "ts_inference_latency_microseconds",
            "counter",
            "Microseconds",
            # at least the slow request's 1 s: 10^6 to 10^7 plainly, past 10^7 as Java writes it
            r'ts_inference_latency_microseconds\{model_name="m",model_version="default",hostname=H,\} '
            r"(\d{7}\.\d+|\d\.\d+E\d+)",
        ),
        family("QueueTime", "gauge", "Milliseconds", r'QueueTime\{Level="Host",Hostname=H,\} \d+\.0'),
        family(
            "WorkerLoadTime",
            "gauge",
            "Milliseconds",
            r'WorkerLoadTime\{WorkerName="W-\d+-m_1\.0",Level="Host",Hostname=H,\} \d+\.0',
        ),
        family("DiskUtilization", "gauge", "Percent", r'DiskUtilization\{Level="Host",Hostname=H,\} \d+\.\d'),
        family("HandlerTime", "gauge", "ms"),  # this handler is no BaseHandler: no series, and yet printed
        family("PredictionTime", "gauge", "ms", r'PredictionTime\{ModelName="m",Level="Model",Hostname=H,\} \d+\.\d+'),
        family(
            "ItemsSeen", "counter", "Count", r'ItemsSeen\{Kind="text",ModelName="m",Level="Model",Hostname=H,\} 22\.0'
        ),
        family("StageTime", "gauge", "Milliseconds", r'StageTime\{Stage="pre",Hostname=H,\} 7\.5'),
        family(
            "SizeHist",
            "histogram",
            "Megabytes",
            *(
                rf'SizeHist_bucket\{{Stage="pre",Hostname=H,le="{le}",\}} {"0.0" if i < 7 else "11.0"}'
                for i, le in enumerate(TS_BUCKETS)
            ),
            r'SizeHist_count\{Stage="pre",Hostname=H,\} 11\.0',
            r'SizeHist_sum\{Stage="pre",Hostname=H,\} 3\.\d+',
        ),
        family("Mishaps", "counter", "unit", r'Mishaps\{Level="Error",Hostname=H,\} 11\.0'),
    ]
    for pattern in families:
        assert re.search(pattern, text, re.MULTILINE), pattern
    assert not re.search(r"^[A-Z]\w*_(total|created)|^ts_\w*_created", text, re.MULTILINE)


def test_metrics_drop_handler_metrics_that_would_break_the_exposition() -> None:
    metrics = Metrics()
    model = metrics.model("m", "1.0")
    records = [
        MetricRecord("QueueTime", 1, "ms", "gauge"),  # a front-end family's name
        MetricRecord("servekit_batch_size", 1, "", "gauge"),
        MetricRecord("Bad", 1, "", "gauge", (("bad-label", "x"),)),
        MetricRecord("Twice", 1, "", "gauge", (("Hostname", "x"),)),
        MetricRecord("Hist", 1, "", "histogram", (("le", "1"),)),
        MetricRecord("Down", -1, "Count", "counter"),
        MetricRecord("Kept", 2, "Count", "counter", (("Kind", "a"),)),
    ]
    model.batch(1, 1.0, 2.0, records)
    text = metrics.render().decode()
    assert not re.search(r"^(QueueTime|servekit_batch_size|Bad|Twice|Hist|Down)\b.* 1\.0$", text, re.MULTILINE)
    assert re.search(r'^Kept\{Kind="a",Hostname=".*",\} 2\.0$', text, re.MULTILINE)
    assert {f.name for f in text_string_to_metric_families(text)} >= {"Kept", "QueueTime", "servekit_batch_size"}


def test_metrics_gauges_read_the_live_state(server: Server, traffic: dict[str, list[httpx.Response]]) -> None:
    s = scrape(server)
    labels = {"model_name": "m", "model_version": "1.0"}
    assert value(s, "servekit_workers_alive", **labels) == 1
    assert value(s, "servekit_workers_busy", **labels) == 0
    assert value(s, "servekit_queue_depth", **labels) == 0
    assert value(s, "servekit_worker_restarts_total", **labels) == 0


def test_metrics_labels_stay_bounded_after_unknown_model_scan(
    server: Server, traffic: dict[str, list[httpx.Response]]
) -> None:
    assert {r.status_code for r in traffic["unknown"]} == {404}
    text = httpx.get(f"{server.metrics}/metrics").text
    assert "scan" not in text
    assert len(text.splitlines()) < 400


def test_metrics_name_filter_returns_only_those_families(
    server: Server, traffic: dict[str, list[httpx.Response]]
) -> None:
    names = {n for n, _ in scrape(server, "?name[]=servekit_batch_size&name[]=Requests2XX&name[]=SizeHist_count")}
    assert names == {
        "servekit_batch_size_bucket",
        "servekit_batch_size_count",
        "servekit_batch_size_sum",
        "Requests2XX",
        "SizeHist_count",  # TorchServe filters by sample name
    }


def test_metrics_logs_access_worker_output_and_errors_with_request_id(
    server: Server, traffic: dict[str, list[httpx.Response]]
) -> None:
    log = server.log_text()
    assert '"POST /predictions/m HTTP/1.1" 200' in log
    assert '"POST /predictions/scan1 HTTP/1.1" 404' in log
    assert "-m] hello from handler" in log
    failed = traffic["boom"][0].headers["x-request-id"]
    assert sum(failed in line for line in log.splitlines()) == 1


def test_metrics_json_logs(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_archive(store, "m", HANDLER, work=tmp_path / "work")
    with running_server(tmp_path / "run", store, config={"log_format": "json"}) as srv:
        assert send(srv, "ok").status_code == 200
        time.sleep(0.3)
        lines = [json.loads(line) for line in srv.log_text().splitlines() if line.startswith("{")]
    loggers = {entry["logger"] for entry in lines}
    assert {"servekit.access", "servekit.worker"} <= loggers
    assert any(entry.get("worker", "").endswith("-m") for entry in lines)
