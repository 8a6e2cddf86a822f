"""The frame protocol between the front end and a worker (``servekit.protocol``), in process, without a worker: every
message survives a round trip, and whatever a broken or hostile worker sends (truncated frames, wrong lengths, headers
that are not JSON or not the right shape, random bytes) is a ``ProtocolError``, never another exception and never a
hang; read from a worker's stream (``WorkerProcess.receive_batch``), it kills the worker with a ``WorkerDiedError``
that says why. Seeded, so a failure reproduces."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from typing import Any

import orjson
import pytest

from servekit import protocol
from servekit.errors import ProtocolError, ResponseTimeoutError, WorkerDiedError
from servekit.process import PoolSettings, WorkerProcess
from servekit.protocol import BatchResult, Failure, Field, LoadCommand, MetricRecord, Request, Response, Step

REQUESTS = [
    Request("a", {"content-type": "application/json"}, (Field("body", "application/json", b'{"x": 1}'),)),
    Request("b", {}, (Field("data", None, b"\x00\xff" * 100), Field("name", "text/plain", b""))),
    Request("c", {"x-\u00e9": "v\u00e9"}, ()),
]
RESPONSES = [
    Response(200, "application/json", b"[1, 2]", {"x-extra": "yes"}, None),
    Response(299, None, b"\x00" * 1000, {}, "Custom Phrase"),
    Response(500, "text/plain", b"", {}, ""),
]


def body_of(frame: list[bytes | bytearray | memoryview]) -> bytes:
    """A frame's body as ``decode`` takes it: what follows its total length."""
    data = b"".join(bytes(b) for b in frame)
    (total,) = protocol.LENGTH.unpack_from(data)
    assert total == len(data) - protocol.LENGTH.size
    return data[protocol.LENGTH.size :]


def test_protocol_batch_and_describe_round_trip() -> None:
    header, parts = protocol.decode(body_of(protocol.encode_batch(REQUESTS)))
    assert header["op"] == "batch"
    assert protocol.decode_batch(header, parts) == REQUESTS
    header, _ = protocol.decode(body_of(protocol.encode_describe(REQUESTS[2])))
    assert protocol.decode_describe(header) == REQUESTS[2]


def test_protocol_results_failures_and_partials_round_trip() -> None:
    metrics = (MetricRecord("PredictionTime", 1.5, "ms", "gauge", (("ModelName", "m"),)),)
    result = BatchResult(RESPONSES, 12.5, metrics)
    header, parts = protocol.decode(body_of(protocol.encode_result(result)))
    assert protocol.decode_result(header, parts, len(RESPONSES)) == result
    failure = BatchResult(Failure(507, "MemoryError", "Out of resources", "tb", verbatim=True), 3.0)
    header, parts = protocol.decode(body_of(protocol.encode_result(failure)))
    assert protocol.decode_result(header, parts, 4) == failure
    items = [(2, RESPONSES[0]), (0, RESPONSES[1])]
    header, parts = protocol.decode(body_of(protocol.encode_partial(items)))
    assert protocol.decode_partial(header, parts, 3) == items


@pytest.mark.parametrize(
    ("header", "parts", "expected", "words"),
    [
        ({"op": "result", "responses": [[200, None, {}, None]]}, [b""], 2, "expected 2 responses"),
        ({"op": "result", "responses": [[99, None, {}, None]]}, [b""], 1, "malformed response entry"),
        ({"op": "result", "responses": [[200, None, {"a": 1}, None]]}, [b""], 1, "headers must map strings"),
        ({"op": "result", "responses": [[200, 5, {}, None]]}, [b""], 1, "content type and reason"),
        ({"op": "result", "responses": [[200, None, {}, None]], "handler_ms": -1}, [b""], 1, "handler_ms"),
        ({"op": "result", "responses": [[200, None, {}, None]], "metrics": [[1]]}, [b""], 1, "malformed metric"),
        ({"op": "result", "responses": [], "metrics": [[]] * 1001}, [], 0, "at most 1000"),
        ({"op": "failure", "status": 200, "kind": "k", "message": "m", "traceback": ""}, [], 1, "out of range"),
        ({"op": "failure", "status": 500}, [], 1, "malformed failure"),
    ],
)
def test_protocol_malformed_results_are_protocol_errors(
    header: dict[str, Any], parts: list[bytes], expected: int, words: str
) -> None:
    frame = protocol.encode({k: v for k, v in header.items() if k != "parts"}, parts)
    decoded, views = protocol.decode(body_of(frame))
    with pytest.raises(ProtocolError, match=words):
        protocol.decode_result(decoded, views, expected)


