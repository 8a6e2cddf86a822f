"""The monitoring configs in ``configs/``: the Prometheus scrape config points at servekit's metrics port, and every
metric and label that the Grafana dashboard and the example alert rules query exists in a live server's /metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import make_archive, running_server

CONFIGS = Path(__file__).parent.parent / "configs"
PROMETHEUS = CONFIGS / "prometheus.yml"
DASHBOARD = CONFIGS / "grafana-dashboard.json"
HANDLER = """
def handle(data, context):
    if data is None:
        return None
    if any(row["body"] == "boom" for row in data):
        raise RuntimeError("boom")
    return ["ok"] * len(data)
"""

STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
# an identifier not inside a number (1e-9), a Grafana variable ($model) or a longer name
IDENT = re.compile(r"(?<![a-zA-Z0-9_:.$])[a-zA-Z_:][a-zA-Z0-9_:]*")
KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "inf", "nan",
}  # fmt: skip
SYNTHETIC = {"up"}  # series that Prometheus itself adds to every scrape


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside strings, label matchers, ranges and grouping
    clauses that are neither function calls (followed by ``(``) nor keywords."""
    bare = STRING.sub('""', expr)
    bare = GROUPING.sub(" ", bare)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    names = set()
    for match in IDENT.finditer(bare):
        if not re.match(r"\s*\(", bare[match.end() :]) and match.group() not in KEYWORDS:
            names.add(match.group())
    return names


def label_uses(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """The label names each selector matches on (``{metric: labels}``), and those that ``by (...)`` groups by."""
    bare = STRING.sub('""', expr)
    matched: dict[str, set[str]] = {}
    for name, matchers in SELECTOR.findall(bare):
        matched.setdefault(name, set()).update(MATCHER.findall(matchers))
    grouped = {label.strip() for kind, labels in GROUPING.findall(bare) if kind == "by" for label in labels.split(",")}
    return matched, grouped - {""}


def balanced(expr: str) -> bool:
    """Whether the parentheses, brackets and braces outside strings pair up."""
    stack: list[str] = []
    for char in STRING.sub('""', expr):
        if char in "([{":
            stack.append({"(": ")", "[": "]", "{": "}"}[char])
        elif char in ")]}" and (not stack or stack.pop() != char):
            return False
    return not stack


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def panel_exprs() -> dict[str, list[str]]:
    """Every query of the dashboard by panel title, template variable queries included."""
    exprs: dict[str, list[str]] = {}
    for panel in dashboard()["panels"]:
        exprs[panel["title"]] = [t["expr"] for t in panel.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            metric, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query).groups()  # type: ignore[union-attr]
            exprs[f"${variable['name']}"] = [f"sum by ({label}) ({metric})"]
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    """The example rule file commented out in prometheus.yml, between its markers."""
    text = PROMETHEUS.read_text()
    block = text.split("# --- servekit-alerts.yml ---\n", 1)[1].split("# --- end ---", 1)[0]
    rules = yaml.safe_load("\n".join(line.removeprefix("#").removeprefix(" ") for line in block.splitlines()))
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_configs_prometheus_scrapes_the_metrics_port() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "servekit"]
    assert job["metrics_path"] == "/metrics"
    assert job["scrape_interval"] == "15s"
    assert [t for c in job["static_configs"] for t in c["targets"]] == ["127.0.0.1:8082"]
    # the same port as the example server config
    assert "metrics_address=http://127.0.0.1:8082" in (CONFIGS / "config.properties").read_text().splitlines()


def test_configs_example_alert_rules_parse() -> None:
    rules = alert_rules()
    assert len(rules) >= 3
    for rule in rules:
        assert re.fullmatch(r"Servekit[A-Za-z0-9]+", rule["alert"])
        assert rule["expr"].strip() and balanced(rule["expr"]) and rule["annotations"]["summary"]


