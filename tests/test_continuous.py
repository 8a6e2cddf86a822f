"""The worker's loop under continuous batching (``servekit.continuous``), driven frame by frame over a socket pair:
a real ``Worker`` and handler in this process, the loop in a thread, the handler taking one iteration per tick the
test gives, so that what joins and leaves at each iteration is known. Also the ``Step`` frame's checks."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

from servekit import protocol
from servekit.continuous import IterationLoop
from servekit.errors import ProtocolError
from servekit.worker import Worker

COUNTDOWN = """
import threading

from servekit.handler import InvalidInput

ticks = threading.Semaphore(0)  # one iteration per tick of the test
left = {}  # request id -> chunks still to send
modes = {}  # request id -> its body
calls = []  # each call's [(request id, its inputs)]


def handle(data, context):
    if data is None:
        return None
    assert ticks.acquire(timeout=10), "the test gave no tick"
    ids = [context.get_request_id(i) for i in range(len(data))]
    calls.append(list(zip(ids, data)))
    for row in data:
        if row and row["body"].get("bad"):
            raise InvalidInput(f"bad request {row['body']['name']}")
    for rid, row in zip(ids, data):
        if row:
            left[rid], modes[rid] = row["body"]["n"], row["body"]
    if any(modes[rid].get("explode_at") == left[rid] for rid in ids):
        raise RuntimeError("the model fell over")
    if any(modes[rid].get("extra") for rid in ids):
        context.send_intermediate_response([f"extra {rid}" if modes[rid].get("extra") else "" for rid in ids])
    out = []
    for i, rid in enumerate(ids):
        left[rid] -= 1
        out.append(f"{modes[rid]['name']}:{left[rid]}")
        if modes[rid].get("fail_at") == left[rid]:
            context.set_response_status(500, "boom", i)
        if modes[rid].get("header") and left[rid]:
            context.set_response_header(i, "ts_stream_next", "true")
    context.stopping_criteria = [(lambda result, rid=rid: stop(rid)) for rid in ids]
    return out


def stop(rid):
    if modes[rid].get("stop_fails_at") == left[rid]:
        raise ValueError("no verdict")
    return None if modes[rid].get("header") else left[rid] == 0
"""


class Anything:
    def __contains__(self, item: object) -> bool:
        return True


class Driver:
    """The front end's side of the socket pair, and the handler module running in the loop."""

    def __init__(self, front: socket.socket, handler: ModuleType) -> None:
        self.front = front
        self.handler = handler

    def send(self, *bodies: dict[str, Any], raw: bytes | None = None) -> None:
        requests = [
            protocol.Request(
                body["name"], {}, (protocol.Field("body", "application/json", raw or json.dumps(body).encode()),)
            )
            for body in bodies
        ]
        protocol.send_frame(self.front, protocol.encode_batch(requests))

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.handler.ticks.release()

    def step(self) -> protocol.Step:
        body = protocol.recv_frame(self.front)
        assert body is not None
        header, parts = protocol.decode(body)
        return protocol.decode_step(header, parts, Anything())

    def iteration(self) -> protocol.Step:
        """Tick, then the step of that iteration, with the chunks that came ahead of it: the first chunks of the
        requests that joined it, in a step of their own while others run (and any sent from inside the call)."""
        self.tick()
        ahead: tuple[tuple[str, protocol.Response, bool], ...] = ()
        while not (step := self.step()).iteration:
            ahead += step.chunks
        return replace(step, chunks=ahead + step.chunks)


def texts(step: protocol.Step) -> dict[str, tuple[int, str, bool]]:
    return {rid: (r.status, r.payload.decode(), last) for rid, r, last in step.chunks}


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Driver]:
    name = f"countdown_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(COUNTDOWN))
    command = protocol.LoadCommand(
        model_name="m",
        model_dir=str(tmp_path),
        handler=name,
        manifest={},
        model_yaml_config={"continuousBatching": True},
        batch_size=4,
        gpu_id=None,
        torch_threads=1,
    )
    worker = Worker(command)
    front, back = socket.socketpair()
    front.settimeout(10)
    thread = threading.Thread(target=IterationLoop(worker, back).serve, daemon=True)
    thread.start()
    try:
        yield Driver(front, sys.modules[name])
    finally:
        front.close()
        sys.modules[name].ticks.release(1000)
        thread.join(10)
        back.close()
        sys.modules.pop(name)


