"""JSON answers as TorchServe's Java front end writes them, byte for byte (``servekit.encoding.frontend_json``):
``/ping``, the management API's answers and describe, the OpenAPI descriptions."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from servekit.encoding import frontend_json


class FrontendJSON(JSONResponse):
    """A ``JSONResponse`` whose body is Gson's pretty printing and a newline, as TorchServe's ``sendJsonResponse``."""

    def render(self, content: Any) -> bytes:
        return frontend_json(content)