def test_protocol_partial_indices_outside_the_batch_are_protocol_errors() -> None:
    header, parts = protocol.decode(body_of(protocol.encode_partial([(3, RESPONSES[0])])))
    with pytest.raises(ProtocolError, match="out of range"):
        protocol.decode_partial(header, parts, 3)


def decode_anything(body: bytes) -> None:
    """Everything the front end does with a frame from a worker; ``ProtocolError`` is the only failure allowed."""
    header, parts = protocol.decode(body)
    if header.get("op") == "partial":
        protocol.decode_partial(header, parts, 4)
    elif header.get("op") == "step":
        protocol.decode_step(header, parts, {"a", "b", "c"})
    else:
        protocol.decode_result(header, parts, len(parts))


STEP = Step((("a", RESPONSES[0], False), ("b", RESPONSES[1], True)), ("c",), True, 2.5, size=3)


def test_protocol_fuzz_malformed_frames_only_ever_raise_protocol_error() -> None:
    rng = random.Random(1234)
    valid = [
        body_of(protocol.encode_result(BatchResult(RESPONSES, 1.0))),
        body_of(protocol.encode_result(BatchResult(Failure(500, "ValueError", "x", "tb")))),
        body_of(protocol.encode_partial([(1, RESPONSES[0])])),
        body_of(protocol.encode_step(STEP)),
    ]
    not_headers: list[Any] = [{"parts": [1, 2]}, {"parts": "x"}, [], 5, {"parts": [-1]}, {}]
    header_only = [orjson.dumps(h) for h in not_headers]
    cases = 0
    for _ in range(3000):
        base = bytearray(rng.choice(valid))
        mutation = rng.randrange(5)
        if mutation == 0:  # cut short
            base = base[: rng.randrange(len(base))]
        elif mutation == 1:  # flip bytes
            for _ in range(rng.randrange(1, 8)):
                base[rng.randrange(len(base))] = rng.randrange(256)
        elif mutation == 2:  # a header length that lies
            base[0:4] = protocol.LENGTH.pack(rng.choice([0, 1, len(base), 2**32 - 1, rng.randrange(len(base))]))
        elif mutation == 3:  # a header that is JSON but not a frame header
            head = rng.choice(header_only)
            base = bytearray(protocol.LENGTH.pack(len(head)) + head + bytes(rng.randrange(4)))
        else:  # random bytes
            base = bytearray(rng.randbytes(rng.randrange(64)))
        try:
            decode_anything(bytes(base))
        except ProtocolError:
            cases += 1
    assert cases > 2000  # nearly every mutation is caught as malformed (a few flips land in payload bytes)


def test_protocol_send_and_receive_whole_frames_over_a_socket() -> None:
    """``send_frame``/``recv_frame`` carry a frame of many small parts (sent as one buffer) and one of many parts,
    larger than the socket buffer, and ``None`` marks the peer's close between frames; a close inside a frame is a
    ``ProtocolError``."""
    left, right = socket.socketpair()
    small = [Request(str(i), {}, (Field("body", None, b"%d\n" % i),)) for i in range(300)]
    big = [Request(str(i), {}, (Field("body", None, bytes([i % 256]) * 50_000),)) for i in range(40)]

    def send() -> None:
        protocol.send_frame(left, protocol.encode_batch(small))
        protocol.send_frame(left, protocol.encode_batch(big))
        left.close()

    sender = threading.Thread(target=send)
    sender.start()
    for batch in (small, big):
        body = protocol.recv_frame(right)
        assert body is not None
        header, parts = protocol.decode(body)
        assert protocol.decode_batch(header, parts) == batch
    sender.join(timeout=30)
    assert protocol.recv_frame(right) is None
    right.close()
    left, right = socket.socketpair()
    left.sendall(protocol.LENGTH.pack(100) + b"short")
    left.close()
    with pytest.raises(ProtocolError, match="closed inside a frame"):
        protocol.recv_frame(right)
    right.close()


