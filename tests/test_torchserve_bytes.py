"""TorchServe 0.12's bytes (issue 14): JSON laid out as its Java front end (Gson, pretty) and its Python backend
(``json.dumps(value, indent=2)``) write it, its exception names in error bodies, its describe fields in its order, its
caching headers on every answer, ``HEAD`` on ``/predictions``, its 413 and its answer to an empty register URL. What
TorchServe 0.12 sends, observed in the differential test (tests/compat), is in each test's docstring."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from servekit import errors
from servekit.api.description import model_config_fields
from servekit.encoding import frontend_json, handler_json
from tests.helpers import Server, make_archive, running_server

HANDLER = """
class Kinds:
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        body = bytes(data[0].get("body") or b"").decode()
        values = {
            "dict": {"b": [1, 2.5, None], "a": "h\\u00e9llo", "tiny": 1e-05},
            "list": [[], {}, 0.1],
            "nan": float("nan"),
        }
        return [values.get(body, body) for _ in data]
"""

NO_CACHE = {
    "pragma": "no-cache",
    "cache-control": "no-cache; no-store, must-revalidate, private",
    "expires": "Thu, 01 Jan 1970 00:00:00 UTC",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("torchserve-bytes")
    store = root / "store"
    store.mkdir()
    config = "minWorkers: 1\nsequenceMaxIdleMSec: 60000\nmaxNumSequence: 4\nparallelType: pp\nparallelLevel: 2\n"
    make_archive(store, "kinds", HANDLER, work=root / "work", config=config)
    args = ("--disable-token-auth", "--ncs", "--enable-model-api")
    with running_server(root / "run", store, ("kinds.mar",), args=args) as srv:
        yield srv


@pytest.mark.parametrize(
    "value",
    [
        {"b": [1, 2.5, None], "a": "x"},
        [[], {}, [[]], {"k": {}}],
        [1e-05, 1e-7, 0.0001, 1e16, 1.5e300, -0.0, 123456.789],
        {"text": 'h\u00e9llo \u2028 \x7f \x01 "q" \\ e-5 0.00001'},
        {1: "int key", 2.5: "float key", None: "none key"},
        2**70,
        [True, False, None, "s", 3],
    ],
)
def test_handler_json_is_json_dumps_indent_2(value: Any) -> None:
    """TorchServe's Python backend: ``json.dumps(val, indent=2)`` (ts/protocol/otf_message_handler.py)."""
    assert handler_json(value) == json.dumps(value, indent=2).encode()


def test_handler_json_sends_nan_and_infinities_as_null() -> None:
    expected = b'[\n  null,\n  {\n    "x": null\n  },\n  1180591620717411303424\n]'
    assert handler_json([float("nan"), {"x": float("inf")}, 2**70]) == expected
    assert handler_json({"x": float("-inf"), "t": "\u00e9"}) == b'{\n  "x": null,\n  "t": "\\u00e9"\n}'


def test_handler_json_refuses_what_json_refuses() -> None:
    """``json.dumps`` raises for a set or a datetime; TorchServe answers those "Unsupported model output data type"."""
    import datetime

    for value in ({1, 2}, datetime.datetime(2026, 1, 1), object()):
        with pytest.raises(TypeError):
            handler_json(value)


def test_frontend_json_is_gson_pretty_printing() -> None:
    """Gson with ``setPrettyPrinting().disableHtmlEscaping()``, then the newline of ``sendJsonResponse``."""
    value = {"code": 404, "type": "T", "message": 'a "b" <c> & \u00e9 \u2028 \x01', "list": [1, []], "empty": {}}
    assert frontend_json(value) == (
        b'{\n  "code": 404,\n  "type": "T",\n  "message": "a \\"b\\" <c> & \xc3\xa9 \\u2028 \\u0001",\n'
        b'  "list": [\n    1,\n    []\n  ],\n  "empty": {}\n}\n'
    )


