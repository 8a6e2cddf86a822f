"""``base_handler``: TorchServe's ``BaseHandler``, and the base of every built-in handler.

The built-ins raise ``InvalidInput`` for a request they cannot read; the worker then runs each request of the
batch alone, so only the requests at fault get the 400. This module holds what the built-ins share for reading
requests.

Runs in the worker process; never imports asyncio or fastapi.
"""

from __future__ import annotations

from typing import Any

from servekit import handler
from servekit.handler import Context, InvalidInput


class BaseHandler(handler.BaseHandler):
    """TorchServe's ``BaseHandler`` (``preprocess -> inference -> postprocess``)."""


def request_value(row: Any) -> Any:
    """What a request sent, as TorchServe's built-ins read it: its ``data`` field, else its ``body``. A JSON object
    body with a ``data`` member stands for that member (``{"data": ...}``)."""
    if not isinstance(row, dict):
        raise InvalidInput(f"Expected a request as a dict of fields, got {type(row).__name__}")
    value = row.get("data")
    if value is None:
        value = row.get("body")
    if isinstance(value, dict) and "data" in value:
        value = value["data"]
    if value is None:
        raise InvalidInput("The request has no body and no 'data' field")
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