def test_protocol_step_round_trips_and_names_only_running_requests() -> None:
    header, parts = protocol.decode(body_of(protocol.encode_step(STEP)))
    assert protocol.decode_step(header, parts, {"a", "b", "c"}) == STEP
    with pytest.raises(ProtocolError, match="not running"):
        protocol.decode_step(header, parts, {"a", "b"})
    with pytest.raises(ProtocolError, match="size"):
        protocol.decode_step({**header, "size": -1}, parts, {"a", "b", "c"})


async def receive(stream: bytes, eof: bool = True, response_timeout: float = 60) -> BatchResult:
    """What the front end makes of ``stream`` as a worker's answer to a batch of 3 (``WorkerProcess.receive_batch``
    over an in-process stream: no process, no socket)."""
    settings = PoolSettings(response_timeout=response_timeout, startup_timeout=60, max_response_size=10_000)
    worker = WorkerProcess(LoadCommand("m", "/nonexistent", "handler", {}, {}, 3, None, 1), settings)
    reader = asyncio.StreamReader()
    reader.feed_data(stream)
    if eof:
        reader.feed_eof()
    worker._reader = reader
    return await worker.receive_batch(3, lambda chunks: None)


def test_protocol_fuzz_a_worker_stream_is_answered_or_its_worker_dies_clearly() -> None:
    """Whatever bytes a worker sends (random, cut short, lengths that lie, a frame past ``max_response_size``), the
    front end gets the batch's result or ``WorkerDiedError`` saying why, and never waits past the stream's end."""
    rng = random.Random(4321)
    whole = b"".join(bytes(b) for b in protocol.encode_result(BatchResult(RESPONSES, 1.0)))
    partial = b"".join(bytes(b) for b in protocol.encode_partial([(0, RESPONSES[0])]))

    async def fuzz() -> tuple[int, int]:
        answered = died = 0
        for _ in range(1500):
            stream = bytearray(rng.choice([whole, partial + whole, partial]))
            mutation = rng.randrange(5)
            if mutation == 0:  # cut short
                stream = stream[: rng.randrange(len(stream))]
            elif mutation == 1:  # flip bytes
                for _ in range(rng.randrange(1, 8)):
                    stream[rng.randrange(len(stream))] = rng.randrange(256)
            elif mutation == 2:  # a frame length that lies, up to the largest
                stream[0:4] = protocol.LENGTH.pack(rng.choice([0, 1, 7, 2**31, 2**32 - 1, rng.randrange(len(stream))]))
            elif mutation == 3:  # random bytes
                stream = bytearray(rng.randbytes(rng.randrange(64)))
            try:
                result = await receive(bytes(stream))
            except WorkerDiedError as exc:
                assert exc.message.startswith("Worker died while running model m: ")
                died += 1
            else:
                assert isinstance(result, BatchResult)
                answered += 1
        return answered, died

    answered, died = asyncio.run(asyncio.wait_for(fuzz(), 30))
    assert died > 1000 and answered + died == 1500


@pytest.mark.parametrize(
    ("stream", "words"),
    [
        (protocol.LENGTH.pack(2**32 - 1), "exceeds the limit"),
        (protocol.LENGTH.pack(100) + b"short", "no process"),  # the stream ended inside the frame
        (protocol.LENGTH.pack(8) + protocol.LENGTH.pack(4) + b"nope", "not JSON"),
        (b"", "no process"),
    ],
)
def test_protocol_malformed_worker_streams_kill_the_worker_with_the_reason(stream: bytes, words: str) -> None:
    with pytest.raises(WorkerDiedError, match=words):
        asyncio.run(receive(stream))


def test_protocol_a_worker_that_stops_mid_frame_misses_its_response_timeout() -> None:
    with pytest.raises(ResponseTimeoutError, match=r"response_timeout=0\.001s"):
        asyncio.run(receive(protocol.LENGTH.pack(100) + b"part", eof=False, response_timeout=0.001))
