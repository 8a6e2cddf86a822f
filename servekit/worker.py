"""A worker process: loads one model with its handler, then runs one batch at a time.

Started by the pool as ``python -m servekit.worker --fd N``, where N is this end of a socket pair the
front end created. The first frame is a ``LoadCommand``; the worker answers ``loaded`` or a
``Failure``, then loops: receive a batch, call the handler, send one ``Response`` per request (or one
``Failure`` for the batch); a describe request (``protocol.encode_describe``) is answered the same way, as a batch
of one. It exits when the front end closes the socket, so it never outlives the
server by more than the batch it is running.

Runs in the worker process; never imports asyncio, fastapi, the pool or metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from servekit import heap, oip, protocol
from servekit.continuous import IterationLoop
from servekit.encoding import handler_json
from servekit.envelope import wrap
from servekit.errors import error_body
from servekit.handler import DEFAULT_HANDLER, Context, EntryPoint, PredictionException, RequestProcessor, load_handler
from servekit.tensors import TensorRunner

COMPAT_PATH = str(Path(__file__).parent / "compat")


def decode_value(value: bytes, content_type: str | None, decode: bool) -> Any:
    """TorchServe's input decoding: JSON for ``application/json``, ``str`` for ``text/*``, else ``bytearray``.
    Raises ``ValueError`` for a body that claims to be JSON but is not (TorchServe passes the raw bytes on)."""
    if decode and content_type == "application/json":
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            pass  # what orjson refuses and Python's json takes (NaN, Infinity, huge integers), or bad JSON
        try:
            return json.loads(value)
        except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, too deep, too many digits
            raise ValueError(f"Invalid JSON body: {str(exc)[:200]}") from None
    if decode and content_type is not None and content_type.startswith("text"):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return bytearray(value)
    return bytearray(value)


def encode_value(value: Any) -> tuple[bytes, str | None]:
    """A handler result as bytes and its default content type; ``TypeError`` if it cannot be sent (a str with a lone
    surrogate: ``UnicodeEncodeError``, a ``ValueError``)."""
    if isinstance(value, str):  # first: a streamed token's usual chunk
        return value.encode(), "text/plain; charset=utf-8"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), "application/octet-stream"
    if type(value).__module__.startswith("torch") and type(value).__name__ == "Tensor":
        import io

        import torch

        buffer = io.BytesIO()
        torch.save(value, buffer)
        return buffer.getvalue(), "application/octet-stream"
    return handler_json(value), "application/json"  # TorchServe's bytes (json.dumps(value, indent=2)); TypeError


Partial = Callable[[list[tuple[int, protocol.Response]]], None]


PLAIN = frozenset({str, bytes, bytearray, dict, list})  # the usual answers, none of them an iterator


def is_stream(value: Any) -> bool:
    """A handler's answer that is streamed: an iterator (a generator), whose items are sent as chunks."""
    return type(value) not in PLAIN and isinstance(value, Iterator)


def any_stream(values: list[Any]) -> bool:
    """Whether any of a batch's answers is streamed; a batch of the usual types is cleared by its types alone."""
    return not PLAIN.issuperset(map(type, values)) and any(map(is_stream, values))