@pytest.mark.parametrize(
    ("error", "name"),
    [
        (errors.ModelNotFoundError("m"), "ModelNotFoundException"),
        (errors.ModelVersionNotFoundError("m", "2"), "ModelVersionNotFoundException"),
        (errors.ArchiveNotFoundError("x"), "ModelNotFoundException"),
        (errors.BadRequestError("x"), "BadRequestException"),
        (errors.ConflictError("x"), "ConflictStatusException"),
        (errors.HandlerError("x"), "InternalServerException"),
        (errors.WorkerStartError("m", "1"), "InternalServerException"),
        (errors.WorkerDiedError("x"), "InternalServerException"),
        (errors.QueueFullError("m", 1), "ServiceUnavailableException"),
        (errors.ServiceUnavailableError("x"), "ServiceUnavailableException"),
        (errors.RequestTimeoutError("x"), "RequestTimeoutException"),
        (errors.UnauthorizedError("x"), "InvalidKeyException"),
        (errors.DefaultVersionError("x"), "InvalidModelVersionException"),
        (errors.MethodNotAllowedError("x"), "MethodNotAllowedException"),
        (errors.ResponseTimeoutError("x"), "ResponseTimeoutError"),  # TorchServe has no such answer
        (errors.DeadlineExceededError("x"), "DeadlineExceededError"),
    ],
)
def test_error_type_is_torchserve_exception_name(error: errors.ServekitError, name: str) -> None:
    assert error.type_name == name
    assert errors.type_name(type(error).__name__) == name  # error bodies the worker writes by class name


def test_error_body_is_torchserve_bytes() -> None:
    """TorchServe: ``{\\n  "code": 404,\\n  "type": "ModelNotFoundException",\\n  "message": ...\\n}\\n``."""
    assert errors.error_body(404, "ModelNotFoundError", 'Model "m" not found') == (
        b'{\n  "code": 404,\n  "type": "ModelNotFoundException",\n  "message": "Model \\"m\\" not found"\n}\n'
    )
    assert errors.error_body(404, "ResourceNotFoundException", "x").startswith(b'{\n  "code": 404,\n  "type": "Res')


def test_model_config_fields_as_torchserve_reads_them() -> None:
    """TorchServe's ModelConfig and Model: defaults, lower bounds, and the sequence settings only with an idle time."""
    assert model_config_fields({}) == (
        {"maxRetryTimeoutInSec": 300, "clientTimeoutInMills": 0, "parallelType": "", "parallelLevel": 0},
        {
            "continuousBatching": False,
            "useJobTicket": False,
            "useVenv": False,
            "stateful": False,
            "sequenceMaxIdleMSec": 0,
            "sequenceTimeoutMSec": 0,
            "maxNumSequence": 0,
            "maxSequenceJobQueueSize": 0,
        },
    )
    config = {
        "maxRetryTimeoutInSec": -5,
        "clientTimeoutInMills": "x",
        "parallelType": "TP",
        "torchrun": {"nproc-per-node": 4},
        "continuousBatching": True,
        "useJobTicket": "yes",
        "sequenceBatching": True,
        "sequenceMaxIdleMSec": 10,
        "maxSequenceJobQueueSize": 0,
    }
    before, after = model_config_fields(config)
    assert before == {"maxRetryTimeoutInSec": 0, "clientTimeoutInMills": 0, "parallelType": "tp", "parallelLevel": 4}
    assert after["continuousBatching"] and after["stateful"] and not after["useJobTicket"]
    assert (after["sequenceMaxIdleMSec"], after["maxNumSequence"], after["maxSequenceJobQueueSize"]) == (10, 1, 1)


def test_ping_is_torchserve_bytes_with_its_caching_headers(server: Server) -> None:
    response = httpx.get(server.inference + "/ping", timeout=10)
    assert response.content == b'{\n  "status": "Healthy"\n}\n'
    assert response.headers["content-type"] == "application/json"
    assert {name: response.headers.get(name) for name in NO_CACHE} == NO_CACHE


