"""Continuous batching end to end (issue 17, item 2) on a real server, with the tiny generative transformer of
``examples/generative`` (random weights, seeded, greedy decoding with a KV cache) and its handler, plus test hooks:
chunks stream as they are made, requests join and leave a running batch, a client that goes away leaves it, errors
stay with their request, and every answer is what the model gives for that prompt alone. Ordering is proven with
gates (files the test creates) and with probes (a request whose one chunk lists the request ids of its iteration),
never with timing."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import httpx
import pytest

from tests.helpers import Server, free_port, make_archive, running_server
from tests.torchserve_protos import client_modules

EXAMPLE = Path(__file__).parent.parent / "examples" / "generative"

# The example's handler with hooks, by request field (of the JSON body over HTTP, of the input "data" over gRPC):
# "pause_at": k and "gate": path (after k tokens the request idles, making no token, until the file exists),
# "fail_at": k (its k-th token is an error), "probe": true (its one chunk is {"ids": the request ids of its iteration,
# "pid": the worker's}), "pad": n (n spaces after each token: chunks big enough to fill a connection's buffers).
PROBING_HANDLER = """
import json
import os
import time

from handler import Generator


def hooks_of(row):
    body = row.get("body") or row.get("data")
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(body)
        except ValueError:
            body = None
    return body if isinstance(body, dict) else {}


class Probing(Generator):
    def initialize(self, context):
        super().initialize(context)
        self.hooks = {}
        self.made = {}

    def handle(self, data, context):
        if context.get_request_header(0, "describe") == "True":
            return super().handle(data, context)
        ids = [context.get_request_id(i) for i in range(len(data))]
        for rid, row in zip(ids, data):
            if row:
                self.hooks[rid], self.made[rid] = hooks_of(row), 0
        for gone in set(self.hooks) - set(ids):
            del self.hooks[gone], self.made[gone]
        chunks = super().handle(data, context)
        for i, rid in enumerate(ids):
            hooks = self.hooks[rid]
            self.made[rid] += 1 if chunks[i] else 0
            if hooks.get("probe"):
                chunks[i] = json.dumps({"ids": ids, "pid": os.getpid()})
            elif hooks.get("fail_at") == self.made[rid] and chunks[i]:
                context.set_response_status(500, "Injected", i)
                chunks[i] = f"injected failure at token {self.made[rid]}"
            elif chunks[i] and hooks.get("pad"):
                chunks[i] += " " * hooks["pad"]
        if not any(chunks):
            time.sleep(0.005)  # every request idles: no need to spin
        return chunks

    def advance(self, rid, token):
        hooks = self.hooks.get(rid, {})
        if self.made.get(rid, 0) >= hooks.get("pause_at", 1 << 30) and not os.path.exists(hooks["gate"]):
            return ""  # computed, not taken: the same token comes again once the gate opens
        return super().advance(rid, token)
"""


def load_decoder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generative_decoder", EXAMPLE / "decoder.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference() -> Any:
    """The model run alone, in this process: ``reference(prompt, n)`` is the tokens an answer must hold."""
    decoder = load_decoder()
    model = decoder.build(0)
    return lambda prompt, n: decoder.generate(model, prompt, n)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("continuous")
    store = base / "store"
    store.mkdir()
    extra = [str(EXAMPLE / "decoder.py"), str(EXAMPLE / "handler.py")]
    config = "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 4\nhandler:\n  seed: 0\n"
    make_archive(store, "gen", PROBING_HANDLER, work=base, config=config + "continuousBatching: true\n", extra=extra)
    make_archive(store, "static", PROBING_HANDLER, work=base, config=config, extra=extra)
    ports = {"grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port())}
    with running_server(
        base / "run", store, ("gen=gen.mar", "static=static.mar"), {"enable_grpc": "true", **ports}
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def inference(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, ModuleType]]:
    """A gRPC stub of TorchServe's inference API, and its messages' module."""
    ts = client_modules(tmp_path_factory.mktemp("clients"))
    port = (server.workdir / "config.properties").read_text().split("grpc_inference_port=")[1].split()[0]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield ts["inference_pb2_grpc"].InferenceAPIsServiceStub(channel), ts["inference_pb2"]


def batch_sizes(server: Server) -> tuple[float, float]:
    """The requests and the iterations that model ``gen`` has run so far, from its ``servekit_batch_size``."""
    text = httpx.get(f"{server.metrics}/metrics").text
    samples = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if 'model_name="gen"' in line
    }
    return samples["servekit_batch_size_sum"], samples["servekit_batch_size_count"]


def extra_requests(server: Server, before: tuple[float, float]) -> float:
    """Since ``before`` (``batch_sizes``): the requests run beyond one per iteration."""
    total, iterations = batch_sizes(server)
    return (total - before[0]) - (iterations - before[1])


def tokens(text: str | bytes) -> list[int]:
    return [int(t) for t in text.split()]


def probe(server: Server) -> dict[str, Any]:
    """The request ids of the iteration a probe joins (``ids``) and the worker's ``pid``."""
    response = server.post("/predictions/gen", json={"prompt": "?", "max_new_tokens": 1, "probe": True})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = json.loads(response.text)
    return answer


