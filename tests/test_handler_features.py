"""Handler ergonomics beyond TorchServe, end to end on a real server: ``InvalidInput`` becomes a 400 with its
message, a declared ``input_schema`` is checked before a request is queued, and streamed output (a generator, or
TorchServe's ``send_intermediate_predict_response``) reaches the client as chunked HTTP, chunk by chunk."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import Server, make_archive, reached, running_server, wait_pending

STRICT_HANDLER = """
from servekit.handler import InvalidInput

calls = 0


def handle(data, context):
    global calls
    if data is None:
        return None
    calls += 1
    out = []
    for row in data:
        value = row.get("body")
        if value == {"x": 0}:
            raise InvalidInput("x must not be zero")
        out.append({"calls": calls, "doubled": value["x"] * 2})
    return out


input_schema = {
    "type": "object",
    "properties": {"x": {"type": "integer"}},
    "required": ["x"],
    "additionalProperties": False,
}
"""

STREAM_HANDLER = """
import os
import time


def words(gate):
    yield "first "
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:  # the client opens the gate after chunk 1
        time.sleep(0.01)
    yield "second "
    yield "third"


def handle(data, context):
    if data is None:
        return None
    out = []
    for row in data:
        gate = row["body"].decode() if isinstance(row["body"], (bytes, bytearray)) else row["body"]
        out.append(words(gate))
    return out
"""

INTERMEDIATE_HANDLER = """
from ts.handler_utils.utils import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    for step in range(3):
        send_intermediate_predict_response([f"step {step};" for _ in data], context.request_ids, "ok", 200, context)
    return ["done" for _ in data]
"""

ADDRESSED_HANDLER = """
import pathlib
import time

from ts.handler_utils.utils import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    bodies = [row["body"].decode() for row in data]
    for body in bodies:
        if body.startswith("wait:"):  # hold the worker until the test opens the gate
            pathlib.Path(body[5:] + ".reached").touch()
            while not pathlib.Path(body[5:]).exists():
                time.sleep(0.01)
    ids = context.request_ids
    for i in reversed(range(len(data))):  # a chunk a call, to the request its req_id_map names, the last first
        send_intermediate_predict_response([f"to {bodies[i]} of {len(data)};"], {0: ids[i]}, "ok", 200, context)
    return ["done" for _ in data]
"""

BROKEN_STREAM_HANDLER = """
def chunks():
    yield "partial answer"
    raise RuntimeError("the model fell over mid-stream")


def handle(data, context):
    if data is None:
        return None
    return [chunks() for _ in data]
"""

BAD_SCHEMA_HANDLER = """
def handle(data, context):
    return None if data is None else [1 for _ in data]


input_schema = {"type": "no-such-type"}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("features")
    store = base / "store"
    store.mkdir()
    handlers = {
        "strict": STRICT_HANDLER,
        "stream": STREAM_HANDLER,
        "steps": INTERMEDIATE_HANDLER,
        "addressed": ADDRESSED_HANDLER,
        "broken": BROKEN_STREAM_HANDLER,
    }
    for name, source in handlers.items():
        make_archive(store, name, source, work=base, config="batchSize: 4\nmaxBatchDelay: 5\n")
    make_archive(store, "badschema", BAD_SCHEMA_HANDLER, work=base)
    models = [f"{name}={name}.mar" for name in handlers]
    args = ("--disable-token-auth", "--ncs", "--enable-model-api")
    with running_server(base / "run", store, models, args=args) as srv:
        yield srv


def test_invalid_input_from_a_handler_is_a_400_with_its_message(server: Server) -> None:
    response = server.post("/predictions/strict", json={"x": 0})
    assert response.status_code == 400, response.text
    # the message alone, as TorchServe sends a PredictionException's (InvalidInput is one)
    assert response.json() == {"code": 400, "type": "InternalServerException", "message": "x must not be zero"}
    assert server.post("/predictions/strict", json={"x": 21}).json()["doubled"] == 42  # still serving