@pytest.mark.parametrize("port", ["inference", "management", "metrics"])
def test_every_answer_carries_torchserve_caching_headers(server: Server, port: str) -> None:
    """TorchServe's ``sendHttpResponse`` sets them on every answer, errors and predictions included."""
    paths = {"inference": "/predictions/kinds", "management": "/models/missing", "metrics": "/metrics"}
    response = httpx.post(server.inference + paths[port], content=b"x", timeout=30) if port == "inference" else None
    response = response or httpx.get(getattr(server, port) + paths[port], timeout=30)
    assert {name: response.headers.get_list(name) for name in NO_CACHE} == {k: [v] for k, v in NO_CACHE.items()}


def test_dict_results_are_json_dumps_indent_2(server: Server) -> None:
    response = httpx.post(server.inference + "/predictions/kinds", content=b"dict", timeout=30)
    expected = b'{\n  "b": [\n    1,\n    2.5,\n    null\n  ],\n  "a": "h\\u00e9llo",\n  "tiny": 1e-05\n}'
    assert response.content == expected
    response = httpx.post(server.inference + "/predictions/kinds", content=b"nan", timeout=30)
    assert response.content == b"null"


def test_error_bodies_are_torchserve_bytes(server: Server) -> None:
    """TorchServe: ``ModelNotFoundException``, indented by 2, with a final newline."""
    response = httpx.post(server.inference + "/predictions/missing", content=b"x", timeout=30)
    assert response.status_code == 404
    assert response.content == (
        b'{\n  "code": 404,\n  "type": "ModelNotFoundException",\n  "message": "Model not found: missing"\n}\n'
    )
    response = httpx.get(server.management + "/models/kinds/9.9", timeout=30)
    assert response.json()["type"] == "ModelVersionNotFoundException"


def test_management_answers_are_gson_bytes(server: Server) -> None:
    response = httpx.get(server.management + "/models", timeout=30)
    expected = b'{\n  "models": [\n    {\n      "modelName": "kinds",\n      "modelUrl": "kinds.mar"\n    }\n  ]\n}\n'
    assert response.content == expected


def test_describe_has_torchserve_fields_in_its_order(server: Server) -> None:
    described = httpx.get(server.management + "/models/kinds", timeout=30).json()[0]
    assert list(described) == [
        "modelName", "modelVersion", "modelUrl", "runtime", "minWorkers", "maxWorkers", "batchSize", "maxBatchDelay",
        "responseTimeout", "startupTimeout", "maxRetryTimeoutInSec", "clientTimeoutInMills", "parallelType",
        "parallelLevel", "deviceType", "continuousBatching", "useJobTicket", "useVenv", "stateful",
        "sequenceMaxIdleMSec", "sequenceTimeoutMSec", "maxNumSequence", "maxSequenceJobQueueSize", "loadedAtStartup",
        "workers", "jobQueueStatus",
    ]  # fmt: skip
    assert (described["parallelType"], described["parallelLevel"]) == ("pp", 2)
    assert (described["sequenceMaxIdleMSec"], described["maxNumSequence"]) == (60000, 4)


def test_head_on_predictions_runs_the_handler_and_sends_no_body(server: Server) -> None:
    """TorchServe answers any method on ``/predictions``; servekit took ``HEAD`` as 405."""
    with httpx.Client(timeout=30) as client:
        response = client.head(server.inference + "/predictions/kinds")
        assert response.status_code == 200 and response.content == b""
        assert client.get(server.inference + "/ping").status_code == 200  # the connection is still usable


def test_413_has_no_body(server: Server) -> None:
    """TorchServe's 413 (Netty's ``HttpObjectAggregator``) has no body and no content type."""
    response = httpx.post(server.inference + "/predictions/kinds", content=b"x" * 7_000_000, timeout=30)
    assert response.status_code == 413 and response.content == b""
    assert "content-type" not in response.headers


@pytest.mark.parametrize(
    ("url", "message"), [("", "empty url"), ("../x.mar", "Relative path is not allowed in url: ../x.mar")]
)
def test_register_empty_or_relative_url_is_torchserve_404(server: Server, url: str, message: str) -> None:
    response = httpx.post(server.management + "/models", params={"url": url}, timeout=30)
    assert response.status_code == 404
    assert response.json() == {"code": 404, "type": "ModelNotFoundException", "message": message}
