"""TorchServe's gRPC inference API (``org.pytorch.serve.grpc.inference.InferenceAPIsService``), on the models, batchers
and workers of the REST API: each request takes the path of ``/predictions`` (``servekit.api.dispatch.submit``), so
gRPC and REST requests share each model's queue and batches.

A request's ``input`` map reaches the handler as one row of named inputs, each a ``bytearray`` with no content type,
as TorchServe passes them. The call's deadline is the request's queueing budget: a request still queued when it
passes is dropped and the call ends ``DEADLINE_EXCEEDED``; a client that cancels its call drops its queued request
too. A handler's answer with a status of 400 or more (a ``PredictionException``, ``context.set_response_status``)
ends the call with that status's code.

- ``Predictions``: the answer as one message (a streamed answer's chunks joined, up to ``max_response_size``).
- ``StreamPredictions``: a message per chunk of a streamed answer (``send_intermediate_predict_response``, or a
  handler that returns a generator); one message for any other answer.
- ``StreamPredictions2``: many requests over one call, each naming its ``sequence_id``; the requests of a sequence
  run one after the other, in order, those of different sequences side by side. Each answer (each chunk) is a
  message carrying its request's ``sequence_id``; a request that fails is answered by a message whose ``status``
  says why, and the call goes on. The handler sees the headers ``ts_request_sequence_id`` and, when the request's
  input ``ts_request_sequence_end`` is ``true``, ``ts_request_sequence_end`` (the names ``ts_header_key_sequence_*``
  give). The call ends once the client has sent its last request and every answer has been sent. On a model with
  ``sequenceBatching: true`` those headers are its sequence batcher's (``servekit.sequence_batcher``): each sequence
  runs on one worker, the end input closes it, and a closed or expired ``sequence_id`` is answered ``NOT_FOUND``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import empty_pb2

from servekit.api.dispatch import submit
from servekit.api.response import new_request_id
from servekit.errors import BadRequestError, HandlerError, ServekitError
from servekit.grpc.generated.inference_pb2 import PredictionResponse, PredictionsRequest, TorchServeHealthResponse
from servekit.grpc.status import rpc_status
from servekit.protocol import Field, Response
from servekit.registry import ModelRegistry
from servekit.sequence import DEFAULT_END, DEFAULT_ID

logger = logging.getLogger("servekit.grpc")
Context = grpc.aio.ServicerContext[Any, Any]
IN_FLIGHT = 64  # StreamPredictions2: requests of one call being answered at once, and answers waiting to be sent


class InferenceAPIs:
    """The methods of ``InferenceAPIsService`` (``servekit.grpc.port`` serves them)."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.max_response_size = registry.settings.max_response_size
        # the header names of a sequence (config.properties ts_header_key_sequence_*, TorchServe's by default)
        self.sequence_keys = (registry.settings.ts_header_key_sequence_id, registry.settings.ts_header_key_sequence_end)

    async def Ping(self, request: empty_pb2.Empty, context: Context) -> TorchServeHealthResponse:
        """The health ``/ping`` reports, as TorchServe's JSON text; the call succeeds either way."""
        health = "Healthy" if self.registry.healthy() else "Unhealthy"
        return TorchServeHealthResponse(health=json.dumps({"status": health}, indent=2))

    async def Predictions(self, request: PredictionsRequest, context: Context) -> PredictionResponse:
        answer = await self._run(request, context)
        payload = answer.payload
        if answer.more is not None:
            chunks = [payload]
            size = len(payload)
            async for chunk in answer.more:
                size += len(chunk)
                if size > self.max_response_size:
                    raise HandlerError(f"Response of {size} bytes exceeds max_response_size={self.max_response_size}")
                chunks.append(chunk)
            payload = b"".join(chunks)
        return PredictionResponse(prediction=payload)

    async def StreamPredictions(
        self, request: PredictionsRequest, context: Context
    ) -> AsyncIterator[PredictionResponse]:
        answer = await self._run(request, context)
        async for chunk in _chunks(answer):
            yield PredictionResponse(prediction=chunk)

    async def StreamPredictions2(
        self, requests: AsyncIterator[PredictionsRequest], context: Context
    ) -> AsyncIterator[PredictionResponse]:
        answers: asyncio.Queue[PredictionResponse | None] = asyncio.Queue(IN_FLIGHT)
        slots = asyncio.Semaphore(IN_FLIGHT)
        latest: dict[str, asyncio.Task[None]] = {}  # the last request of each sequence, which the next one waits for
        running: set[asyncio.Task[None]] = set()

        async def answer(request: PredictionsRequest, before: asyncio.Task[None] | None) -> None:
            sequence = request.sequence_id
            try:
                if before is not None:
                    await asyncio.wait([before])
                id_key, end_key = self.sequence_keys
                end = request.input.get(end_key, b"").strip().lower() == b"true"
                headers = {id_key: sequence, DEFAULT_ID: sequence}  # TorchServe's name too: get_sequence_id reads it
                if end:
                    headers |= {end_key: "true", DEFAULT_END: "true"}
                async for chunk in _chunks(await self._run(request, context, headers)):
                    await answers.put(PredictionResponse(prediction=chunk, sequence_id=sequence))
            except ServekitError as exc:
                await answers.put(PredictionResponse(sequence_id=sequence, status=rpc_status(exc)))
            except Exception:  # a bug of ours: this request fails, the call goes on
                logger.exception("unexpected error answering a request of sequence %s", sequence)
                error = ServekitError("Internal server error")
                await answers.put(PredictionResponse(sequence_id=sequence, status=rpc_status(error)))
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for request in requests:
                    if not request.sequence_id:
                        error = BadRequestError("Parameter sequenceId is required.")
                        await answers.put(PredictionResponse(status=rpc_status(error)))
                        continue
                    await slots.acquire()
                    task = asyncio.create_task(answer(request, latest.get(request.sequence_id)))
                    latest[request.sequence_id] = task
                    running.add(task)
                    task.add_done_callback(
                        functools.partial(_forget, sequence=request.sequence_id, latest=latest, running=running)
                    )
                while running:
                    await asyncio.wait(list(running))
            except Exception:
                await answers.put(None)  # the end all the same: ``await reader`` raises the failure
                raise
            await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (message := await answers.get()) is not None:
                yield message
            await reader  # raises what ended the reading, if anything did
        finally:
            for task in (reader, *running):
                task.cancel()

    async def _run(
        self, request: PredictionsRequest, context: Context, headers: dict[str, str] | None = None
    ) -> Response:
        """Queue ``request`` for its model and wait for the answer; an answer of status 400 or more is raised."""
        if not request.model_name:
            raise BadRequestError("Parameter model_name is required.")
        model = self.registry.get(request.model_name, request.model_version or None)
        fields = tuple(Field(name, None, value) for name, value in request.input.items())

        async def read() -> tuple[tuple[Field, ...], float | None]:
            if model.pool.input_check is not None:
                model.pool.input_check(fields)  # a bad input never takes a place in a batch
            return fields, context.time_remaining()

        answer = await submit(model, new_request_id(), read, headers or {}, request.model_version or "default")
        if answer.status >= 400:
            raise _failure(answer)
        return answer


async def _chunks(answer: Response) -> AsyncIterator[bytes]:
    """The chunks of an answer: its payload, then those of a streamed answer, skipping empty ones after the first
    (a streamed answer whose handler returned a generator ends with an empty chunk)."""
    yield answer.payload
    if answer.more is not None:
        async for chunk in answer.more:
            if chunk:
                yield chunk


def _failure(answer: Response) -> ServekitError:
    """The error of an answer with a status of 400 or more: the message of servekit's JSON error body, else the
    answer's text."""
    text = answer.payload.decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        text = body["message"]
    return HandlerError(text[:4096], answer.status)


def _forget(task: asyncio.Task[None], sequence: str, latest: dict[str, asyncio.Task[None]], running: set[Any]) -> None:
    running.discard(task)
    if latest.get(sequence) is task:
        del latest[sequence]