class Worker:
    """The handler of one model and the per-batch bookkeeping around it."""

    def __init__(self, command: protocol.LoadCommand, partial: Partial | None = None) -> None:
        self.command = command
        self.partial = partial  # sends chunks of streamed responses while a batch runs
        self.context = Context(
            command.model_name,
            command.model_dir,
            command.manifest,
            command.batch_size,
            command.gpu_id,
            model_yaml_config=command.model_yaml_config,
        )
        handler = load_handler(command.handler or DEFAULT_HANDLER, command.model_dir, self.context)
        self.tensors = TensorRunner(getattr(handler, "__self__", None), self.context)
        self.input_schema = declared(handler, "input_schema")
        self.handler = handler
        self.entry: EntryPoint = wrap(handler, command.envelope) if command.envelope else handler

    def run(self, requests: list[protocol.Request]) -> protocol.BatchResult:
        """One batch: the answers, the time it took (TorchServe's ``PredictionTime``) and the handler's metrics."""
        start = time.perf_counter()
        outcome = self._answer(requests)
        handler_ms = (time.perf_counter() - start) * 1000
        metrics = self.context.metrics
        if not isinstance(outcome, protocol.Failure):
            metrics.add_time("PredictionTime", round(handler_ms, 2))
        records = tuple(protocol.MetricRecord(*record) for record in metrics.take())
        return protocol.BatchResult(outcome, handler_ms, records)

    def describe(self, request: protocol.Request) -> protocol.BatchResult:
        """TorchServe's describe: the handler (not its envelope) on one request without inputs (``[{}]``) whose
        ``describe`` header is ``"True"``, so that ``BaseHandler.handle`` answers ``[self.describe_handle()]``. The
        answer is ``application/json`` unless the handler sets a content type; the handler's status and headers
        are kept."""
        start = time.perf_counter()
        described = protocol.Request(request.request_id, {**request.headers, "describe": "True"}, ())
        results = self._invoke(self.handler, [described], [{}], [0])
        outcome: list[protocol.Response] | protocol.Failure = results
        if not isinstance(results, protocol.Failure):
            typed = any(name.lower() == "content-type" for name in self.context.get_response_headers(0))
            response = self.response(0, results[0])
            outcome = [response if typed else dataclasses.replace(response, content_type="application/json")]
        records = tuple(protocol.MetricRecord(*record) for record in self.context.metrics.take())
        return protocol.BatchResult(outcome, (time.perf_counter() - start) * 1000, records)

    def inputs(self, request: protocol.Request) -> dict[str, Any]:
        """A request's inputs as the handler sees them (``decode_value``); ``ValueError`` for a malformed body."""
        decode = self.command.decode_input_request
        return {f.name: decode_value(f.value, f.content_type, decode) for f in request.fields}

    def invoke(
        self, requests: list[protocol.Request], data: list[dict[str, Any]], indices: list[int]
    ) -> list[Any] | protocol.Failure:
        """The handler (in its envelope, if any) on ``requests`` and their decoded inputs: one result per request,
        or the failure of the whole call. ``indices`` name the requests in the chunks they stream."""
        return self._invoke(self.entry, requests, data, indices)

    def _answer(self, requests: list[protocol.Request]) -> list[protocol.Response] | protocol.Failure:
        """Answer each request: v2 tensor requests through ``tensors``, the rest through the handler. A request
        with a malformed JSON body gets 400 without reaching the handler."""
        decode = self.command.decode_input_request
        answers: dict[int, protocol.Response] = {}
        data: list[dict[str, Any]] = []
        to_handler: list[int] = []
        to_tensors: list[int] = []
        for i, request in enumerate(requests):
            if request.fields and request.fields[0].content_type == oip.V2_CONTENT_TYPE:
                to_tensors.append(i)
                continue
            try:
                data.append({f.name: decode_value(f.value, f.content_type, decode) for f in request.fields})
                to_handler.append(i)
            except ValueError as exc:
                answers[i] = protocol.Response(400, "application/json", error_body(400, "BadRequestError", str(exc)))
        if to_handler:
            outcome = self._handle([requests[i] for i in to_handler], data, to_handler)
            if isinstance(outcome, protocol.Failure):
                if len(to_handler) == len(requests):
                    return outcome  # the whole batch failed in the handler
                message = protocol.failure_message(self.command.model_name, outcome)
                body = error_body(outcome.status, "HandlerError", message)
                outcome = [protocol.Response(outcome.status, "application/json", body)] * len(to_handler)
            answers.update(zip(to_handler, outcome, strict=True))
        if to_tensors:
            answers.update(zip(to_tensors, self.tensors.answer([requests[i] for i in to_tensors]), strict=True))
        return [answers[i] for i in range(len(requests))]

    def _handle(
        self, requests: list[protocol.Request], data: list[dict[str, Any]], indices: list[int]
    ) -> list[protocol.Response] | protocol.Failure:
        """The handler on a batch. A client error (a 4xx ``PredictionException``, e.g. ``InvalidInput``) raised for
        a batch of several requests is one client's bad input: each request is then run alone, so that only the
        requests at fault get the error and the others their answers."""
        outcome = self._call(requests, data, indices)
        if isinstance(outcome, protocol.Failure) and 400 <= outcome.status < 500 and len(requests) > 1:
            return [self._alone(*job) for job in zip(requests, data, indices, strict=True)]
        return outcome

    def _alone(self, request: protocol.Request, row: dict[str, Any], index: int) -> protocol.Response:
        outcome = self._call([request], [row], [index])
        if isinstance(outcome, protocol.Failure):
            message = protocol.failure_message(self.command.model_name, outcome)
            return protocol.Response(
                outcome.status, "application/json", error_body(outcome.status, "HandlerError", message)
            )
        return outcome[0]

    def _call(
        self, requests: list[protocol.Request], data: list[dict[str, Any]], indices: list[int]
    ) -> list[protocol.Response] | protocol.Failure:
        """The handler on ``requests``, which are the batch's requests at ``indices`` (streamed chunks name those)."""
        results = self._invoke(self.entry, requests, data, indices)
        if isinstance(results, protocol.Failure):
            return results
        return [self.response(i, value) for i, value in enumerate(results)]

    def _invoke(
        self, entry: EntryPoint, requests: list[protocol.Request], data: list[dict[str, Any]], indices: list[int]
    ) -> list[Any] | protocol.Failure:
        """``entry`` on ``requests``: one result per request, or the failure of the whole call."""
        self.context.request_ids = {i: r.request_id for i, r in enumerate(requests)}
        self.context.request_processor = [RequestProcessor(dict(r.headers)) for r in requests]
        self.context.intermediate = lambda values, code: self._send_chunks(
            [(i, self.response(i, value, code)) for i, value in values], indices
        )
        try:
            results = entry(data, self.context)
            if isinstance(results, list) and any_stream(results):
                results = self._stream(results, indices)
        except PredictionException as exc:  # its message alone reaches the client, as in TorchServe
            trace = traceback.format_exc()
            return protocol.Failure(exc.error_code, type(exc).__name__, exc.message, trace, verbatim=True)
        except MemoryError:
            return protocol.Failure(507, "MemoryError", "Out of resources", traceback.format_exc(), verbatim=True)
        except Exception as exc:
            return protocol.Failure(500, type(exc).__name__, str(exc), traceback.format_exc())
        if not isinstance(results, list):
            return protocol.Failure(
                500,
                "HandlerError",
                f"Invalid model predict output: handler returned {type(results).__name__}, expected a list",
            )
        if len(results) != len(requests):
            return protocol.Failure(
                500,
                "HandlerError",
                f"number of batch response mismatched: handler returned {len(results)} results "
                f"for a batch of {len(requests)} requests",
            )
        return results

    def _send_chunks(self, chunks: list[tuple[int, protocol.Response]], indices: list[int]) -> None:
        if self.partial is None:
            raise RuntimeError("This worker cannot stream: it has no connection to the front end")
        self.partial([(indices[i], response) for i, response in chunks])

    def _stream(self, results: list[Any], indices: list[int]) -> list[Any]:
        """Send the items of the streamed answers as chunks, round robin over the requests; their last chunk is
        then empty. Returns the batch's final answers."""
        active = {i: value for i, value in enumerate(results) if is_stream(value)}
        final = [b"" if i in active else value for i, value in enumerate(results)]
        while active:
            chunks = []
            for i, stream in list(active.items()):
                try:
                    chunks.append((i, self.response(i, next(stream))))
                except StopIteration:
                    del active[i]
            if chunks:
                self._send_chunks(chunks, indices)
        return final

    def response(self, idx: int, value: Any, code: int | None = None) -> protocol.Response:
        """The answer of request ``idx`` of the last call from its ``value``, with the status (``code`` if given) and
        headers the handler set for it."""
        processor = self.context.request_processor[idx]
        try:
            payload, content_type = encode_value(value)
        except (TypeError, ValueError) as exc:
            message = f"Unsupported model output data type: {exc}"
            return protocol.Response(500, "application/json", error_body(500, "HandlerError", message))
        limit = self.command.max_response_size
        if len(payload) > limit:
            message = f"Response of {len(payload)} bytes exceeds max_response_size={limit}"
            return protocol.Response(500, "application/json", error_body(500, "ResponseTooLargeError", message))
        headers = processor.get_response_headers()
        content_type = headers.pop("content-type", None) or headers.pop("Content-Type", None) or content_type
        status = code or processor.get_response_status_code()
        return protocol.Response(status, content_type, payload, headers, processor.get_response_status_phrase())