def cancelled_calls(server: Server) -> int:
    """The gRPC streams the access log says were cancelled (status 1)."""
    return server.log_text().count('StreamPredictions HTTP/2.0" 1 ')


def await_cancelled_calls(server: Server, n: int) -> None:
    """Wait for the ``n``-th cancelled stream's access-log line (the log is flushed on a timer)."""
    deadline = time.monotonic() + 30
    while cancelled_calls(server) < n:
        assert time.monotonic() < deadline, f"the access log has {cancelled_calls(server)} cancelled streams, not {n}"
        time.sleep(0.05)


class Stream:
    """A streamed request read chunk by chunk."""

    def __init__(self, server: Server, body: dict[str, Any]) -> None:
        self.client = httpx.Client(timeout=60)
        self.response = self.client.send(
            self.client.build_request("POST", server.inference + "/predictions/gen", json=body), stream=True
        )
        self.chunks = self.response.iter_raw()
        self.text = b""

    @property
    def id(self) -> str:
        return self.response.headers["x-request-id"]

    def read(self, n: int) -> list[int]:
        """Wait for the first ``n`` tokens."""
        while self.text.count(b"\n") < n:
            self.text += next(self.chunks)
        return tokens(self.text)

    def rest(self) -> list[int]:
        self.text += b"".join(self.chunks)
        return tokens(self.text)

    def close(self) -> None:
        self.response.close()
        self.client.close()


def test_answers_are_what_the_model_gives_each_prompt_alone(server: Server, reference: Any) -> None:
    jobs = [(f"prompt {i} " + "x" * (i * 2), n) for i, n in enumerate([1, 2, 7, 30, 3, 19, 45, 5, 11, 1])]

    def ask(job: tuple[str, int]) -> httpx.Response:
        return server.post("/predictions/gen", json={"prompt": job[0], "max_new_tokens": job[1]})

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:  # more than batchSize: they take turns
        answers = list(pool.map(ask, jobs))
    for (prompt, n), answer in zip(jobs, answers, strict=True):
        assert answer.status_code == 200, answer.text
        assert tokens(answer.text) == reference(prompt, n)
        streamed = answer.headers.get("transfer-encoding") == "chunked"
        assert streamed == (n > 1) and answer.headers["ts_stream_next"] == ("true" if n > 1 else "false")


