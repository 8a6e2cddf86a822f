"""``base_handler``: TorchServe's ``BaseHandler``, and the base of every built-in handler.

On top of ``servekit.handler.BaseHandler`` it keeps one client's bad input from failing the others of its batch: when
a batch of several requests raises ``PredictionException`` with a 4xx code, each request is run again alone, so that
only the requests at fault get the error (as JSON ``{"code", "type", "message"}``, the body servekit sends for a
whole failed batch) and the others their answer.

Runs in the worker process; never imports asyncio or fastapi.
"""

from __future__ import annotations

from typing import Any

from servekit import handler
from servekit.handler import Context, PredictionException


class BaseHandler(handler.BaseHandler):
    """TorchServe's ``BaseHandler`` (``preprocess -> inference -> postprocess``); client errors stay per request."""

    def handle(self, data: list[Any], context: Context) -> list[Any]:
        try:
            return super().handle(data, context)
        except PredictionException as exc:
            if len(data) == 1 or not is_client_error(exc):
                raise
        return [self._handle_alone(i, row, context) for i, row in enumerate(data)]

    def _handle_alone(self, index: int, row: Any, context: Context) -> Any:
        """Request ``index`` of the batch as a batch of its own: its answer, or its error with the error's status."""
        processors, request_ids = context.request_processor, context.request_ids
        context.request_processor = [processors[index]]
        context.request_ids = {0: request_ids[index]} if request_ids and index in request_ids else None
        try:
            return super().handle([row], context)[0]
        except PredictionException as exc:
            if not is_client_error(exc):
                raise
            processors[index].report_status(exc.error_code)
            message = f"Prediction failed for model {context.model_name}: PredictionException: {exc.message}"
            return {"code": exc.error_code, "type": "HandlerError", "message": message}
        finally:
            context.request_processor, context.request_ids = processors, request_ids


def is_client_error(exc: PredictionException) -> bool:
    return 400 <= exc.error_code < 500


def request_value(row: Any) -> Any:
    """What a request sent, as TorchServe's built-ins read it: its ``data`` field, else its ``body``. A JSON object
    body with a ``data`` member stands for that member (``{"data": ...}``)."""
    if not isinstance(row, dict):
        raise PredictionException(f"Expected a request as a dict of fields, got {type(row).__name__}", 400)
    value = row.get("data")
    if value is None:
        value = row.get("body")
    if isinstance(value, dict) and "data" in value:
        value = value["data"]
    if value is None:
        raise PredictionException("The request has no body and no 'data' field", 400)
    return value


def json_kind(value: Any) -> str:
    """What a decoded value was in JSON's words, for error messages."""
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def handler_config(context: Context) -> dict[str, Any]:
    """The ``handler:`` section of the model-config YAML (empty when absent or not a mapping)."""
    section = context.model_yaml_config.get("handler")
    return section if isinstance(section, dict) else {}


def positive_int(config: dict[str, Any], key: str, default: int) -> int:
    """``config[key]`` as an integer of at least 1, or ``default`` when absent; ``ValueError`` naming the key."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"handler.{key} in the model config must be an integer of at least 1, got {value!r}")
    return value
