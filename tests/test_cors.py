"""CORS as TorchServe 0.12 does it (``cors_allowed_origin|methods|headers``): the configured headers, as written, on
every response of the three ports, whatever the request's ``Origin``; a preflight ``OPTIONS`` answered by the route it
names, as any ``OPTIONS`` there (200 with an OpenAPI description, the health or the metrics, where TorchServe answers
200; 404 or 405 where it does)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from servekit.config import load_settings, settings_from
from servekit.errors import ConfigError
from servekit.server import cors_headers
from tests.helpers import Server, make_archive, running_server

NOOP = """
def handle(data, context):
    if data is None:
        return None
    return ["ok" for _ in data]
"""
CORS = {
    "cors_allowed_origin": "https://app.example",
    "cors_allowed_methods": "GET, POST, PUT, OPTIONS",
    "cors_allowed_headers": "X-Custom-Header, Content-Type",
}
EXPECTED = {
    "access-control-allow-origin": "https://app.example",
    "access-control-allow-methods": "GET, POST, PUT, OPTIONS",
    "access-control-allow-headers": "X-Custom-Header, Content-Type",
}
PREFLIGHT = {
    "Origin": "https://other.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("cors")
    store = root / "store"
    store.mkdir()
    make_archive(store, "noop", NOOP, work=root / "work")
    with running_server(root / "run", store, config=CORS) as server:
        yield server


def cors_of(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


def url(server: Server, port: str, path: str) -> str:
    return {"inference": server.inference, "management": server.management, "metrics": server.metrics}[port] + path


@pytest.mark.parametrize(
    ("method", "port", "path", "status"),
    [
        ("GET", "inference", "/ping", 200),
        ("POST", "inference", "/predictions/noop", 200),  # the direct route (servekit.api.http)
        ("POST", "inference", "/predictions/noop/1.0", 200),
        ("POST", "inference", "/predictions/nope", 404),
        ("POST", "inference", "/v2/models/noop/infer", 400),
        ("GET", "inference", "/nothing/here/at/all", 404),
        ("GET", "management", "/models", 200),
        ("GET", "management", "/models/noop", 200),
        ("DELETE", "management", "/models/noop/1.0", 405),  # no --enable-model-api
        ("GET", "metrics", "/metrics", 200),
        ("GET", "metrics", "/nothing", 404),
    ],
)
def test_cors_headers_on_every_response_of_the_three_ports(
    server: Server, method: str, port: str, path: str, status: int
) -> None:
    response = httpx.request(method, url(server, port, path), content=b"x" if method == "POST" else None)
    assert response.status_code == status
    assert cors_of(response) == EXPECTED


def test_cors_headers_do_not_depend_on_the_origin(server: Server) -> None:
    for origin in ("https://app.example", "https://elsewhere.example", None):
        headers = {"Origin": origin} if origin else {}
        assert cors_of(httpx.get(server.inference + "/ping", headers=headers)) == EXPECTED  # as TorchServe


def test_cors_headers_on_a_413_of_the_direct_route(server: Server) -> None:
    response = server.post("/predictions/noop", content=b"x" * 7_000_000)
    assert response.status_code == 413 and cors_of(response) == EXPECTED  # TorchServe's 413 has none


@pytest.mark.parametrize(
    ("port", "path", "status", "shows"),
    [
        ("inference", "/", 200, '"openapi"'),
        ("inference", "/api-description", 200, '"openapi"'),
        ("inference", "/ping", 200, "Healthy"),
        ("inference", "/predictions/noop", 200, "RESTful API for: noop"),
        ("inference", "/predictions/noop/1.0", 200, "RESTful API for: noop"),
        ("inference", "/predictions/nope", 404, "Model not found: nope"),
        ("inference", "/explanations/noop", 200, "RESTful API for: noop"),
        ("inference", "/v1/models/noop:predict", 200, "RESTful API for: noop"),
        ("inference", "/v1/models/noop:explain", 200, "RESTful API for: noop"),
        ("inference", "/v2/models/noop/infer", 200, "RESTful API for: noop"),
        ("inference", "/v2/models/noop/versions/1.0/infer", 200, "RESTful API for: noop"),
        ("inference", "/v2/models/noop/explain", 200, "RESTful API for: noop"),
        ("inference", "/invocations", 200, "RESTful API for: noop"),
        ("inference", "/noop/predict", 200, "RESTful API for: noop"),
        ("inference", "/models/noop/invoke", 200, "RESTful API for: noop"),
        ("management", "/", 200, '"openapi"'),
        ("management", "/api-description", 200, '"openapi"'),
        ("management", "/models", 405, "MethodNotAllowedException"),
        ("management", "/models/noop", 200, "RESTful Management API for: noop"),
        ("management", "/models/noop/1.0", 200, "RESTful Management API for: noop"),
        ("management", "/models/noop/1.0/set-default", 200, "RESTful Management API for: noop"),
        ("management", "/models/nope", 404, "nope"),
        ("management", "/models/noop/9.9", 404, "noop"),
        ("metrics", "/", 200, '"openapi"'),
        ("metrics", "/api-description", 200, '"openapi"'),
        ("metrics", "/metrics", 200, "Requests2XX"),
    ],
)
def test_cors_preflight_is_answered_by_the_route_as_torchserve_does(
    server: Server, port: str, path: str, status: int, shows: str
) -> None:
    """Statuses checked against TorchServe 0.12 with the same keys: it has no preflight handler of its own, so a
    preflight gets what any ``OPTIONS`` there gets, with the CORS headers."""
    response = httpx.options(url(server, port, path), headers=PREFLIGHT)
    assert response.status_code == status, response.text
    assert shows in response.text
    assert cors_of(response) == EXPECTED


def test_cors_model_management_description_names_its_routes(server: Server) -> None:
    description = httpx.options(server.management + "/models/noop").json()
    assert set(description["paths"]) == {
        "/models/{name}",
        "/models/{name}/{version}",
        "/models/{name}/{version}/set-default",
    }
    assert {"get", "put", "delete"} <= set(description["paths"]["/models/{name}/{version}"])


def test_cors_headers_only_the_keys_set() -> None:
    assert cors_headers(settings_from({})) == []
    only_origin = settings_from({"cors_allowed_origin": "*"})
    assert cors_headers(only_origin) == [("access-control-allow-origin", "*")]


@pytest.mark.parametrize("key", sorted(CORS))
def test_cors_value_that_is_not_a_header_value_is_config_error(key: str) -> None:
    with pytest.raises(ConfigError, match=f"{key}: not a valid HTTP header value"):
        settings_from({key: "https://a.example\r\nSet-Cookie: x=1"})


def test_cors_keys_read_from_ts_variables(tmp_path: Path) -> None:
    config = tmp_path / "config.properties"
    config.write_text("enable_envvars_config=true\ncors_allowed_origin=https://file.example\n")
    settings = load_settings(config, environ={"TS_CORS_ALLOWED_ORIGIN": "*", "TS_CORS_ALLOWED_METHODS": "GET"})
    assert (settings.cors_allowed_origin, settings.cors_allowed_methods) == ("*", "GET")
