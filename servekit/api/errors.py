"""The one place where errors become HTTP responses: ``{"code", "type", "message"}`` JSON."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from servekit.errors import RequestTooLargeError, ServekitError, error_body

_TYPES = {
    400: "BadRequestException",
    401: "InvalidKeyException",
    404: "ResourceNotFoundException",
    405: "MethodNotAllowedException",
    413: "RequestTooLargeException",
}
_MESSAGES = {
    404: "Requested resource is not found, please refer to API document.",
    405: "Requested method is not allowed, please refer to API document.",
}


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(status, kind, message), status, headers, media_type="application/json")


async def _servekit_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServekitError)
    if isinstance(exc, RequestTooLargeError):  # TorchServe's 413 (Netty's) has no body
        return Response(b"", exc.status_code, exc.headers)
    return error_response(exc.status_code, exc.type_name, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = _TYPES.get(exc.status_code, "HTTPException")
    message = _MESSAGES.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, kind, message, dict(exc.headers or {}))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return error_response(400, "BadRequestException", problems)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServekitError, _servekit_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
