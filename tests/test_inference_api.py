"""The inference API end to end: real archives (.mar, .tar.gz, folder; eager and TorchScript; one made by the
real torch-model-archiver), a real server on free ports, real HTTP."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.helpers import TS_HANDLER_PY, Server, build_mlp, make_archive, running_server, write

ECHO_HANDLER = """
import os

import torch


def handle(data, context):
    if data is None:  # initialization call
        return None
    out = []
    for i, row in enumerate(data):
        out.append({
            "inputs": {k: [type(v).__name__, v if isinstance(v, (dict, list, str)) else bytes(v).decode("latin-1")]
                       for k, v in row.items()},
            "request_id": context.get_request_id(i),
            "header": context.get_request_header(i, "x-custom"),
            "yaml": context.model_yaml_config,
            "props": {k: context.system_properties[k] for k in ("batch_size", "gpu_id", "server_name")},
            "model_dir_ok": os.path.isdir(context.system_properties["model_dir"]),
            "manifest_name": context.manifest["model"]["modelName"],
            "batch": len(data),
            "pid": os.getpid(),
            "threads": torch.get_num_threads(),
        })
    return out
"""

KINDS_HANDLER = """
import torch
from ts.torch_handler.base_handler import BaseHandler


class Kinds(BaseHandler):
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        kind = data[0]["body"]
        if kind == "bytes":
            return [b"\\x00\\x01raw"]
        if kind == "str":
            return ["hello"]
        if kind == "dict":
            return [{"a": [1, 2]}]
        if kind == "csv":
            context.set_response_content_type(0, "text/csv")
            return ["a,b\\n1,2\\n"]
        if kind == "status":
            context.set_response_status(201, "Created")
            context.set_response_header(0, "x-extra", "yes")
            return [{"created": True}]
        if kind == "tensor":
            return [torch.arange(3)]
        if kind == "phrase":
            context.set_response_status(299, "Custom Phrase")
            return ["phrased"]
        if kind == "badphrase":
            context.set_response_status(200, "OK\\r\\nInjected: yes")
            return ["never sent"]
        if kind == "raise":
            raise ValueError("boom in handler")
        if kind == "wronglen":
            return [1, 2, 3]
        if kind == "notlist":
            return {"oops": 1}
        return ["unknown"]
"""

SLOW_HANDLER = """
import time


def handle(data, context):
    if data is None:
        return None
    time.sleep(1.0)
    return ["done"] * len(data)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("inference")
    store, work = root / "store", root / "work"
    store.mkdir()
    make_archive(store, "mlp", TS_HANDLER_PY, work=work, model="eager")
    make_archive(store, "mlp_ts", TS_HANDLER_PY, work=work, model="torchscript", fmt="tgz")
    make_archive(store, "mlp_dir", TS_HANDLER_PY, work=work, model="eager", fmt="no-archive")
    make_archive(
        store,
        "echo",
        ECHO_HANDLER,
        work=work,
        config="minWorkers: 2\nbatchSize: 4\nmaxBatchDelay: 50\nhandler:\n  greeting: hi\n",
    )
    make_archive(store, "kinds", KINDS_HANDLER, work=work)
    make_archive(store, "idle", SLOW_HANDLER, work=work, config="minWorkers: 0\n")
    make_archive(store, "slowq", SLOW_HANDLER, work=work, config="jobQueueSize: 1\nbatchSize: 1\n")
    # One archive made by the real torch-model-archiver, with a handler that imports from `ts.`.
    ref_src = work / "ref"
    write(ref_src / "model.py", (work / "src-mlp-1.0" / "model.py").read_text())
    shutil.copy(work / "src-mlp-1.0" / "weights.pt", ref_src / "weights.pt")
    write(ref_src / "ref_handler.py", TS_HANDLER_PY)
    archiver_bin = Path(sys.executable).with_name("torch-model-archiver")
    subprocess.run(
        [
            str(archiver_bin),
            "--model-name",
            "mlp_ref",
            "--version",
            "2.0",
            "--model-file",
            str(ref_src / "model.py"),
            "--serialized-file",
            str(ref_src / "weights.pt"),
            "--handler",
            str(ref_src / "ref_handler.py"),
            "--export-path",
            str(store),
        ],
        check=True,
    )
    with running_server(root / "run", store, config={"max_request_size": "100000"}) as srv:
        yield srv


def mlp_expected(x: list[list[float]]) -> list[list[float]]:
    with torch.inference_mode():
        return build_mlp()(torch.tensor(x)).tolist()  # type: ignore[no-any-return]


@pytest.mark.parametrize("model", ["mlp", "mlp_ts", "mlp_dir", "mlp_ref"])
def test_inference_serves_each_archive_format_with_correct_outputs(server: Server, model: str) -> None:
    x = [float(i) / 10 for i in range(16)]
    response = server.post(f"/predictions/{model}", json={"data": x})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == pytest.approx(mlp_expected([x])[0], abs=1e-5)


