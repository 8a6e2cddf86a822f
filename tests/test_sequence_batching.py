"""Sequence batching end to end (model-config ``sequenceBatching: true``) on a real server, with the stateful example of
``examples/stateful`` (a running sum per sequence, computed by its torch model) and test hooks: each answer says which
worker ran it, which sequences shared its batch and when it ran. State proves order and pinning (a sum that skipped
or repeated a step would be wrong); waits are on gates (files the test creates) and on the queue depth the management
API reports, never on timing, except for the expiry tests, which are about time."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import itertools
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch

from servekit import archiver
from tests.helpers import Server, free_port, reached, running_server, wait_pending
from tests.torchserve_protos import client_modules

EXAMPLE = Path(__file__).parent.parent / "examples" / "stateful"
ID = "ts_request_sequence_id"
END = "ts_request_sequence_end"
TORCHSERVE_WORDS = "has no worker to serve inference request. Please use scale workers API to add workers."

# The example's handler with hooks, by request field of a JSON body: "value" (what the sum adds), "gate": path (the
# batch creates path + ".reached", then waits until path exists), "close": true (the handler ends the sequence with
# TorchServe's response header).
# Each answer: {"sum", "pid" (the worker's), "batch" (the sequence ids of its batch), "sequence"
# (context.get_sequence_id), "start" (the start header the handler saw), "t0" and "t1" (when its batch ran)}.
PROBING_HANDLER = """
import json
import os
import time

from handler import RunningSum


class Probing(RunningSum):
    def handle(self, data, context):
        bodies = []
        for row in data:
            body = row.get("body")
            bodies.append(json.loads(body) if isinstance(body, (bytes, bytearray)) else body)
        started = time.time()
        for body in bodies:
            if body.get("gate"):
                open(body["gate"] + ".reached", "w").close()
            while body.get("gate") and not os.path.exists(body["gate"]) and time.time() < started + 30:
                time.sleep(0.005)
        sums = super().handle([{"body": str(body.get("value", 0))} for body in bodies], context)
        ids = [context.get_sequence_id(i) for i in range(len(data))]
        answers = []
        for i, (body, total) in enumerate(zip(bodies, sums)):
            if body.get("close"):
                context.set_response_header(i, context.header_key_sequence_end, ids[i])
            start = context.get_request_header(i, context.header_key_sequence_start)
            answers.append(json.dumps({
                "sum": total, "pid": os.getpid(), "batch": ids, "sequence": ids[i], "start": start,
                "t0": started, "t1": time.time(),
            }))
        return answers
