"""The worker's tensor path: v2 (Open Inference Protocol) requests run as tensors, batched along dimension 0.

Requests whose inputs have the same names, datatypes and trailing dimensions are concatenated along the first
dimension, run through the model once, and the outputs are split back per request. The model is called as
``handler.infer_tensors(inputs, context)`` if the handler defines it (inputs and result: dicts of tensors by name),
else as ``handler.model(*inputs)`` in the order of the model config's ``inputs`` (a single tensor or a tuple of
tensors comes back, named by the config's ``outputs``, else ``OUTPUT__0``, ``OUTPUT__1``, ...).

Runs in the worker process; never imports asyncio or fastapi.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from servekit import oip, oip_tensor, protocol
from servekit.errors import BadRequestError
from servekit.handler import Context

logger = logging.getLogger("servekit.tensors")


def bad_request(message: str) -> protocol.Response:
    """A body that is not a valid request: 400 with ``{"error": message}``, as the front end answers its own."""
    body = json.dumps({"error": message}, ensure_ascii=False, separators=(",", ":")).encode()
    return protocol.Response(400, "application/json", body, reason="Bad Request")


def v2_error(status: int, message: str) -> protocol.Response:
    return protocol.Response(status, "application/json", json.dumps({"error": message}).encode())


class TensorRunner:
    def __init__(self, handler: Any, context: Context) -> None:
        self.handler = handler
        self.context = context
        config = context.model_yaml_config
        self.inputs = oip.specs_from_config(config, "inputs")
        self.outputs = oip.specs_from_config(config, "outputs")
        self.input_names = [spec.name for spec in self.inputs]
        self.output_names = [spec.name for spec in self.outputs]

    def answer(self, requests: list[protocol.Request]) -> list[protocol.Response]:
        """Each request's answer; one whose body is not a valid request for this model is answered 400, alone."""
        answers: dict[int, protocol.Response] = {}
        decoded: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
        for i, request in enumerate(requests):
            field = request.fields[0]
            try:
                if field.name == oip.BODY_FIELD:
                    decoded[i] = oip.worker_request(field.value, self.inputs, self.outputs)
                else:
                    decoded[i] = oip_tensor.from_worker_payload(field.value)
            except BadRequestError as exc:
                answers[i] = bad_request(exc.message)
        groups: dict[Any, list[int]] = {}
        for i, (_, inputs) in decoded.items():
            groups.setdefault(self._signature(inputs, i), []).append(i)
        for members in groups.values():
            for i, response in zip(members, self._run_group([decoded[i] for i in members]), strict=True):
                answers[i] = response
        return [answers[i] for i in range(len(requests))]

    @staticmethod
    def _signature(inputs: dict[str, tuple[str, list[int], bytes]], index: int) -> Any:
        """Requests with the same signature can be joined along dimension 0."""
        if any(datatype == "BYTES" or not shape for datatype, shape, _ in inputs.values()):
            return ("alone", index)
        return tuple(sorted((name, datatype, tuple(shape[1:])) for name, (datatype, shape, _) in inputs.items()))

    def _run_group(self, group: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[protocol.Response]:
        """Run a group of requests as one batch: their rows joined (one tensor per input, made from their bytes at
        once), the outputs cut back into each request's rows."""
        sizes = None if len(group) == 1 else [next(iter(inputs.values()))[1][0] for _, inputs in group]
        try:
            merged = {}
            for name, (datatype, shape, _) in group[0][1].items():
                rows = shape if sizes is None else [sum(sizes), *shape[1:]]
                merged[name] = oip_tensor.as_tensor(datatype, rows, b"".join(inputs[name][2] for _, inputs in group))
            outputs = oip_tensor.Outputs(self._call(merged), sizes)
        except (NotImplementedError, KeyError, TypeError, ValueError) as exc:
            return [v2_error(400, f"model {self.context.model_name}: {type(exc).__name__}: {exc}")] * len(group)
        except Exception as exc:
            logger.exception("tensor inference failed")
            return [v2_error(500, f"model {self.context.model_name}: {type(exc).__name__}: {exc}")] * len(group)
        responses = []
        for i, (header, _) in enumerate(group):
            unknown = [name for name, _ in header["outputs"] if name not in outputs.outputs]
            if unknown:
                responses.append(
                    v2_error(400, f"unknown output(s) {unknown}; the model returns {sorted(outputs.outputs)}")
                )
                continue
            try:
                body, headers = outputs.response(header, i)
            except ValueError as exc:  # the model's outputs do not have the batch's rows
                logger.error("model %s: %s", self.context.model_name, exc)
                responses.append(v2_error(500, f"model {self.context.model_name}: {exc}"))
                continue
            content_type = headers.pop("content-type")
            responses.append(protocol.Response(200, content_type, body, headers))
        return responses

    def _call(self, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        custom = getattr(self.handler, "infer_tensors", None)
        if callable(custom):
            result = custom(inputs, self.context)
        else:
            model = getattr(self.handler, "model", None)
            if model is None:
                raise NotImplementedError("the handler has no model for tensor requests; define infer_tensors()")
            order = self.input_names or list(inputs)
            with torch.inference_mode():
                result = model(*[inputs[name] for name in order])
        if isinstance(result, dict):
            return result
        values = list(result) if isinstance(result, tuple | list) else [result]
        names = self.output_names or [f"OUTPUT__{i}" for i in range(len(values))]
        if len(names) != len(values):
            raise ValueError(f"the model returned {len(values)} outputs, the config names {len(names)}")
        return dict(zip(names, values, strict=True))