def test_inference_version_in_path_selects_that_version(server: Server) -> None:
    x = [0.5] * 16
    assert server.post("/predictions/mlp_ref/2.0", json={"data": x}).json() == pytest.approx(
        mlp_expected([x])[0], abs=1e-5
    )
    missing = server.post("/predictions/mlp_ref/9.9", json={"data": x})
    assert missing.status_code == 404
    assert missing.json() == {
        "code": 404,
        "type": "ModelVersionNotFoundException",
        "message": "Model version: 9.9 does not exist for model: mlp_ref",
    }


def test_inference_unknown_model_is_404_json(server: Server) -> None:
    response = server.post("/predictions/nope", content=b"x")
    assert response.status_code == 404
    assert response.json()["type"] == "ModelNotFoundException"
    assert "nope" in response.json()["message"]


def test_inference_unknown_route_is_404_json(server: Server) -> None:
    response = httpx.get(server.inference + "/no/such/route")
    assert response.status_code == 404
    assert response.json()["code"] == 404


def test_ping_reports_healthy(server: Server) -> None:
    response = httpx.get(server.inference + "/ping")
    assert response.status_code == 200
    assert response.json() == {"status": "Healthy"}


def test_handler_receives_json_body_decoded_with_context(server: Server) -> None:
    response = server.post("/predictions/echo", json={"k": [1, 2]}, headers={"x-custom": "abc"})
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["inputs"] == {"body": ["dict", {"k": [1, 2]}]}
    assert got["header"] == "abc"
    assert got["request_id"] == response.headers["x-request-id"]
    assert got["yaml"]["handler"] == {"greeting": "hi"}
    assert got["props"] == {"batch_size": 4, "gpu_id": None, "server_name": "MMS"}
    assert got["model_dir_ok"] is True
    assert got["manifest_name"] == "echo"


def test_handler_receives_raw_body_as_bytearray_and_text_as_str(server: Server) -> None:
    raw = server.post("/predictions/echo", content=b"\x00\xffbin", headers={"content-type": "application/octet-stream"})
    assert raw.json()["inputs"] == {"body": ["bytearray", "\x00\xffbin"]}
    text = server.post("/predictions/echo", content="héllo".encode(), headers={"content-type": "text/plain"})
    assert text.json()["inputs"] == {"body": ["str", "héllo"]}


