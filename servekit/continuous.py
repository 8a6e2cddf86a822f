"""Continuous batching in the worker (model-config ``continuousBatching: true``): the handler runs iteration by
iteration over the requests in flight, as TorchServe 0.12 runs it.

The front end (``servekit.continuous_batcher``) sends requests as soon as the worker has room for them (``batch``
frames; never more than ``batch_size`` in flight) and the ids of requests whose clients went away (``drop``). Between
two iterations the worker reads what has arrived, without waiting while it has requests to run; arrivals join the
batch at the next iteration, dropped requests leave it. Each iteration is answered with one ``protocol.Step``; while
other requests run, the first chunks of those joining go ahead of it in a step of their own, made before the others'
(a client waits for its first token; the others only for their next).

The handler's side, TorchServe's contract:

- each call is one iteration. ``data[i]`` holds request ``i``'s inputs on the iteration it joins, and is ``{}`` after:
  the handler keeps what it needs (its KV cache, its tokens) by ``context.request_ids[i]``, and a request that has
  left (finished, failed, dropped) is no longer there, which is how the handler learns to forget it;
- it returns one result per request, sent at once as that request's next chunk;
- a request is finished when ``context.stopping_criteria[i](result)`` is true (a list of callables, one per request;
  ``None`` from one leaves the decision to the header); otherwise it goes on while the handler sets its response
  header ``ts_stream_next`` to ``"true"``. An answer with a status of 400 or more (``context.set_response_status``)
  ends its request with that error, and only that request.

An exception from the handler fails the requests of the iteration, except that the requests joining it are suspected
first: with one joining, it alone fails and the others run again at the next iteration; with several, they join
again one per iteration, so that the one at fault fails alone. This holds when the handler raises before it advances
any request (input checks in ``preprocess``), as a handler that raises ``InvalidInput`` does.

Runs in the worker process; never imports asyncio, fastapi, the pool or metrics.
"""

from __future__ import annotations

import collections
import contextlib
import select
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from servekit import oip, protocol
from servekit.context import Context
from servekit.errors import error_body

STREAM_NEXT = "ts_stream_next"  # TorchServe's response header: "true" while the request goes on


class Tensors(Protocol):
    def answer(self, requests: list[protocol.Request]) -> list[protocol.Response]: ...


class Runner(Protocol):
    """What the loop needs of the worker (``servekit.worker.Worker``)."""

    partial: Callable[[list[tuple[int, protocol.Response]]], None] | None

    @property
    def command(self) -> protocol.LoadCommand: ...

    @property
    def context(self) -> Context: ...

    @property
    def tensors(self) -> Tensors: ...

    def inputs(self, request: protocol.Request) -> dict[str, Any]: ...

    def invoke(
        self, requests: list[protocol.Request], data: list[dict[str, Any]], indices: list[int]
    ) -> list[Any] | protocol.Failure: ...

    def response(self, idx: int, value: Any) -> protocol.Response: ...

    def describe(self, request: protocol.Request) -> protocol.BatchResult: ...


@dataclass(slots=True, eq=False)
class Stream:
    """A request in flight: its inputs until it has run an iteration, then ``{}``."""

    request: protocol.Request
    row: dict[str, Any]
    joined: bool = False

    @property
    def id(self) -> str:
        return self.request.request_id


Chunk = tuple[str, protocol.Response, bool]


