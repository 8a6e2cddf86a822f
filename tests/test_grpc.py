"""TorchServe's gRPC APIs end to end, with clients generated from TorchServe 0.12's own ``.proto`` files
(``tests/torchserve_protos.py``): Ping, Predictions (batched with REST requests by the same batcher), StreamPredictions,
StreamPredictions2, the management calls, keys and TLS, error statuses, size limits, deadlines and cancellation that
drop queued requests, ``enable_grpc=false``, and that servekit's ``.proto`` files and generated modules define what
TorchServe's do.

This process never imports ``servekit.grpc`` (see ``tests/torchserve_protos.py``).
"""

from __future__ import annotations

import ast
import concurrent.futures
import datetime
import ipaddress
import json
import queue
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, empty_pb2
from google.rpc import error_details_pb2

from servekit.config import settings_from
from servekit.errors import ConfigError
from tests.helpers import Server, free_port, make_archive, running_server
from tests.torchserve_protos import client_modules, compile_protos, protoc, torchserve_protos

ROOT = Path(__file__).parent.parent
ECHO = """
import json
import queue
import time

from ts.handler_utils.utils import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    rows = [{k: bytes(v).decode() for k, v in row.items()} for row in data]
    if any("fail" in row for row in rows):
        raise ValueError("asked to fail")
    if any("stream" in row for row in rows):
        for n in range(2):
            send_intermediate_predict_response([f"chunk{n}"] * len(rows), context.request_ids, "", 200, context)
    time.sleep(max(float(row.get("sleep", 0)) for row in rows))
    answers = []
    for i, row in enumerate(rows):
        if "status" in row:
            context.set_response_status(int(row["status"]), "custom", idx=i)
        if "big" in row:
            answers.append("x" * int(row["big"]))
            continue
        headers = {k: v for k, v in context.get_all_request_header(i).items() if k.startswith("ts_request")}
        answers.append({"inputs": row, "headers": headers, "batch": [r.get("source") for r in rows]})
    return answers
"""
SLOW = """
import time

calls = 0


def handle(data, context):
    global calls
    if data is None:
        return None
    answers = []
    for row in data:
        calls += 1
        time.sleep(float(bytes(row.get("sleep", b"0")).decode()))
        answers.append({"calls": calls, "tag": bytes(row.get("tag", b"")).decode()})
    return answers
"""
MAX_REQUEST = 200_000
MAX_RESPONSE = 100_000


