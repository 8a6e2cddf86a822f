"""Messages between the front end and a worker process, and how they are framed.

A frame is ``>I`` total length, ``>I`` header length, a JSON header, then the binary parts (request
bodies, response payloads) back to back; the header lists their lengths under ``"parts"``. Bodies
therefore cross the boundary as raw bytes, never re-encoded. The front end decodes every frame from a
worker with ``decode``, which checks every length before use and raises ``ProtocolError``.

No asyncio (the worker imports this module); JSON by ``orjson``, several times faster than the standard library's
on the headers of every frame.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Container, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from servekit.errors import ProtocolError

PREFIX = struct.Struct(">II")  # frame length (after these 4 bytes), header length
LENGTH = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class LoadCommand:
    """Sent once to a new worker: what to load and how."""

    model_name: str
    model_dir: str
    handler: str
    manifest: dict[str, Any]
    model_yaml_config: dict[str, Any]
    batch_size: int
    gpu_id: int | None
    torch_threads: int
    decode_input_request: bool = True
    max_response_size: int = 6553500
    envelope: str | None = None  # TorchServe's request envelope around the handler (servekit.envelope)


@dataclass(slots=True)
class Field:
    """One input of a request: the whole body (name ``body``) or one form field."""

    name: str
    content_type: str | None
    value: bytes


@dataclass(slots=True)
class Request:
    request_id: str
    headers: dict[str, str]
    fields: tuple[Field, ...]


@dataclass(slots=True)
class Response:
    """One request's answer from the handler."""

    status: int
    content_type: str | None
    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)
    reason: str | None = None
    more: Any = None  # front end only: the rest of a streamed response, an async iterator of bytes


@dataclass(frozen=True, slots=True)
class Failure:
    """A whole batch (or a load) failed; crosses the boundary as data, never as a pickled exception."""

    status: int
    kind: str
    message: str
    traceback: str = ""
    verbatim: bool = False  # ``message`` is the client's whole answer, as the handler gave it (``failure_message``)


@dataclass(frozen=True, slots=True)
class MetricRecord:
    """A metric a handler emitted through ``context.metrics``; the front end exposes it."""

    name: str
    value: float
    unit: str
    kind: str  # "counter" accumulates, "gauge" keeps the last value, "histogram" counts into buckets
    dimensions: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What came back for one batch: its responses or one failure, the handler's time and its metrics."""

    outcome: list[Response] | Failure
    handler_ms: float = 0.0
    metrics: tuple[MetricRecord, ...] = ()
    roundtrip_ms: float = 0.0  # front end only (the pool's): from when the worker could start the batch to its result


MAX_RECORDS = 1000  # metric records per batch; more is a protocol error


def failure_message(model: str, failure: Failure) -> str:
    """What a client is told when its batch failed in the handler: the message alone when it is ``verbatim`` (a
    ``PredictionException``'s, or ``MemoryError``'s "Out of resources", as TorchServe sends them), else the model
    and the exception's type with it."""
    if failure.verbatim:
        return failure.message
    return f"Prediction failed for model {model}: {failure.kind}: {failure.message}"


def encode(
    header: dict[str, Any], parts: Sequence[bytes | bytearray | memoryview] = ()
) -> list[bytes | bytearray | memoryview]:
    """The frame as a list of buffers, ready for ``writelines``/``sendmsg`` without joining them."""
    lengths = [len(p) for p in parts]
    head = orjson.dumps({**header, "parts": lengths})
    total = LENGTH.size + len(head) + sum(lengths)
    return [PREFIX.pack(total, len(head)), head, *parts]


def decode(body: bytes) -> tuple[dict[str, Any], list[memoryview]]:
    """Split a frame body (what follows the total length) into its header and parts."""
    if len(body) < LENGTH.size:
        raise ProtocolError("frame shorter than its header length")
    (head_len,) = LENGTH.unpack_from(body)
    if head_len > len(body) - LENGTH.size:
        raise ProtocolError(f"header length {head_len} exceeds frame of {len(body)} bytes")
    try:
        header = orjson.loads(body[LENGTH.size : LENGTH.size + head_len])
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    lengths = header.get("parts") if isinstance(header, dict) else None
    if not isinstance(lengths, list) or not all(isinstance(n, int) and n >= 0 for n in lengths):
        raise ProtocolError("header has no valid parts list")
    offset = LENGTH.size + head_len
    if offset + sum(lengths) != len(body):
        raise ProtocolError("part lengths do not add up to the frame length")
    view = memoryview(body)
    parts = []
    for n in lengths:
        parts.append(view[offset : offset + n])
        offset += n
    return header, parts


def encode_load(command: LoadCommand) -> list[bytes | bytearray | memoryview]:
    return encode({"op": "load", **asdict(command)})


def encode_batch(requests: Sequence[Request]) -> list[bytes | bytearray | memoryview]:
    meta = [
        {"id": r.request_id, "headers": r.headers, "fields": [[f.name, f.content_type] for f in r.fields]}
        for r in requests
    ]
    return encode({"op": "batch", "requests": meta}, [f.value for r in requests for f in r.fields])