def test_input_schema_is_checked_before_the_request_is_queued(server: Server) -> None:
    calls_before = server.post("/predictions/strict", json={"x": 1}).json()["calls"]
    cases = [
        ({"x": "one"}, "['x']", "is not of type 'integer'"),
        ({"y": 1}, "the input", "'x' is a required property"),
        ([1, 2], "the input", "is not of type 'object'"),
    ]
    for document, where, problem in cases:
        response = server.post("/predictions/strict", json=document)
        assert response.status_code == 400, response.text
        message = response.json()["message"]
        assert f"Invalid input at {where}" in message and problem in message, message
        assert response.headers["x-request-id"]
    not_json = server.post("/predictions/strict", content=b"\xff not json", headers={"content-type": "text/plain"})
    assert not_json.status_code == 400 and "takes JSON input" in not_json.json()["message"]
    # none of them reached the handler: its call counter moved by one, for the next good request only
    assert server.post("/predictions/strict", json={"x": 1}).json()["calls"] == calls_before + 1


def test_invalid_input_schema_fails_the_registration(server: Server) -> None:
    params = {"url": "badschema.mar", "initial_workers": "1"}  # the schema is checked when a worker loads the handler
    response = httpx.post(server.management + "/models", params=params, timeout=60)
    try:
        assert response.status_code == 500, response.text
        assert response.json()["message"] == "Failed to start workers for model badschema version: 1.0"
        assert "input_schema is not a valid JSON Schema" in server.log_text()  # why, for whoever reads the log
        # registered all the same, with no workers, as TorchServe keeps a model whose workers failed to start
        assert httpx.get(server.management + "/models/badschema", timeout=10).json()[0]["workers"] == []
    finally:
        httpx.delete(server.management + "/models/badschema", timeout=60)


def test_generator_output_is_streamed_chunk_by_chunk(server: Server, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with httpx.stream("POST", server.inference + "/predictions/stream", content=str(gate), timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.headers["x-request-id"]
        chunks = response.iter_raw()
        first = next(chunks)  # arrives while the handler waits for the gate: nothing is buffered
        assert first == b"first "
        gate.touch()
        rest = b"".join(chunks)
    assert first + rest == b"first second third"
    assert server.post("/predictions/strict", json={"x": 2}).status_code == 200  # the server keeps serving


def test_send_intermediate_predict_response_streams_torchserve_style(server: Server) -> None:
    with httpx.stream("POST", server.inference + "/predictions/steps", content=b"go", timeout=60) as response:
        assert response.status_code == 200 and response.headers["transfer-encoding"] == "chunked"
        body = b"".join(response.iter_raw())
    assert body == b"step 0;step 1;step 2;done"


def test_intermediate_responses_go_to_the_requests_req_id_map_names(server: Server, tmp_path: Path) -> None:
    """TorchServe's ``req_id_map``: a chunk goes to the request whose id the map gives, so a handler may send to one
    request of its batch at a time (here each of a batch of two gets its own chunk, sent in reverse order)."""
    gate = tmp_path / "open"

    def ask(body: str) -> tuple[int, str]:
        url = server.inference + "/predictions/addressed"
        with httpx.stream("POST", url, content=body.encode(), timeout=60) as response:
            return response.status_code, b"".join(response.iter_raw()).decode()

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        held = pool.submit(ask, f"wait:{gate}")
        reached(gate)  # the worker is busy: the next two requests wait, and go together as one batch
        first, second = pool.submit(ask, "first"), pool.submit(ask, "second")
        wait_pending(server, "addressed", 2)
        gate.touch()
        answers = [held.result(60), first.result(60), second.result(60)]
    assert answers == [(200, f"to wait:{gate} of 1;done"), (200, "to first of 2;done"), (200, "to second of 2;done")]


def test_error_mid_stream_cuts_the_response_short(server: Server) -> None:
    url = server.inference + "/predictions/broken"
    # no last chunk: the client knows the answer is incomplete
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", url, content=b"go", timeout=60) as response,
    ):
        assert response.status_code == 200
        b"".join(response.iter_raw())
    log = server.log_text()
    assert "the model fell over mid-stream" in log
    assert json.loads(server.post("/predictions/strict", json={"x": 3}).text)["doubled"] == 6