@pytest.fixture(scope="module")
def ts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModuleType]:
    """The client modules generated from TorchServe's files."""
    return client_modules(tmp_path_factory.mktemp("torchserve_clients"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder, work = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("work")
    make_archive(folder, "echo", ECHO, work=work, config="batchSize: 8\nmaxBatchDelay: 500\n")
    make_archive(folder, "slow", SLOW, work=work)
    make_archive(folder, "mgmt", SLOW, work=work)
    second = make_archive(tmp_path_factory.mktemp("v2"), "mgmt", SLOW, work=work, version="2.0")
    second.rename(folder / "mgmt_v2.mar")
    return folder


def grpc_config(**extra: str) -> dict[str, str]:
    ports = {"grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port())}
    return {"enable_grpc": "true", **ports, **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, store: Path) -> Iterator[Server]:
    config = grpc_config(max_request_size=str(MAX_REQUEST), max_response_size=str(MAX_RESPONSE))
    args = ("--disable-token-auth", "--ncs", "--enable-model-api")
    with running_server(
        tmp_path_factory.mktemp("run"), store, ("echo=echo.mar", "slow=slow.mar"), config, args
    ) as running:
        yield running


def target(server: Server, api: str) -> str:
    """``127.0.0.1:<port>`` of the server's gRPC ``api`` (``inference`` or ``management``)."""
    port = (server.workdir / "config.properties").read_text().split(f"grpc_{api}_port=")[1].split()[0]
    return f"127.0.0.1:{port}"


def channel(server: Server, api: str) -> grpc.Channel:
    return grpc.insecure_channel(target(server, api))


@pytest.fixture(scope="module")
def inference(server: Server, ts: dict[str, ModuleType]) -> Any:
    return ts["inference_pb2_grpc"].InferenceAPIsServiceStub(channel(server, "inference"))


@pytest.fixture(scope="module")
def management(server: Server, ts: dict[str, ModuleType]) -> Any:
    return ts["management_pb2_grpc"].ManagementAPIsServiceStub(channel(server, "management"))


def request(ts: dict[str, ModuleType], model: str, **inputs: str) -> Any:
    return ts["inference_pb2"].PredictionsRequest(model_name=model, input={k: v.encode() for k, v in inputs.items()})


def failure(call: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    error: Any = caught.value
    return error.code(), error.details()


def test_grpc_ping_answers_torchserves_health_text(inference: Any) -> None:
    assert inference.Ping(empty_pb2.Empty()).health == '{\n  "status": "Healthy"\n}'


def test_grpc_predictions_reach_the_handler_as_named_inputs(inference: Any, ts: dict[str, ModuleType]) -> None:
    reply = inference.Predictions(request(ts, "echo", data="1", other="two"))
    assert json.loads(reply.prediction) == {"inputs": {"data": "1", "other": "two"}, "headers": {}, "batch": [None]}
    versioned = request(ts, "echo", data="1")
    versioned.model_version = "1.0"
    assert json.loads(inference.Predictions(versioned).prediction)["inputs"] == {"data": "1"}


def test_grpc_and_rest_requests_share_the_models_batches(
    server: Server, inference: Any, ts: dict[str, ModuleType]
) -> None:
    """One worker busy with a slow request: the gRPC and REST requests that arrive meanwhile leave in one batch."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        busy = inference.Predictions.future(request(ts, "echo", sleep="0.8", source="first"))
        time.sleep(0.3)
        grpc_calls = [inference.Predictions.future(request(ts, "echo", source="grpc")) for _ in range(3)]
        rest_calls = [pool.submit(server.post, "/predictions/echo", data={"source": "rest"}) for _ in range(3)]
        batches = [json.loads(call.result(30).prediction)["batch"] for call in grpc_calls]
        batches += [call.result(30).json()["batch"] for call in rest_calls]
        busy.result(30)
    assert all(sorted(batch) == ["grpc"] * 3 + ["rest"] * 3 for batch in batches), batches


def test_grpc_stream_predictions_send_a_message_per_chunk(inference: Any, ts: dict[str, ModuleType]) -> None:
    messages = [m.prediction for m in inference.StreamPredictions(request(ts, "echo", stream="1"))]
    assert messages[:2] == [b"chunk0", b"chunk1"] and json.loads(messages[2])["inputs"] == {"stream": "1"}
    assert len(messages) == 3
    single = list(inference.StreamPredictions(request(ts, "echo", data="1")))
    assert len(single) == 1 and json.loads(single[0].prediction)["inputs"] == {"data": "1"}
    joined = inference.Predictions(request(ts, "echo", stream="1")).prediction  # unary: the chunks joined
    assert joined.startswith(b"chunk0chunk1{")


def test_grpc_stream_predictions2_answers_each_request_in_sequence_order(
    inference: Any, ts: dict[str, ModuleType]
) -> None:
    def sequence(model: str, sequence_id: str, **inputs: str) -> Any:
        message = request(ts, model, **inputs)
        if sequence_id:
            message.sequence_id = sequence_id
        return message

    sent = [
        sequence("echo", "s1", tag="1", sleep="0.3"),
        sequence("echo", "s1", tag="2"),
        sequence("echo", ""),  # no sequence id
        sequence("missing", "s2", tag="x"),
        sequence("echo", "s1", tag="3", ts_request_sequence_end="true"),
    ]
    answers = list(inference.StreamPredictions2(iter(sent)))
    assert len(answers) == 5
    done = [(a.sequence_id, json.loads(a.prediction)) for a in answers if not a.HasField("status")]
    assert [(s, d["inputs"]["tag"]) for s, d in done] == [("s1", "1"), ("s1", "2"), ("s1", "3")]  # in order
    assert done[0][1]["headers"] == {"ts_request_sequence_id": "s1"}
    assert done[2][1]["headers"] == {"ts_request_sequence_id": "s1", "ts_request_sequence_end": "true"}
    errors = {a.status.message: a for a in answers if a.HasField("status")}
    assert set(errors) == {"Parameter sequenceId is required.", "Model not found: missing"}
    missing = errors["Model not found: missing"]
    assert missing.sequence_id == "s2" and missing.status.code == grpc.StatusCode.NOT_FOUND.value[0]
    info = error_details_pb2.ErrorInfo()
    assert missing.status.details[0].Unpack(info) and info.reason == "ModelNotFoundError"


def test_grpc_errors_have_torchserves_status_codes(inference: Any, ts: dict[str, ModuleType]) -> None:
    assert failure(inference.Predictions, request(ts, "missing")) == (
        grpc.StatusCode.NOT_FOUND,
        "Model not found: missing",
    )
    assert failure(inference.Predictions, request(ts, "", data="1"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, message = failure(inference.Predictions, request(ts, "echo", fail="1"))
    assert code == grpc.StatusCode.INTERNAL and "ValueError: asked to fail" in message
    code, message = failure(inference.Predictions, request(ts, "echo", status="404"))
    assert code == grpc.StatusCode.NOT_FOUND and '"status": "404"' in message  # the handler's status (its JSON)
    code, message = failure(list, inference.StreamPredictions(request(ts, "missing")))
    assert code == grpc.StatusCode.NOT_FOUND


def test_grpc_size_limits(inference: Any, ts: dict[str, ModuleType]) -> None:
    code, message = failure(inference.Predictions, request(ts, "echo", data="x" * MAX_REQUEST))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
    code, message = failure(inference.Predictions, request(ts, "echo", big=str(MAX_RESPONSE + 1)))
    assert code == grpc.StatusCode.INTERNAL and f"exceeds max_response_size={MAX_RESPONSE}" in message


def pending(management: Any, ts: dict[str, ModuleType], model: str) -> int:
    describe = management.DescribeModel(ts["management_pb2"].DescribeModelRequest(model_name=model))
    return int(json.loads(describe.msg)[0]["jobQueueStatus"]["pendingRequests"])


def wait_for(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_grpc_deadline_and_cancellation_drop_queued_requests(
    inference: Any, management: Any, ts: dict[str, ModuleType]
) -> None:
    """While the one worker is busy, a call whose deadline passes and a call its client cancels leave the queue at
    once, and the handler never sees them."""
    before = json.loads(inference.Predictions(request(ts, "slow", tag="start")).prediction)["calls"]
    busy = inference.Predictions.future(request(ts, "slow", sleep="1.5", tag="busy"))
    assert wait_for(lambda: pending(management, ts, "slow") == 0)  # the busy one is running
    code, _ = failure(inference.Predictions, request(ts, "slow", tag="late"), timeout=0.3)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert pending(management, ts, "slow") == 0 and not busy.done()
    cancelled = inference.Predictions.future(request(ts, "slow", tag="cancelled"))
    assert wait_for(lambda: pending(management, ts, "slow") == 1)
    cancelled.cancel()
    assert wait_for(lambda: pending(management, ts, "slow") == 0, timeout=1.0) and not busy.done()
    assert json.loads(busy.result(30).prediction)["calls"] == before + 1
    after = json.loads(inference.Predictions(request(ts, "slow", tag="after")).prediction)
    assert after == {"calls": before + 2, "tag": "after"}  # neither the late nor the cancelled one ran


def test_grpc_management_calls(management: Any, inference: Any, ts: dict[str, ModuleType]) -> None:
    m = ts["management_pb2"]
    register = management.RegisterModel(m.RegisterModelRequest(url="mgmt.mar", initial_workers=1, synchronous=True))
    assert register.msg == 'Model "mgmt" Version: 1.0 registered with 1 initial workers'
    second = management.RegisterModel(m.RegisterModelRequest(url="mgmt_v2.mar"))
    assert second.msg.endswith("registered with 0 initial workers. Use scale workers API to add workers for the model.")
    assert failure(management.RegisterModel, m.RegisterModelRequest(url="mgmt.mar"))[0] == grpc.StatusCode.ABORTED
    assert failure(management.RegisterModel, m.RegisterModelRequest(url="none.mar")) == (
        grpc.StatusCode.NOT_FOUND,
        "Model not found at: none.mar",
    )
    listed = json.loads(management.ListModels(m.ListModelsRequest()).msg)  # limit 0: 100 (TorchServe: none)
    assert [entry["modelName"] for entry in listed["models"]] == ["echo", "mgmt", "slow"]
    page = json.loads(management.ListModels(m.ListModelsRequest(limit=1, next_page_token=1)).msg)
    assert page == {"nextPageToken": "2", "models": [{"modelName": "mgmt", "modelUrl": "mgmt.mar"}]}
    every = json.loads(management.DescribeModel(m.DescribeModelRequest(model_name="mgmt", model_version="all")).msg)
    assert sorted(entry["modelVersion"] for entry in every) == ["1.0", "2.0"]
    scaled = management.ScaleWorker(m.ScaleWorkerRequest(model_name="mgmt", model_version="2.0", synchronous=True))
    assert scaled.msg == "Workers scaled to 1 for model: mgmt, version: 2.0"
    assert management.ScaleWorker(m.ScaleWorkerRequest(model_name="mgmt")).msg == "Processing worker updates..."
    default = management.SetDefault(m.SetDefaultRequest(model_name="mgmt", model_version="2.0"))
    assert default.msg == 'Default version successfully updated for model "mgmt" to "2.0"'
    described = json.loads(management.DescribeModel(m.DescribeModelRequest(model_name="mgmt")).msg)
    assert described[0]["modelVersion"] == "2.0" and described[0]["minWorkers"] == 1
    assert json.loads(inference.Predictions(request(ts, "mgmt", tag="v2")).prediction)["tag"] == "v2"
    text = management.UnregisterModel(m.UnregisterModelRequest(model_name="mgmt", model_version="1.0")).msg
    assert text == 'Model "mgmt" unregistered'
    assert management.UnregisterModel(m.UnregisterModelRequest(model_name="mgmt")).msg == 'Model "mgmt" unregistered'
    assert failure(management.DescribeModel, m.DescribeModelRequest(model_name="mgmt")) == (
        grpc.StatusCode.NOT_FOUND,
        "Model not found: mgmt",
    )
    bad_scale = m.ScaleWorkerRequest(model_name="echo", min_worker=2, max_worker=1)
    assert failure(management.ScaleWorker, bad_scale)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_access_log_names_each_call(server: Server) -> None:
    line = '"gRPC org.pytorch.serve.grpc.inference.InferenceAPIsService/Ping HTTP/2.0" 0 '
    assert wait_for(lambda: line in server.log_text())


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A key and a certificate for 127.0.0.1 that names itself as its issuer."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "servekit test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = folder / "key.pem", folder / "cert.pem"
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


def test_grpc_tls_and_keys(tmp_path: Path, store: Path, ts: dict[str, ModuleType]) -> None:
    """``enable_grpc_ssl`` with a PEM key and certificate, and token authorization on: the inference key on the
    inference port, the management key on the management port, ``PERMISSION_DENIED`` otherwise; Ping needs none."""
    key_file, cert_file = self_signed(tmp_path)
    config = grpc_config(enable_grpc_ssl="true", private_key_file=str(key_file), certificate_file=str(cert_file))
    with running_server(tmp_path / "run", store, ("echo=echo.mar",), config, ("--ncs",)) as server:
        keys = {
            kind: entry["key"] for kind, entry in json.loads((server.workdir / "key_file.json").read_text()).items()
        }
        credentials = grpc.ssl_channel_credentials(root_certificates=cert_file.read_bytes())
        secure = grpc.secure_channel(target(server, "inference"), credentials)
        stub = ts["inference_pb2_grpc"].InferenceAPIsServiceStub(secure)
        assert json.loads(stub.Ping(empty_pb2.Empty()).health) == {"status": "Healthy"}  # no key needed
        message = request(ts, "echo", data="1")
        denied = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"
        assert failure(stub.Predictions, message) == (grpc.StatusCode.PERMISSION_DENIED, denied)
        wrong = (("authorization", "Bearer nope"),)
        assert failure(stub.Predictions, message, metadata=wrong) == (grpc.StatusCode.PERMISSION_DENIED, denied)
        other = (("authorization", f"Bearer {keys['management']}"),)
        assert failure(stub.Predictions, message, metadata=other)[0] == grpc.StatusCode.PERMISSION_DENIED
        good = (("authorization", f"Bearer {keys['inference']}"),)
        assert json.loads(stub.Predictions(message, metadata=good).prediction)["inputs"] == {"data": "1"}
        manage_channel = grpc.secure_channel(target(server, "management"), credentials)
        manage = ts["management_pb2_grpc"].ManagementAPIsServiceStub(manage_channel)
        listing = ts["management_pb2"].ListModelsRequest()
        assert failure(manage.ListModels, listing, metadata=good)[0] == grpc.StatusCode.PERMISSION_DENIED
        manage_key = (("authorization", f"Bearer {keys['management']}"),)
        assert "echo" in manage.ListModels(listing, metadata=manage_key).msg
        plain = ts["inference_pb2_grpc"].InferenceAPIsServiceStub(channel(server, "inference"))
        assert failure(plain.Ping, empty_pb2.Empty(), timeout=5)[0] == grpc.StatusCode.UNAVAILABLE  # no TLS: no talk


def test_grpc_off_opens_no_port_and_a_taken_port_stops_the_start(tmp_path: Path) -> None:
    empty = tmp_path / "store"
    empty.mkdir()
    config = grpc_config(enable_grpc="false")
    with running_server(tmp_path / "off", empty, config=config):
        for key in ("grpc_inference_port", "grpc_management_port"):
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.1", int(config[key]))) != 0  # nothing listens there
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = grpc_config(grpc_inference_port=str(taken.getsockname()[1]))
        with running_server(tmp_path / "taken", empty, config=config, wait=False) as server:
            assert server.process.wait(60) == 1
            assert "gRPC inference port: cannot listen on" in server.log_text()
            assert "Address already in use" in server.log_text()


def test_grpc_connections_close_at_their_max_age(tmp_path: Path, ts: dict[str, ModuleType]) -> None:
    """``grpc_inference_max_connection_age_ms``: the server closes the connection after that age (the channel goes
    idle, as after TorchServe's GOAWAY) and the next call connects again."""
    empty = tmp_path / "store"
    empty.mkdir()
    config = grpc_config(grpc_inference_max_connection_age_ms="300", grpc_inference_max_connection_age_grace_ms="100")
    with running_server(tmp_path / "run", empty, config=config, args=("--disable-token-auth", "--ncs")) as server:
        states: queue.Queue[grpc.ChannelConnectivity] = queue.Queue()
        aged = channel(server, "inference")
        stub = ts["inference_pb2_grpc"].InferenceAPIsServiceStub(aged)
        assert json.loads(stub.Ping(empty_pb2.Empty(), timeout=10).health) == {"status": "Healthy"}
        aged.subscribe(states.put)
        seen = [states.get(timeout=10)]
        while seen[-1] is not grpc.ChannelConnectivity.IDLE:
            seen.append(states.get(timeout=10))  # the server's GOAWAY, some 300 ms after the connection was made
        assert seen[0] is grpc.ChannelConnectivity.READY
        assert json.loads(stub.Ping(empty_pb2.Empty(), timeout=10).health) == {"status": "Healthy"}
        aged.close()


def test_grpc_settings_read_torchserves_keys() -> None:
    settings = settings_from(
        {"grpc_inference_address": "0.0.0.0", "grpc_inference_port": "9090", "grpc_management_address": "[::1]"}
    )
    assert (settings.grpc_inference_address, settings.grpc_inference_port) == ("0.0.0.0", 9090)
    assert (settings.grpc_management_address, settings.grpc_management_port) == ("::1", 7071)
    assert settings.enable_grpc and not settings.enable_grpc_ssl  # on by default, as TorchServe's
    assert not settings_from({"enable_grpc": "false"}).enable_grpc
    for key, value in (
        ("grpc_inference_port", "70000"),
        ("grpc_management_port", "x"),
        ("grpc_inference_address", "http://0.0.0.0:7070"),
        ("grpc_management_address", "127.0.0.1:7071"),
        ("enable_grpc_ssl", "maybe"),
    ):
        with pytest.raises(ConfigError, match=key):
            settings_from({key: value})


def descriptor_set(path: Path) -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())


def test_grpc_protos_define_what_torchserves_define(tmp_path: Path) -> None:
    """servekit's .proto files and TorchServe's describe the same messages, fields and services (names, numbers,
    types, streaming), so the wire is the same; only file names, options and comments differ."""
    protos, ours = torchserve_protos(), ROOT / "servekit" / "grpc" / "protos"
    for name in ("inference", "management"):
        compile_protos(protos, (name,), f"--descriptor_set_out={tmp_path / 'theirs'}")
        protoc(f"-I{ours}", f"-I{protos}", f"--descriptor_set_out={tmp_path / 'ours'}", str(ours / f"{name}.proto"))
        theirs_file, ours_file = (descriptor_set(tmp_path / side).file[0] for side in ("theirs", "ours"))
        theirs_file.ClearField("options")
        ours_file.ClearField("options")
        assert ours_file == theirs_file


def test_grpc_generated_modules_match_the_protos(tmp_path: Path) -> None:
    """The descriptors in servekit/grpc/generated/*_pb2.py are what the .proto files compile to now: run
    `make protos` after changing a .proto file."""
    from servekit.grpc.protos import generate  # the generator script, which imports nothing of servekit.grpc

    generate.generate(tmp_path)
    for name in generate.NAMES:
        fresh = (tmp_path / generate.PACKAGE / f"{name}_pb2.py").read_text()
        committed = (ROOT / generate.PACKAGE / f"{name}_pb2.py").read_text()
        assert serialized(fresh) == serialized(committed), f"servekit/grpc/generated/{name}_pb2.py: run make protos"


def serialized(module_text: str) -> bytes:
    """The serialized file descriptor a generated ``*_pb2.py`` registers."""
    start = module_text.index("AddSerializedFile(") + len("AddSerializedFile(")
    literal = module_text[start : module_text.index(")\n", start)]
    value = ast.literal_eval(literal)
    assert isinstance(value, bytes)
    return value