def test_configs_dashboard_panels_have_unique_ids_and_queries() -> None:
    board = dashboard()
    assert board["schemaVersion"] == 39
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":  # rows only group the panels that follow them
            assert not panel.get("targets") and not panel["panels"]
            continue
        assert panel["type"] in {"timeseries", "stat", "heatmap"}, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() and balanced(t["expr"]) for t in panel["targets"]), panel[
            "title"
        ]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["query"]["query"] == "label_values(servekit_requests_total, model_name)"
    assert variables["version"]["query"]["query"].startswith("label_values(servekit_requests_total{")
    assert "TorchServe-compatible" in {panel["title"] for panel in panels if panel["type"] == "row"}


def test_configs_promql_names_are_extracted() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model_name) (rate(a_bucket{model_name=~"$model", x="b{c}"}[$__range])))'
        " / clamp_min(sum without (d) (b_total), 1e-9) or on (e) vector(0) + c offset 5m"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert label_uses(expr) == ({"a_bucket": {"model_name", "x"}}, {"le", "model_name"})
    assert balanced(expr) and not balanced("sum(rate(a[5m])") and not balanced('rate(a{b="x"]}[5m])')


@pytest.fixture(scope="module")
def live_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, set[str]]]]:
    """Sample name -> (family type, label names) of a real server after successes, a 404 and a 500."""
    root = tmp_path_factory.mktemp("configs")
    store = root / "store"
    store.mkdir()
    make_archive(store, "m", HANDLER, work=root / "work")
    with running_server(root / "run", store) as server:
        headers = {"content-type": "text/plain"}
        for _ in range(3):
            assert server.post("/predictions/m", content=b"ok", headers=headers).status_code == 200
        assert server.post("/predictions/m", content=b"boom", headers=headers).status_code == 500
        assert server.post("/predictions/missing", content=b"ok", headers=headers).status_code == 404
        text = httpx.get(f"{server.metrics}/metrics").text
    # names as written, as Prometheus reads them: prometheus_client's parser adds "_total" to a counter's samples
    # (TorchServe's counters Requests2XX, ts_inference_latency_microseconds, ... have none)
    written = {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if not line.startswith("#")}
    samples: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name if sample.name in written else sample.name.removesuffix("_total")
            samples.setdefault(name, (family.type, set()))[1].update(sample.labels)
    yield samples


def family(name: str, samples: dict[str, tuple[str, set[str]]]) -> str:
    """A sample's metric family: a histogram's ``_bucket``, ``_sum`` and ``_count`` are one."""
    if samples[name][0] == "histogram":
        return re.sub(r"_(bucket|sum|count)$", "", name)
    return name


def check_expr(expr: str, samples: dict[str, tuple[str, set[str]]]) -> set[str]:
    """Assert that ``expr`` reads only live metrics, matches and groups only on their labels; return its names."""
    assert metric_names(expr), f"no metric in {expr!r}"
    names = metric_names(expr) - SYNTHETIC
    for name in names:
        assert name in samples, f"{name} (in {expr!r}) is not exposed"
        if name.endswith("_bucket"):
            assert samples[name][0] == "histogram", f"{name} is not a histogram's buckets"
    matched, grouped = label_uses(expr)
    for name, labels in matched.items():
        if name not in SYNTHETIC:
            assert labels <= samples[name][1] | {"job", "instance"}, f"{name} has no label {labels - samples[name][1]}"
    available = set().union(*(samples[n][1] for n in names)) | {"le", "job", "instance"}
    assert grouped <= available, f"grouping by {grouped - available} in {expr!r}"
    return names


def test_configs_dashboard_queries_only_live_metrics(live_metrics: dict[str, tuple[str, set[str]]]) -> None:
    used: set[str] = set()
    for title, exprs in panel_exprs().items():
        for expr in exprs:
            try:
                used |= check_expr(expr, live_metrics)
            except AssertionError as error:
                raise AssertionError(f"panel {title!r}: {error}") from None
    servekit = {family(n, live_metrics) for n in live_metrics if n.startswith("servekit_")}
    assert servekit - {family(n, live_metrics) for n in used} == set(), "servekit metrics missing on the dashboard"


def test_configs_alert_rules_query_only_live_metrics(live_metrics: dict[str, tuple[str, set[str]]]) -> None:
    for rule in alert_rules():
        check_expr(rule["expr"], live_metrics)
