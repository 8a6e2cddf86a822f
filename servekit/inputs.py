"""A handler's declared input, checked in the front end before a request is queued.

A handler declares ``input_schema``, a JSON Schema (draft 2020-12) for one request's JSON input, as a class
attribute (or, for a function handler, a module-level name). The worker reports it when it has loaded; the front end
then answers a request whose input does not match with 400 naming what is wrong, and the request never takes a place
in a batch. The input is the request's ``data`` form field, else its body, parsed as JSON whatever its content type
(``curl -d`` sends form-encoded bodies). Validation by the ``jsonschema`` library.
"""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match

from servekit.errors import BadRequestError, HandlerError
from servekit.protocol import Field


class InputCheck:
    """Validates requests against a handler's ``input_schema``."""

    def __init__(self, schema: Any) -> None:
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise HandlerError(f"The handler's input_schema is not a valid JSON Schema: {exc.message}") from None
        self.schema = schema
        self._validator = Draft202012Validator(schema)

    def __call__(self, fields: tuple[Field, ...]) -> None:
        """Raises ``BadRequestError`` unless the request's input is JSON that matches the schema."""
        by_name = {f.name: f for f in fields}
        field = by_name.get("data") or by_name.get("body")
        if field is None:
            raise BadRequestError("The request has no body and no 'data' field")
        try:
            document = json.loads(field.value)
        except (ValueError, RecursionError) as exc:
            raise BadRequestError(f"This model takes JSON input: {str(exc)[:200]}") from None
        error = best_match(self._validator.iter_errors(document))
        if error is not None:
            where = "".join(f"[{p!r}]" for p in error.absolute_path) or "the input"
            raise BadRequestError(f"Invalid input at {where}: {error.message[:300]}")