"""

CONFIGS = {
    "counter": "minWorkers: 2\nmaxWorkers: 2\nbatchSize: 4\nsequenceMaxIdleMSec: 60000\nmaxSequenceJobQueueSize: 10\n"
    "maxNumSequence: 32\n",
    "solo": "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 4\nsequenceMaxIdleMSec: 60000\nmaxSequenceJobQueueSize: 10\n"
    "maxNumSequence: 8\n",
    "brief": "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 2\nsequenceMaxIdleMSec: 400\nsequenceTimeoutMSec: 1500\n"
    "maxNumSequence: 2\n",
    "few": "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 4\nsequenceMaxIdleMSec: 60000\nmaxNumSequence: 2\n",
    "fragile": "minWorkers: 2\nmaxWorkers: 2\nbatchSize: 2\nsequenceMaxIdleMSec: 60000\nmaxSequenceJobQueueSize: 4\n"
    "maxNumSequence: 4\n",
}


def archive(store: Path, work: Path, name: str, config: str) -> None:
    """The example's model (built here: its two weights 1) and handler, with the probing handler on top."""
    spec = importlib.util.spec_from_file_location("stateful_model", EXAMPLE / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Accumulator()
    torch.nn.init.ones_(model.step.weight)
    src = work / name
    src.mkdir(parents=True)
    torch.save(model.state_dict(), src / "weights.pt")
    (src / "probing.py").write_text(PROBING_HANDLER)
    (src / "model-config.yaml").write_text(config + "sequenceBatching: true\n")
    args = ["--model-name", name, "--version", "1.0", "--export-path", str(store), "--handler", str(src / "probing.py")]
    args += ["--model-file", str(EXAMPLE / "model.py"), "--serialized-file", str(src / "weights.pt")]
    args += ["--extra-files", str(EXAMPLE / "handler.py"), "--config-file", str(src / "model-config.yaml")]
    assert archiver.main(args) == 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("sequences")
    store = base / "store"
    store.mkdir()
    for name, config in CONFIGS.items():
        archive(store, base / "work", name, config)
    ports = {"grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port())}
    models = tuple(f"{name}={name}.mar" for name in CONFIGS)
    args = ("--disable-token-auth", "--ncs", "--enable-model-api")
    with running_server(base / "run", store, models, {"enable_grpc": "true", **ports}, args) as srv:
        yield srv


def send(server: Server, model: str, sequence: str | None = None, **body: Any) -> httpx.Response:
    headers = {ID: sequence} if sequence is not None else {}
    return server.post(f"/predictions/{model}", json=body, headers=headers)


def answer(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_a_request_without_a_sequence_id_starts_one_and_its_state_follows(server: Server) -> None:
    first = send(server, "counter", value=2)
    sequence = first.headers[ID]
    assert sequence.startswith("ts-seq-") and len(sequence) == len("ts-seq-") + 36
    assert answer(first)["sum"] == 2 and answer(first)["sequence"] == sequence and answer(first)["start"] == "true"
    later = [answer(send(server, "counter", sequence, value=v)) for v in (3, 5, -1)]
    assert [a["sum"] for a in later] == [5, 10, 9]  # the state the previous request left, in order
    assert {a["pid"] for a in later} == {answer(first)["pid"]}
    assert all(a["start"] is None and a["sequence"] == sequence for a in later)
    again = send(server, "counter", sequence, value=1)
    assert again.headers[ID] == sequence  # every answer of a sequence carries its id
    other = send(server, "counter", value=7)  # a new sequence: its own state
    assert other.headers[ID] != sequence and answer(other)["sum"] == 7


def test_a_sequence_id_chosen_by_the_client_starts_a_sequence_as_in_torchserve(server: Server) -> None:
    chosen = f"seq_{uuid.uuid4().hex}"
    sums = [answer(send(server, "counter", chosen, value=v))["sum"] for v in (1, 2, 3)]
    assert sums == [1, 3, 6]
    assert send(server, "counter", chosen, value=0).headers[ID] == chosen


def test_each_sequence_stays_on_one_worker_with_one_request_at_a_time(server: Server) -> None:
    """Six sequences over two workers, each sending four requests at once: each sequence's requests run on one worker,
    one after the other (the sums 1..4, each once: two at once would read the same state), never in the same batch."""
    sequences = [send(server, "counter", value=0).headers[ID] for _ in range(6)]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        futures = {(s, i): pool.submit(send, server, "counter", s, value=1) for s in sequences for i in range(4)}
        answers = {key: answer(f.result(60)) for key, f in futures.items()}
    for sequence in sequences:
        mine = [answers[sequence, i] for i in range(4)]
        assert sorted(a["sum"] for a in mine) == [1, 2, 3, 4], mine
        assert len({a["pid"] for a in mine}) == 1
        runs = sorted((a["t0"], a["t1"]) for a in mine)
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(runs)), runs
    assert all(len(set(a["batch"])) == len(a["batch"]) for a in answers.values())  # one request per sequence
    assert len({a["pid"] for a in answers.values()}) == 2  # the sequences spread over both workers


def test_a_batch_holds_one_request_of_each_of_several_sequences(server: Server, tmp_path: Path) -> None:
    gate = tmp_path / "open"
    first = send(server, "solo", value=1).headers[ID]
    others = [send(server, "solo", value=10 * i).headers[ID] for i in (1, 2, 3)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        held = pool.submit(send, server, "solo", first, value=1, gate=str(gate))  # the one worker waits at the gate
        reached(gate)
        later = [pool.submit(send, server, "solo", s, value=1) for s in [first, *others]]
        wait_pending(server, "solo", 4)
        gate.touch()
        assert answer(held.result(30))["batch"] == [first]
        answers = [answer(f.result(30)) for f in later]
    assert [a["sum"] for a in answers] == [3, 11, 21, 31]
    assert sorted(answers[0]["batch"]) == sorted([first, *others])  # the four waiting sequences, in one batch


def test_the_end_header_closes_a_sequence(server: Server) -> None:
    sequence = send(server, "counter", value=1).headers[ID]
    closing = server.post("/predictions/counter", json={"value": 1}, headers={ID: sequence, END: "true"})
    assert answer(closing)["sum"] == 2
    after = send(server, "counter", sequence, value=1)
    assert after.status_code == 404, after.text
    assert after.json() == {
        "code": 404,
        "type": "SequenceNotFoundError",
        "message": f'Sequence "{sequence}" of model "counter" is closed: a request with {END}: true ended it',
    }
    # TorchServe's handler side: an answer whose ts_request_sequence_end header names the sequence closes it
    other = send(server, "counter", value=1).headers[ID]
    assert answer(send(server, "counter", other, value=1, close=True))["sum"] == 2
    refused = send(server, "counter", other, value=1)
    assert refused.status_code == 404 and "the handler ended it" in refused.json()["message"]


def test_an_unknown_sequence_id_of_the_servers_form_is_404(server: Server) -> None:
    unknown = f"ts-seq-{uuid.uuid4()}"
    response = send(server, "counter", unknown, value=1)
    assert response.status_code == 404
    assert response.json()["message"] == (
        f'Sequence "{unknown}" of model "counter" is unknown: this server did not start it, or ended it long ago'
    )
    assert send(server, "counter", unknown, value=1).status_code == 404  # and it started nothing


def test_an_idle_sequence_expires(server: Server) -> None:
    busy = send(server, "brief", value=1).headers[ID]
    idle = send(server, "brief", value=1).headers[ID]
    for _ in range(5):  # requests 200 ms apart keep a sequence open past its 400 ms of idleness
        time.sleep(0.2)
        assert answer(send(server, "brief", busy, value=1))["sum"] > 1
    response = send(server, "brief", idle, value=1)
    assert response.status_code == 404, response.text
    assert response.json()["message"] == (
        f'Sequence "{idle}" of model "brief" expired: no request for sequenceMaxIdleMSec=400 ms'
    )


def test_sequence_timeout_ends_a_busy_sequence(server: Server) -> None:
    sequence = send(server, "brief", value=1).headers[ID]
    started, sums = time.monotonic(), [1.0]
    while (response := send(server, "brief", sequence, value=1)).status_code == 200:
        sums.append(answer(response)["sum"])
        assert time.monotonic() - started < 10
        time.sleep(0.1)
    assert time.monotonic() - started > 1.4, "ended before sequenceTimeoutMSec"
    assert sums == [float(n) for n in range(1, len(sums) + 1)]
    assert response.status_code == 404
    assert response.json()["message"] == (
        f'Sequence "{sequence}" of model "brief" expired: sequenceTimeoutMSec=1500 ms have passed since it started'
    )


def test_max_num_sequence_and_max_sequence_job_queue_size_refuse_clearly(server: Server, tmp_path: Path) -> None:
    """``few``: at most maxNumSequence (2) sequences open, although one batch could hold 4 of them: TorchServe 0.12
    counts only maxNumSequence (its floor of batchSize x maxWorkers is computed before either is set, from zeros)."""
    a = send(server, "few", value=1).headers[ID]
    b = send(server, "few", value=2).headers[ID]
    refused = send(server, "few", value=3)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["type"] == "ServiceUnavailableException"
    assert refused.json()["message"] == (
        f'Model "few" {TORCHSERVE_WORDS} If this is a sequence inference, please check if it is closed, or expired;'
        " or exceeds maxSequenceJobQueueSize (2 sequences open, maxNumSequence=2)"
    )
    assert send(server, "few", f"mine-{uuid.uuid4()}", value=1).status_code == 503  # a client's id too
    gate = tmp_path / "open"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = pool.submit(send, server, "few", a, value=1, gate=str(gate))
        reached(gate)
        queued = pool.submit(send, server, "few", a, value=1)
        wait_pending(server, "few", 1)
        overflow = send(server, "few", a, value=1)  # maxSequenceJobQueueSize: 1 (TorchServe's default)
        assert overflow.status_code == 503, overflow.text
        assert overflow.json()["message"].endswith(f"(1 requests of sequence {a} waiting, maxSequenceJobQueueSize=1)")
        gate.touch()
        assert [answer(held.result(30))["sum"], answer(queued.result(30))["sum"]] == [2, 3]
    assert answer(send(server, "few", b, value=1))["sum"] == 3  # the open ones go on
    assert server.post("/predictions/few", json={"value": 0}, headers={ID: b, END: "true"}).status_code == 200
    assert answer(send(server, "few", value=5))["sum"] == 5  # a closed sequence frees its place


def test_a_worker_that_dies_fails_its_sequences_and_the_server_goes_on(server: Server, tmp_path: Path) -> None:
    a = send(server, "fragile", value=1)
    b = send(server, "fragile", value=100)
    assert answer(a)["pid"] != answer(b)["pid"]  # a new sequence takes an idle worker
    doomed, survivor = a.headers[ID], b.headers[ID]
    gate = tmp_path / "never"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(send, server, "fragile", doomed, value=1, gate=str(gate))
        reached(gate)
        queued = pool.submit(send, server, "fragile", doomed, value=1)
        wait_pending(server, "fragile", 1)
        os.kill(answer(a)["pid"], signal.SIGKILL)
        died, lost = running.result(30), queued.result(30)
    assert died.status_code == 500 and died.json()["type"] == "InternalServerException", died.text
    assert "Worker died while running model fragile" in died.json()["message"]
    assert lost.status_code == 500 and lost.json()["type"] == "InternalServerException"
    assert lost.json()["message"].startswith(f'Sequence "{doomed}" of model "fragile" ended when its worker died: ')
    after = send(server, "fragile", doomed, value=1)
    assert after.status_code == 404 and "ended when its worker died" in after.json()["message"]
    assert answer(send(server, "fragile", survivor, value=1))["sum"] == 101  # the other worker's state is intact
    fresh = send(server, "fragile", value=7)
    assert answer(fresh)["sum"] == 7 and answer(send(server, "fragile", fresh.headers[ID], value=1))["sum"] == 8


def test_grpc_stream_predictions2_runs_each_sequence_on_its_state(
    server: Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ts = client_modules(tmp_path_factory.mktemp("clients"))
    port = (server.workdir / "config.properties").read_text().split("grpc_inference_port=")[1].split()[0]
    messages = ts["inference_pb2"]

    def request(sequence: str, value: int, end: bool = False) -> Any:
        inputs = {"body": json.dumps({"value": value}).encode(), **({END: b"true"} if end else {})}
        return messages.PredictionsRequest(model_name="counter", input=inputs, sequence_id=sequence)

    a, b = f"grpc-a-{uuid.uuid4()}", f"grpc-b-{uuid.uuid4()}"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ts["inference_pb2_grpc"].InferenceAPIsServiceStub(channel)
        sent = [request(a, 1), request(b, 10), request(a, 2), request(b, 20), request(a, 3, end=True)]
        answers = list(stub.StreamPredictions2(iter(sent)))
        assert not any(m.HasField("status") for m in answers), answers
        sums = {s: [json.loads(m.prediction)["sum"] for m in answers if m.sequence_id == s] for s in (a, b)}
        assert sums == {a: [1, 3, 6], b: [10, 30]}
        assert len({json.loads(m.prediction)["pid"] for m in answers if m.sequence_id == a}) == 1
        again = list(stub.StreamPredictions2(iter([request(a, 1), request(b, 1)])))
    closed = next(m for m in again if m.sequence_id == a)
    assert closed.status.code == grpc.StatusCode.NOT_FOUND.value[0] and "is closed" in closed.status.message
    assert json.loads(next(m for m in again if m.sequence_id == b).prediction)["sum"] == 31


def test_unregistering_a_model_ends_its_open_sequences_at_once(server: Server) -> None:
    """Last of the module's server: an idle sequence holds its worker, which unregistering does not wait for."""
    sequence = send(server, "solo", value=1).headers[ID]
    started = time.monotonic()
    response = httpx.delete(f"{server.management}/models/solo", timeout=60)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 10  # not unregister_model_timeout (120 s)
    assert send(server, "solo", sequence, value=1).status_code == 404  # no such model now
    assert answer(send(server, "counter", value=1))["sum"] == 1  # the other models go on


def test_the_configured_header_keys_name_the_sequence(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    archive(store, tmp_path / "work", "keyed", CONFIGS["solo"])
    keys = {"ts_header_key_sequence_id": "X-Session", "ts_header_key_sequence_end": "X-Session-End"}
    with running_server(tmp_path / "run", store, ("keyed=keyed.mar",), keys) as srv:
        first = srv.post("/predictions/keyed", json={"value": 4})
        session = first.headers["x-session"]
        assert session.startswith("ts-seq-") and ID not in first.headers
        assert answer(first)["sequence"] == session  # context.get_sequence_id
        second = srv.post("/predictions/keyed", json={"value": 1}, headers={"X-Session": session})
        assert answer(second)["sum"] == 5 and second.headers["x-session"] == session
        ignored = srv.post("/predictions/keyed", json={"value": 1}, headers={ID: session})  # not the key here
        assert ignored.headers["x-session"] != session and answer(ignored)["sum"] == 1
        end = srv.post("/predictions/keyed", json={"value": 1}, headers={"X-Session": session, "X-Session-End": "true"})
        assert answer(end)["sum"] == 6
        closed = srv.post("/predictions/keyed", json={"value": 1}, headers={"X-Session": session})
        assert closed.status_code == 404
        assert closed.json()["message"].endswith("is closed: a request with X-Session-End: true ended it")