def encode_describe(request: Request) -> list[bytes | bytearray | memoryview]:
    """TorchServe's describe request (``GET /models/{m}?customized=true``): one request without inputs, answered
    by the handler's ``describe_handle``; its result comes back as a batch's of one."""
    return encode({"op": "describe", "id": request.request_id, "headers": request.headers})


def decode_describe(header: dict[str, Any]) -> Request:
    return Request(header["id"], header["headers"], ())


def decode_batch(header: dict[str, Any], parts: list[memoryview]) -> list[Request]:
    values = iter(parts)
    return [
        Request(
            meta["id"],
            meta["headers"],
            tuple(Field(name, ctype, bytes(next(values))) for name, ctype in meta["fields"]),
        )
        for meta in header["requests"]
    ]


def encode_result(result: BatchResult) -> list[bytes | bytearray | memoryview]:
    timing = {
        "handler_ms": result.handler_ms,
        "metrics": [[m.name, m.value, m.unit, m.kind, [list(d) for d in m.dimensions]] for m in result.metrics],
    }
    if isinstance(result.outcome, Failure):
        return encode({"op": "failure", **asdict(result.outcome), **timing})
    meta = [[r.status, r.content_type, r.headers, r.reason] for r in result.outcome]
    return encode({"op": "result", "responses": meta, **timing}, [r.payload for r in result.outcome])


def decode_result(header: dict[str, Any], parts: list[memoryview], expected: int) -> BatchResult:
    """A batch's result from a worker; anything malformed is a ``ProtocolError``."""
    if header.get("op") == "failure":
        outcome: list[Response] | Failure = decode_failure(header)
    else:
        outcome = decode_responses(header, parts, expected)
    handler_ms = header.get("handler_ms", 0.0)
    if not isinstance(handler_ms, int | float) or not 0 <= handler_ms < 1e12:
        raise ProtocolError("handler_ms must be a non-negative number")
    return BatchResult(outcome, float(handler_ms), _decode_metrics(header.get("metrics", [])))


def _decode_metrics(items: Any) -> tuple[MetricRecord, ...]:
    if not isinstance(items, list) or len(items) > MAX_RECORDS:
        raise ProtocolError(f"metrics must be a list of at most {MAX_RECORDS} records")
    records = []
    for item in items:
        try:
            name, value, unit, kind, dimensions = item
            dims = tuple((str(k), str(v)) for k, v in dimensions)
            record = MetricRecord(str(name), float(value), str(unit), str(kind), dims)
        except (TypeError, ValueError):
            raise ProtocolError(f"malformed metric record {item!r:.200}") from None
        records.append(record)
    return tuple(records)


def encode_partial(items: Sequence[tuple[int, Response]]) -> list[bytes | bytearray | memoryview]:
    """Intermediate responses (a streamed chunk each) for requests of the running batch, by index."""
    meta = [[i, r.status, r.content_type, r.headers, r.reason] for i, r in items]
    return encode({"op": "partial", "responses": meta}, [r.payload for _, r in items])


def decode_partial(header: dict[str, Any], parts: list[memoryview], batch: int) -> list[tuple[int, Response]]:
    """Intermediate responses for a batch of ``batch`` requests; anything malformed is a ``ProtocolError``."""
    meta = header.get("responses")
    if not isinstance(meta, list) or len(meta) != len(parts) or not meta:
        raise ProtocolError("malformed partial responses")
    indices = [item[0] if isinstance(item, list) and item else None for item in meta]
    if not all(isinstance(i, int) and 0 <= i < batch for i in indices):
        raise ProtocolError(f"partial response index out of range for a batch of {batch}")
    responses = decode_responses({"responses": [item[1:] for item in meta]}, parts, len(meta))
    return list(zip(indices, responses, strict=True))  # type: ignore[arg-type]


def continuous_batching(model_yaml_config: dict[str, Any]) -> bool:
    """Whether a model is served by continuous batching: its model-config YAML says ``continuousBatching: true``
    (a YAML boolean, as TorchServe reads it: anything else is off)."""
    return model_yaml_config.get("continuousBatching") is True


@dataclass(frozen=True, slots=True)
class Step:
    """What a worker under continuous batching (``servekit.continuous``) sends: a chunk of the answer of some of its
    requests, by request id, each saying whether it is that request's last (its answer is then complete, or an error
    when its status is 400 or more); the ids of requests it dropped as asked (``encode_drop``); whether the frame ends
    an iteration (else it carries chunks sent ahead of that: the first chunks of the requests joining it, or chunks
    sent from inside the call), with the iteration's size (the requests it ran), handler time and metrics."""

    chunks: tuple[tuple[str, Response, bool], ...]
    dropped: tuple[str, ...] = ()
    iteration: bool = True
    handler_ms: float = 0.0
    metrics: tuple[MetricRecord, ...] = ()
    size: int = 0


def encode_drop(request_ids: Sequence[str]) -> list[bytes | bytearray | memoryview]:
    """Ask a worker under continuous batching to drop these requests (their clients went away) at its next
    iteration; it confirms each in a ``Step``'s ``dropped``, unless the request ended first."""
    return encode({"op": "drop", "ids": list(request_ids)})