class IterationLoop:
    """The worker's loop under continuous batching: read arrivals and drops, run an iteration, send its step."""

    def __init__(self, worker: Runner, sock: socket.socket) -> None:
        self.worker = worker
        self.sock = sock
        self.capacity = max(1, worker.command.batch_size)
        self.batch: list[Stream] = []  # the requests of the next iteration, in the order they joined
        self.waiting: collections.deque[Stream] = collections.deque()  # arrived, not yet in the batch
        self.suspects: collections.deque[Stream] = collections.deque()  # joined an iteration that failed
        self.outbox: list[Chunk] = []  # chunks for the next step
        self.dropped: list[str] = []  # dropped since the last step
        self.current: list[Stream] = []  # the requests of the call running (intermediate chunks name them by index)
        worker.partial = self._intermediate

    def serve(self) -> int:
        """Run until the front end closes the socket (the requests in flight are then dropped)."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed while an iteration ran
            self._serve()
        return 0

    def _serve(self) -> None:
        while True:
            idle = not (self.batch or self.waiting or self.suspects)
            if not self._read(wait=idle):
                return
            self._admit()
            if self.batch:
                self._iterate()
            elif self.outbox or self.dropped:
                self._send(iteration=False)

    def _read(self, wait: bool) -> bool:
        """Take in the frames that have arrived (waiting for one when ``wait``); ``False`` once the socket closed."""
        while wait or select.select([self.sock], [], [], 0)[0]:
            wait = False
            body = protocol.recv_frame(self.sock)
            if body is None:
                return False
            header, parts = protocol.decode(body)
            op = header.get("op")
            if op == "batch":
                for request in protocol.decode_batch(header, parts):
                    self._arrive(request)
            elif op == "drop":
                self._drop(set(header["ids"]))
            elif op == "describe":  # only sent to an idle worker
                result = self.worker.describe(protocol.decode_describe(header))
                protocol.send_frame(self.sock, protocol.encode_result(result))
        return True

    def _arrive(self, request: protocol.Request) -> None:
        """A tensor request (Open Inference Protocol) is answered at once, as the model's forward; a malformed body
        is answered 400; any other request waits to join."""
        if request.fields and request.fields[0].content_type == oip.V2_CONTENT_TYPE:
            self.outbox.append((request.request_id, self.worker.tensors.answer([request])[0], True))
            return
        try:
            row = self.worker.inputs(request)
        except ValueError as exc:
            body = error_body(400, "BadRequestError", str(exc))
            self.outbox.append((request.request_id, protocol.Response(400, "application/json", body), True))
            return
        self.waiting.append(Stream(request, row))

    def _drop(self, ids: set[str]) -> None:
        """Requests whose clients went away leave; ids of requests already ended are ignored."""
        for streams in (self.batch, self.waiting, self.suspects):
            for stream in [s for s in streams if s.id in ids]:
                streams.remove(stream)
                self.dropped.append(stream.id)

    def _admit(self) -> None:
        """Arrivals join up to the capacity; while suspects remain, one of them joins alone instead."""
        if self.suspects:
            if all(stream.joined for stream in self.batch):
                self.batch.append(self.suspects.popleft())
            return
        while self.waiting and len(self.batch) < self.capacity:
            self.batch.append(self.waiting.popleft())

    def _iterate(self) -> None:
        streams = list(self.batch)
        start = time.perf_counter()
        self.current = streams
        results = self.worker.invoke([s.request for s in streams], [s.row for s in streams], list(range(len(streams))))
        if isinstance(results, protocol.Failure):
            self._failed(streams, results)
            self._send(iteration=True, handler_ms=(time.perf_counter() - start) * 1000, size=len(streams))
            return
        # first tokens first: a client waits for its first token, the others only for their next one; the chunks of
        # the requests joining are made, and sent in a step of their own when others follow, before the others'
        answered = [(i, stream, value) for i, (stream, value) in enumerate(zip(streams, results, strict=True))]
        joining = [item for item in answered if not item[1].joined]
        running = [item for item in answered if item[1].joined]
        self._take(joining)
        if joining and running:
            self._send_ahead(tuple(self.outbox))
            self.outbox = []
        self._take(running)
        handler_ms = (time.perf_counter() - start) * 1000
        self.worker.context.metrics.add_time("PredictionTime", round(handler_ms, 2))
        self._send(iteration=True, handler_ms=handler_ms, size=len(streams))

    def _take(self, answered: list[tuple[int, Stream, Any]]) -> None:
        """Into the outbox: the chunk of each request ``(i, stream, value)`` of the iteration, and whether it is its
        last, by TorchServe's rule (``create_predict_response``): the stopping criterion, when the handler set them,
        says ``ts_stream_next`` (``None`` leaves the header as the handler set it), and the request goes on while
        that header is ``"true"``; a status of 400 or more ends it too. Finished requests leave the batch. (One loop
        with its lookups made once: it runs for every token.)"""
        context = self.worker.context
        processors, criteria = context.request_processor, context.stopping_criteria
        respond, outbox = self.worker.response, self.outbox
        for i, stream, value in answered:
            stream.joined, stream.row = True, {}
            processor = processors[i]
            try:
                stop = criteria[i](value) if criteria else None
            except Exception as exc:  # the handler's stopping criteria failed: its request fails, alone
                message = f"stopping_criteria[{i}] failed: {type(exc).__name__}: {exc}"
                body = error_body(500, "HandlerError", message)
                response, last = protocol.Response(500, "application/json", body), True
            else:
                if stop is not None:
                    processor.add_response_property(STREAM_NEXT, "false" if stop else "true")
                response = respond(i, value)
                last = response.status >= 400 or processor.get_response_header(STREAM_NEXT) != "true"
            outbox.append((stream.id, response, last))
            if last:
                self.batch.remove(stream)

    def _failed(self, streams: list[Stream], failure: protocol.Failure) -> None:
        """An iteration raised: the requests joining it are suspected first (see the module's docstring)."""
        joining = [s for s in streams if not s.joined]
        if failure.status >= 500 and failure.traceback:
            print(f"the handler failed an iteration of {len(streams)}:\n{failure.traceback}", file=sys.stderr)
        if len(joining) > 1 and len(streams) > 1:
            for stream in joining:
                self.batch.remove(stream)
            self.suspects.extend(joining)
            return
        failing = joining if joining and len(streams) > 1 else streams
        message = protocol.failure_message(self.worker.command.model_name, failure)
        body = error_body(failure.status, "HandlerError", message)
        for stream in failing:
            self.batch.remove(stream)
            self.outbox.append((stream.id, protocol.Response(failure.status, "application/json", body), True))

    def _intermediate(self, chunks: list[tuple[int, protocol.Response]]) -> None:
        """Chunks a call sends before it returns (``send_intermediate_response``, a generator's items), each with
        ``ts_stream_next: true`` as TorchServe sends them; but empty ones: a handler sends those for the requests of
        its batch that have nothing new (TorchServe's handlers name the others in
        ``send_intermediate_predict_response``'s ``req_id_map``), and a stream has nothing to send for them."""
        sent = tuple(
            (self.current[i].id, replace(response, headers={**response.headers, STREAM_NEXT: "true"}), False)
            for i, response in chunks
            if response.payload or response.status >= 400
        )
        if sent:
            self._send_ahead(sent)

    def _send_ahead(self, chunks: tuple[Chunk, ...]) -> None:
        """Chunks ahead of the iteration's step (sent from inside the call, or first tokens made before the others)."""
        protocol.send_frame(self.sock, protocol.encode_step(protocol.Step(chunks, iteration=False)))

    def _send(self, iteration: bool, handler_ms: float = 0.0, size: int = 0) -> None:
        records = tuple(protocol.MetricRecord(*record) for record in self.worker.context.metrics.take())
        step = protocol.Step(tuple(self.outbox), tuple(self.dropped), iteration, handler_ms, records, size)
        self.outbox, self.dropped = [], []
        protocol.send_frame(self.sock, protocol.encode_step(step))