def test_each_iteration_sends_one_chunk_per_request_until_its_stopping_criterion(driver: Driver) -> None:
    driver.send({"name": "a", "n": 2}, {"name": "b", "n": 3})
    assert texts(driver.iteration()) == {"a": (200, "a:1", False), "b": (200, "b:2", False)}
    assert texts(driver.iteration()) == {"a": (200, "a:0", True), "b": (200, "b:1", False)}
    last = driver.iteration()
    assert texts(last) == {"b": (200, "b:0", True)}
    assert last.chunks[0][1].headers == {"ts_stream_next": "false"}  # TorchServe's header, as its worker sets it
    # inputs reach the handler once, on the iteration a request joins; {} after (TorchServe's "cached in backend")
    assert [[row for _, row in call] for call in driver.handler.calls] == [
        [{"body": {"name": "a", "n": 2}}, {"body": {"name": "b", "n": 3}}],
        [{}, {}],
        [{}],
    ]


def test_a_request_joins_at_the_next_iteration_and_leaves_when_done(driver: Driver) -> None:
    driver.send({"name": "long", "n": 6})
    assert texts(driver.iteration()) == {"long": (200, "long:5", False)}
    driver.send({"name": "short", "n": 2})
    seen: list[dict[str, tuple[int, str, bool]]] = []
    while not any(rid == "short" and last for step in seen for rid, (_, _, last) in step.items()):
        seen.append(texts(driver.iteration()))
    first = next(i for i, step in enumerate(seen) if "short" in step)
    assert all(step["long"][2] is False for step in seen)  # the short one came and went while the long one ran
    assert [step["short"][1] for step in seen[first:]] == ["short:1", "short:0"]
    while driver.iteration().chunks[0][2] is False:
        pass
    assert len(driver.handler.calls[-1]) == 1  # the long one ended alone


def test_the_first_chunks_of_requests_joining_go_out_before_the_others(driver: Driver) -> None:
    driver.send({"name": "a", "n": 5}, {"name": "b", "n": 5})
    driver.tick()
    assert (step := driver.step()).iteration and texts(step) == {"a": (200, "a:4", False), "b": (200, "b:4", False)}
    driver.send({"name": "c", "n": 2}, {"name": "d", "n": 1})
    driver.tick()  # the iteration a and b run when c and d arrive: they join the next one
    assert texts(driver.step()) == {"a": (200, "a:3", False), "b": (200, "b:3", False)}
    driver.tick()
    # a client waits for its first token, the others only for their next: c's and d's chunks come first, alone
    first, rest = driver.step(), driver.step()
    assert (first.iteration, texts(first)) == (False, {"c": (200, "c:1", False), "d": (200, "d:0", True)})
    assert (rest.iteration, texts(rest)) == (True, {"a": (200, "a:2", False), "b": (200, "b:2", False)})
    assert [rid for rid, _ in driver.handler.calls[-1]] == ["a", "b", "c", "d"]  # one call: the handler's order kept
    assert texts(driver.iteration()) == {"a": (200, "a:1", False), "b": (200, "b:1", False), "c": (200, "c:0", True)}


def test_a_dropped_request_leaves_at_the_next_iteration(driver: Driver) -> None:
    driver.send({"name": "a", "n": 100}, {"name": "b", "n": 100})
    driver.iteration()
    protocol.send_frame(driver.front, protocol.encode_drop(["a", "gone-already"]))
    steps = [driver.iteration() for _ in range(3)]
    assert [step.dropped for step in steps if step.dropped] == [("a",)]  # confirmed once; the unknown id ignored
    assert [rid for rid, _ in driver.handler.calls[-1]] == ["b"]
    protocol.send_frame(driver.front, protocol.encode_drop(["b"]))
    driver.tick()  # the iteration that was being formed when the drop came
    while not (step := driver.step()).dropped:
        pass
    assert step.dropped == ("b",)