def test_chunks_stream_and_requests_join_and_leave_a_running_batch(
    server: Server, reference: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    long = Stream(server, {"prompt": "a long answer", "max_new_tokens": 40, "pause_at": 3, "gate": str(gate)})
    try:
        assert long.read(3) == reference("a long answer", 40)[:3]  # out before the last exists (the gate is shut)
        before = batch_sizes(server)
        short = server.post("/predictions/gen", json={"prompt": "short", "max_new_tokens": 6})  # joins, ends
        assert tokens(short.text) == reference("short", 6)
        assert long.id in probe(server)["ids"]  # the long one is still in the batch: a new request joined it
        # every iteration since ran the long one, and the short one ran 6, the probe 1: the requests of an iteration
        # are counted once each, the joining ones too (their first chunks go out ahead of the iteration's step, so
        # the probe's answer can come just before its iteration is counted)
        deadline = time.monotonic() + 10
        while (joined := extra_requests(server, before)) < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert joined == 7
        gate.touch()
        assert long.rest() == reference("a long answer", 40)
    finally:
        long.close()


def test_a_client_that_goes_away_leaves_the_batch(server: Server, tmp_path: Path) -> None:
    gone = Stream(server, {"prompt": "never read", "max_new_tokens": 50, "pause_at": 2, "gate": str(tmp_path / "no")})
    gone.read(2)
    assert gone.id in probe(server)["ids"]
    gone.close()
    deadline = time.monotonic() + 30
    while gone.id in probe(server)["ids"]:  # it leaves at the worker's next iteration
        assert time.monotonic() < deadline, "the request of a client that went away is still in the batch"
    log = server.log_text()
    assert "Traceback" not in log


def test_a_bad_request_fails_alone(server: Server, reference: Any, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    long = Stream(server, {"prompt": "keeps going", "max_new_tokens": 30, "pause_at": 2, "gate": str(gate)})
    try:
        long.read(2)
        bodies: list[dict[str, Any]] = [
            {"prompt": "", "max_new_tokens": 4},
            {"prompt": "fine", "max_new_tokens": 4},
            {"prompt": "fails", "max_new_tokens": 9, "fail_at": 1},
        ]
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:  # likely to join the same iteration
            bad, good, failing = pool.map(lambda body: server.post("/predictions/gen", json=body), bodies)
        assert (bad.status_code, bad.json()["message"]) == (400, "prompt must be a non-empty string")
        assert tokens(good.text) == reference("fine", 4)
        assert (failing.status_code, failing.text) == (500, "injected failure at token 1")
        # a failure mid-stream cuts that stream short, and only that one
        url = server.inference + "/predictions/gen"
        cut = {"prompt": "cut", "max_new_tokens": 20, "fail_at": 4}
        with pytest.raises(httpx.RemoteProtocolError), httpx.stream("POST", url, json=cut, timeout=60) as response:
            assert response.status_code == 200
            b"".join(response.iter_raw())
        gate.touch()
        assert long.rest() == reference("keeps going", 30)
    finally:
        long.close()


def test_the_model_is_described_while_a_generation_runs(server: Server, reference: Any, tmp_path: Path) -> None:
    """A plain describe never waits for the worker: it answers while a generation is held at its gate. A customized
    one (the handler's ``describe_handle``) runs on the worker once its batch is empty, as TorchServe runs it, and
    the generation it waited for ends intact."""
    gate = tmp_path / "gate"
    long = Stream(server, {"prompt": "described", "max_new_tokens": 20, "pause_at": 2, "gate": str(gate)})
    try:
        long.read(2)
        plain = httpx.get(server.management + "/models/gen", timeout=60)
        assert plain.status_code == 200, plain.text
        [entry] = plain.json()
        assert entry["continuousBatching"] is True and len(entry["workers"]) == 1
        assert "customizedMetadata" not in entry
        assert long.id in probe(server)["ids"]  # answered while the generation was held at its gate
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            customized = pool.submit(httpx.get, server.management + "/models/gen?customized=true", timeout=60)
            gate.touch()
            assert long.rest() == reference("described", 20)
            answer = customized.result(timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()[0]["customizedMetadata"] == {"continuous": True, "generating": 0}
    finally:
        long.close()
    assert tokens(server.post("/predictions/gen", json={"prompt": "after", "max_new_tokens": 3}).text) == reference(
        "after", 3
    )


def test_static_batching_runs_the_same_handler_to_the_end(server: Server, reference: Any) -> None:
    jobs = [("static one", 3), ("static two", 17), ("static three", 1)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(
            pool.map(
                lambda job: server.post("/predictions/static", json={"prompt": job[0], "max_new_tokens": job[1]}),
                jobs,
            )
        )
    assert [tokens(a.text) for a in answers] == [reference(p, n) for p, n in jobs]


def test_a_worker_that_dies_fails_its_streams_and_is_replaced(server: Server, reference: Any, tmp_path: Path) -> None:
    held = Stream(server, {"prompt": "doomed", "max_new_tokens": 50, "pause_at": 1, "gate": str(tmp_path / "no")})
    try:
        held.read(1)
        os.kill(probe(server)["pid"], signal.SIGKILL)
        with pytest.raises(httpx.RemoteProtocolError):  # cut short: no last chunk
            held.rest()
    finally:
        held.close()
    answer = server.post("/predictions/gen", json={"prompt": "after", "max_new_tokens": 5})  # waits for the new one
    assert tokens(answer.text) == reference("after", 5)


def test_grpc_stream_predictions_sends_each_token_as_it_is_made(
    server: Server, inference: tuple[Any, ModuleType], reference: Any, tmp_path: Path
) -> None:
    stub, messages = inference

    def request(**body: Any) -> Any:
        return messages.PredictionsRequest(model_name="gen", input={"data": json.dumps(body).encode()})

    replies = [m.prediction for m in stub.StreamPredictions(request(prompt="over grpc", max_new_tokens=12))]
    assert [tokens(reply)[0] for reply in replies] == reference("over grpc", 12)  # one message per token
    call = stub.StreamPredictions(request(prompt="cancelled", max_new_tokens=60, pause_at=2, gate=str(tmp_path / "no")))
    assert [tokens(next(call).prediction)[0] for _ in range(2)] == reference("cancelled", 2)
    before, cancelled = set(probe(server)["ids"]), cancelled_calls(server)
    call.cancel()  # the call's request leaves the batch at the next iteration
    deadline = time.monotonic() + 30
    while before & set(probe(server)["ids"]):
        assert time.monotonic() < deadline, "the request of a cancelled call is still in the batch"
    await_cancelled_calls(server, cancelled + 1)


def test_a_grpc_call_cancelled_while_its_answer_is_being_sent_leaves_the_batch(
    server: Server, inference: tuple[Any, ModuleType], tmp_path: Path
) -> None:
    """Megabyte chunks that the client does not read fill the connection, so the cancel finds grpcio sending one:
    the server's stream is then closed after its call has ended (it once died there, of SIGSEGV, reading the
    call's peer for the access log)."""
    stub, messages = inference
    body = {"prompt": "unread", "max_new_tokens": 60, "pause_at": 8, "gate": str(tmp_path / "no"), "pad": 1 << 20}
    request = messages.PredictionsRequest(model_name="gen", input={"data": json.dumps(body).encode()})
    call = stub.StreamPredictions(request)
    next(call)
    before, cancelled = set(probe(server)["ids"]), cancelled_calls(server)
    call.cancel()
    deadline = time.monotonic() + 30
    while before & set(probe(server)["ids"]):
        assert time.monotonic() < deadline, "the request of a cancelled call is still in the batch"
    await_cancelled_calls(server, cancelled + 1)
    assert server.process.poll() is None