def declared(entry: EntryPoint, name: str) -> Any:
    """What a handler declares as ``name``: an attribute of its class, or of its module for a function handler."""
    owner = getattr(entry, "__self__", None) or sys.modules.get(getattr(entry, "__module__", ""))
    return getattr(owner, name, None)


def prepare_process(command: protocol.LoadCommand) -> None:
    """Process-wide setup before the handler is imported: paths and working directory. torch's thread count
    comes from ``OMP_NUM_THREADS``, set by the pool, so a handler that never imports torch does not pay for it."""
    if importlib.util.find_spec("ts") is None:
        sys.path.append(COMPAT_PATH)
    sys.path.insert(0, command.model_dir)
    os.chdir(command.model_dir)


def serve(sock: socket.socket) -> int:
    body = protocol.recv_frame(sock)
    if body is None:
        return 0
    header, _ = protocol.decode(body)
    fields = {k: v for k, v in header.items() if k not in ("op", "parts")}
    command = protocol.LoadCommand(**fields)
    try:
        prepare_process(command)
        worker = Worker(command, lambda chunks: protocol.send_frame(sock, protocol.encode_partial(chunks)))
    except BaseException as exc:
        failure = protocol.Failure(500, type(exc).__name__, str(exc) or repr(exc), traceback.format_exc())
        protocol.send_frame(sock, protocol.encode_failure(failure))
        return 1
    heap.settle()
    loaded = {"op": "loaded", "pid": os.getpid(), "input_schema": worker.input_schema}
    try:
        frame = protocol.encode(loaded)
    except (TypeError, ValueError) as exc:
        failure = protocol.Failure(500, "HandlerError", f"The handler's input_schema is not JSON: {exc}")
        protocol.send_frame(sock, protocol.encode_failure(failure))
        return 1
    protocol.send_frame(sock, frame)
    if protocol.continuous_batching(command.model_yaml_config):
        return IterationLoop(worker, sock).serve()
    while (body := protocol.recv_frame(sock)) is not None:
        header, parts = protocol.decode(body)
        if header.get("op") == "describe":
            result = worker.describe(protocol.decode_describe(header))
        else:
            result = worker.run(protocol.decode_batch(header, parts))
        protocol.send_frame(sock, protocol.encode_result(result))
    return 0


def die_with_parent() -> None:
    """Ask Linux to kill this process when the front end dies, even mid-batch (no orphan workers)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="servekit.worker")
    parser.add_argument("--fd", type=int, required=True, help="this worker's end of the socket pair")
    parser.add_argument("--parent", type=int, required=True, help="the front end's pid")
    args = parser.parse_args(argv)
    die_with_parent()
    if os.getppid() != args.parent:  # the front end died before the line above took effect
        return 0
    with socket.socket(fileno=args.fd) as sock:
        return serve(sock)


if __name__ == "__main__":
    sys.exit(main())