def test_a_joining_request_that_fails_the_iteration_fails_alone(driver: Driver) -> None:
    driver.send({"name": "c", "n": 8})
    driver.iteration()
    driver.send({"name": "g1", "n": 2}, {"name": "bad", "n": 2, "bad": True}, {"name": "g2", "n": 2})
    answers: dict[str, list[tuple[int, str, bool]]] = {}
    while not all(rid in answers and answers[rid][-1][2] for rid in ("c", "g1", "bad", "g2")):
        for rid, chunk in texts(driver.iteration()).items():
            answers.setdefault(rid, []).append(chunk)
    assert [payload for _, payload, _ in answers["c"]] == [f"c:{n}" for n in range(6, -1, -1)]  # none lost or twice
    assert answers["g1"] == [(200, "g1:1", False), (200, "g1:0", True)]
    assert answers["g2"] == [(200, "g2:1", False), (200, "g2:0", True)]
    (status, body, last), *_ = answers["bad"]
    assert (status, last, json.loads(body)["message"]) == (400, True, "bad request bad")


def test_an_error_status_ends_its_request_alone(driver: Driver) -> None:
    driver.send({"name": "a", "n": 4, "fail_at": 2}, {"name": "b", "n": 4})
    driver.iteration()
    assert texts(driver.iteration()) == {"a": (500, "a:2", True), "b": (200, "b:2", False)}
    assert texts(driver.iteration()) == {"b": (200, "b:1", False)}


def test_a_stopping_criterion_that_raises_fails_its_request_alone(driver: Driver) -> None:
    driver.send({"name": "a", "n": 4, "stop_fails_at": 2}, {"name": "b", "n": 4})
    driver.iteration()
    chunks = texts(driver.iteration())
    assert chunks["b"] == (200, "b:2", False)
    status, body, last = chunks["a"]
    assert (status, last) == (500, True)
    assert json.loads(body)["message"] == "stopping_criteria[0] failed: ValueError: no verdict"
    assert texts(driver.iteration()) == {"b": (200, "b:1", False)}


def test_an_exception_with_no_request_joining_fails_the_iteration(driver: Driver) -> None:
    driver.send({"name": "a", "n": 5, "explode_at": 3}, {"name": "b", "n": 5})
    driver.iteration()
    driver.iteration()
    failed = texts(driver.iteration())
    assert {rid: (status, last) for rid, (status, _, last) in failed.items()} == {"a": (500, True), "b": (500, True)}
    assert "RuntimeError: the model fell over" in json.loads(failed["a"][1])["message"]


def test_the_header_ts_stream_next_keeps_a_request_going(driver: Driver) -> None:
    driver.send({"name": "h", "n": 2, "header": True})
    assert texts(driver.iteration()) == {"h": (200, "h:1", False)}
    assert texts(driver.iteration()) == {"h": (200, "h:0", True)}


def test_intermediate_chunks_go_out_before_the_iteration_ends(driver: Driver) -> None:
    driver.send({"name": "x", "n": 1, "extra": True}, {"name": "y", "n": 1})
    driver.tick()
    inside, end = driver.step(), driver.step()
    # y's chunk is empty: nothing to stream; x's goes on, as TorchServe marks an intermediate chunk
    assert (inside.iteration, texts(inside)) == (False, {"x": (200, "extra x", False)})
    assert [response.headers["ts_stream_next"] for _, response, _ in inside.chunks] == ["true"]
    assert (end.iteration, texts(end)) == (True, {"x": (200, "x:0", True), "y": (200, "y:0", True)})


def test_a_malformed_body_is_answered_at_once(driver: Driver) -> None:
    driver.send({"name": "broken"}, raw=b"{not json")
    step = driver.step()
    (rid, response, last), *_ = step.chunks
    assert (rid, response.status, last, step.iteration) == ("broken", 400, True, False)
    assert driver.handler.calls == []


def test_a_step_naming_a_request_not_running_is_a_protocol_error() -> None:
    step = protocol.Step((("a", protocol.Response(200, None, b"x"), False),), dropped=("b",))
    header, parts = protocol.decode(b"".join(protocol.encode_step(step))[protocol.LENGTH.size :])
    assert protocol.decode_step(header, parts, {"a", "b"}) == step
    with pytest.raises(ProtocolError, match="not running"):
        protocol.decode_step(header, parts, {"a"})
    malformed = orjson.loads(orjson.dumps(header)) | {"chunks": [["a", 200, None, {}, None, "yes"]]}
    with pytest.raises(ProtocolError, match="malformed"):
        protocol.decode_step(malformed, parts, {"a", "b"})