def encode_step(step: Step) -> list[bytes | bytearray | memoryview]:
    meta = [[rid, r.status, r.content_type, r.headers, r.reason, last] for rid, r, last in step.chunks]
    header = {
        "op": "step",
        "chunks": meta,
        "dropped": list(step.dropped),
        "iteration": step.iteration,
        "handler_ms": step.handler_ms,
        "metrics": [[m.name, m.value, m.unit, m.kind, [list(d) for d in m.dimensions]] for m in step.metrics],
        "size": step.size,
    }
    return encode(header, [r.payload for _, r, _ in step.chunks])


def decode_step(header: dict[str, Any], parts: list[memoryview], running: Container[str]) -> Step:
    """A step from a worker whose requests in flight are ``running``; anything malformed, or a chunk or drop for a
    request not running there, is a ``ProtocolError``."""
    meta, dropped = header.get("chunks"), header.get("dropped")
    if header.get("op") != "step" or not isinstance(meta, list) or not isinstance(dropped, list):
        raise ProtocolError("expected a step from the worker")
    if not all(isinstance(item, list) and len(item) == 6 and isinstance(item[5], bool) for item in meta):
        raise ProtocolError("malformed chunk entry in a step")
    ids = [item[0] for item in meta] + dropped
    if not all(isinstance(rid, str) and rid in running for rid in ids):
        raise ProtocolError("a step names a request that is not running in the worker")
    responses = decode_responses({"responses": [item[1:5] for item in meta]}, parts, len(meta))
    handler_ms = header.get("handler_ms", 0.0)
    if not isinstance(handler_ms, int | float) or not 0 <= handler_ms < 1e12:
        raise ProtocolError("handler_ms must be a non-negative number")
    size = header.get("size", 0)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError("size must be a non-negative integer")
    chunks = tuple((item[0], response, item[5]) for item, response in zip(meta, responses, strict=True))
    iteration = header.get("iteration") is not False
    metrics = _decode_metrics(header.get("metrics", []))
    return Step(chunks, tuple(dropped), iteration, float(handler_ms), metrics, size)


def decode_responses(header: dict[str, Any], parts: list[memoryview], expected: int) -> list[Response]:
    """Responses of a batch of ``expected`` requests; anything malformed is a ``ProtocolError``."""
    meta = header.get("responses")
    if not isinstance(meta, list) or len(meta) != expected or len(parts) != expected:
        raise ProtocolError(f"expected {expected} responses from the worker")
    responses = []
    for item, payload in zip(meta, parts, strict=True):
        if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], int) and 100 <= item[0] <= 599):
            raise ProtocolError(f"malformed response entry {item!r:.200}")
        status, content_type, headers, reason = item
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ProtocolError("response headers must map strings to strings")
        if not (content_type is None or isinstance(content_type, str)) or not (
            reason is None or isinstance(reason, str)
        ):
            raise ProtocolError("content type and reason must be strings")
        responses.append(Response(status, content_type, bytes(payload), headers, reason))
    return responses


def encode_failure(failure: Failure) -> list[bytes | bytearray | memoryview]:
    return encode({"op": "failure", **asdict(failure)})


def decode_failure(header: dict[str, Any]) -> Failure:
    try:
        failure = Failure(
            int(header["status"]),
            str(header["kind"]),
            str(header["message"]),
            str(header["traceback"]),
            header.get("verbatim") is True,
        )
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("malformed failure message") from None
    if not 400 <= failure.status <= 599:
        raise ProtocolError(f"failure status {failure.status} out of range")
    return failure


JOIN_BELOW = 1 << 16  # bytes: a smaller frame is copied into one buffer and sent whole


def send_frame(sock: socket.socket, buffers: list[bytes | bytearray | memoryview]) -> None:
    """Blocking send of a whole frame, as ``encode`` made it (worker side). A small frame (its length is in its
    prefix) goes as one buffer: a step of many small chunks is as many buffers, and the kernel's cost per buffer of a
    ``sendmsg`` (~0.5 us) exceeds that of copying them."""
    if PREFIX.unpack_from(buffers[0])[0] < JOIN_BELOW:
        sock.sendall(b"".join(buffers))
        return
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    while pending:
        sent = sock.sendmsg(pending[:512])
        while sent and pending:
            if sent >= len(pending[0]):
                sent -= len(pending.pop(0))
            else:
                pending[0] = pending[0][sent:]
                sent = 0


def recv_frame(sock: socket.socket) -> bytes | None:
    """Blocking read of one frame body (worker side); ``None`` when the front end closed the socket."""
    prefix = _recv_exactly(sock, LENGTH.size)
    if prefix is None:
        return None
    (total,) = LENGTH.unpack(prefix)
    body = _recv_exactly(sock, total)
    if body is None:
        raise ProtocolError("connection closed inside a frame")
    return body


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        count = sock.recv_into(view[got:])
        if count == 0:
            if got == 0:
                return None
            raise ProtocolError("connection closed inside a frame")
        got += count
    return bytes(buffer)