@pytest.mark.parametrize("body", [b"{not json", b"[" * 20_000 + b"]" * 20_000, b"1" * 5000, b"\xff\xfe"])
def test_malformed_json_body_is_400_and_never_reaches_the_handler(server: Server, body: bytes) -> None:
    response = server.post("/predictions/echo", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["message"].startswith("Invalid JSON body")
    assert server.post("/predictions/echo", json={"ok": 1}).status_code == 200


def test_malformed_json_fails_only_its_own_request_in_a_batch(server: Server) -> None:
    def send(i: int) -> httpx.Response:
        body = b"{bad" if i % 2 else json.dumps({"i": i}).encode()
        return server.post("/predictions/echo", content=body, headers={"content-type": "application/json"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, range(16)))
    assert [r.status_code for r in responses] == [200, 400] * 8
    assert [r.json()["inputs"]["body"][1]["i"] for r in responses[::2]] == list(range(0, 16, 2))


def test_handler_receives_multipart_fields_by_name(server: Server) -> None:
    response = server.post(
        "/predictions/echo",
        files={
            "data": ("img.bin", b"\x01\x02", "application/octet-stream"),
            "meta": ("m.json", b'{"a": 1}', "application/json"),
        },
        data={"plain": "value"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["inputs"] == {
        "data": ["bytearray", "\x01\x02"],
        "meta": ["dict", {"a": 1}],
        "plain": ["bytearray", "value"],
    }


def test_handler_results_are_sent_by_type(server: Server) -> None:
    raw = server.post("/predictions/kinds", content=b"bytes", headers={"content-type": "text/plain"})
    assert raw.content == b"\x00\x01raw"
    text = server.post("/predictions/kinds", content=b"str", headers={"content-type": "text/plain"})
    assert text.text == "hello" and text.headers["content-type"].startswith("text/plain")
    obj = server.post("/predictions/kinds", content=b"dict", headers={"content-type": "text/plain"})
    assert obj.json() == {"a": [1, 2]} and obj.headers["content-type"] == "application/json"
    csv = server.post("/predictions/kinds", content=b"csv", headers={"content-type": "text/plain"})
    assert csv.text == "a,b\n1,2\n" and csv.headers["content-type"].startswith("text/csv")
    tensor = server.post("/predictions/kinds", content=b"tensor", headers={"content-type": "text/plain"})
    assert torch.equal(torch.load(__import__("io").BytesIO(tensor.content)), torch.arange(3))


def test_handler_sets_status_and_headers(server: Server) -> None:
    response = server.post("/predictions/kinds", content=b"status", headers={"content-type": "text/plain"})
    assert response.status_code == 201
    assert response.headers["x-extra"] == "yes"
    assert response.json() == {"created": True}


def status_line_and_head(server: Server, kind: bytes) -> tuple[bytes, bytes]:
    """The raw status line and header block of a /predictions/kinds answer."""
    host, port = server.inference.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), 10) as sock:
        sock.sendall(b"POST /predictions/kinds HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(kind), kind))  # fmt: skip
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    line, _, rest = data.partition(b"\r\n")
    return line, rest.partition(b"\r\n\r\n")[0]


def test_handler_reason_phrase_is_the_status_lines_as_in_torchserve(server: Server) -> None:
    """TorchServe writes the handler's reason phrase, or none at all, in the status line of a handler's answer."""
    assert status_line_and_head(server, b"phrase")[0] == b"HTTP/1.1 299 Custom Phrase"
    assert status_line_and_head(server, b"str")[0] == b"HTTP/1.1 200 "
    line, head = status_line_and_head(server, b"badphrase")  # a phrase that would inject a header: 500 instead
    assert line.startswith(b"HTTP/1.1 500") and b"injected" not in head.lower()
    assert server.post("/predictions/kinds", content=b"str", headers={"content-type": "text/plain"}).text == "hello"


def test_handler_exception_is_500_naming_model_and_exception_type(server: Server) -> None:
    response = server.post("/predictions/kinds", content=b"raise", headers={"content-type": "text/plain"})
    assert response.status_code == 500
    body = response.json()
    assert "kinds" in body["message"] and "ValueError" in body["message"] and "boom in handler" in body["message"]
    # the worker survived: the next request succeeds
    assert server.post("/predictions/kinds", content=b"str", headers={"content-type": "text/plain"}).text == "hello"


def test_handler_prediction_exception_sets_status(server: Server) -> None:
    response = server.post("/predictions/mlp", json={"wrong": 1})
    assert response.status_code == 400
    assert "expected a JSON object" in response.json()["message"]


def test_handler_wrong_length_result_fails_batch_naming_both_lengths(server: Server) -> None:
    response = server.post("/predictions/kinds", content=b"wronglen", headers={"content-type": "text/plain"})
    assert response.status_code == 500
    assert "returned 3 results for a batch of 1" in response.json()["message"]
    not_list = server.post("/predictions/kinds", content=b"notlist", headers={"content-type": "text/plain"})
    assert not_list.status_code == 500
    assert "expected a list" in not_list.json()["message"]


def test_request_over_max_request_size_is_413(server: Server) -> None:
    response = server.post("/predictions/echo", content=b"x" * 100001)
    assert response.status_code == 413 and response.content == b""  # TorchServe's 413 has no body
    assert server.post("/predictions/echo", content=b"x" * 1000).status_code == 200


def test_model_without_workers_is_503_with_retry_after(server: Server) -> None:
    response = server.post("/predictions/idle", content=b"x")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "has no worker" in response.json()["message"]


def test_full_queue_is_503_queue_full(server: Server) -> None:
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: server.post("/predictions/slowq", content=b"x"), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    full = next(r for r in responses if r.status_code == 503)
    assert full.json()["type"] == "ServiceUnavailableException"
    assert "queue full" in full.json()["message"] and full.headers["retry-after"]


def test_workers_are_separate_processes_with_bounded_threads(server: Server) -> None:
    with ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(lambda i: server.post("/predictions/echo", json={"i": i}).json(), range(64)))
    pids = {b["pid"] for b in bodies}
    assert len(pids) == 2, "echo has minWorkers: 2"
    assert server.process.pid not in pids
    assert all(b["threads"] >= 1 for b in bodies)
    assert max(b["threads"] for b in bodies) <= max(1, len(__import__("os").sched_getaffinity(0)))


def test_management_describes_models_with_torchserve_fields(server: Server) -> None:
    listing = httpx.get(server.management + "/models").json()
    names = [m["modelName"] for m in listing["models"]]
    assert names == sorted(names) and "mlp" in names and "mlp_ref" in names
    described = httpx.get(server.management + "/models/echo").json()
    assert len(described) == 1
    echo = described[0]
    assert echo["batchSize"] == 4 and echo["maxBatchDelay"] == 50 and echo["minWorkers"] == 2
    assert len(echo["workers"]) == 2 and all(w["status"] == "READY" and w["pid"] for w in echo["workers"])
