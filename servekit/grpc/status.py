"""servekit's errors as gRPC statuses: the one place where a ``ServekitError`` becomes a status code and message.

The code is the one TorchServe's ``GRPCUtils.getGRPCStatusCode`` gives the error's HTTP status (``CODES``: 400
``INVALID_ARGUMENT``, 404 ``NOT_FOUND``, 413 ``RESOURCE_EXHAUSTED``, 503 ``UNAVAILABLE``, 504 ``DEADLINE_EXCEEDED``, any
other 4xx ``FAILED_PRECONDITION``, any other 5xx ``INTERNAL``), except where TorchServe's gRPC APIs answer a case
with a code of their own: a missing or wrong key and the model API being off are ``PERMISSION_DENIED``. The message
is the error's message alone (TorchServe adds a line with its Java exception's name).
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc.error_details_pb2 import ErrorInfo
from google.rpc.status_pb2 import Status

from servekit.errors import MethodNotAllowedError, ServekitError, UnauthorizedError

CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    416: grpc.StatusCode.OUT_OF_RANGE,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def code_for(http_status: int) -> grpc.StatusCode:
    """The gRPC code of an HTTP status, as TorchServe maps them."""
    if http_status in CODES:
        return CODES[http_status]
    if 200 <= http_status < 300:
        return grpc.StatusCode.OK
    if 400 <= http_status < 500:
        return grpc.StatusCode.FAILED_PRECONDITION
    if 500 <= http_status < 600:
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.UNKNOWN


def status_of(error: ServekitError) -> tuple[grpc.StatusCode, str]:
    """The code and message a call that failed with ``error`` ends with."""
    if isinstance(error, UnauthorizedError | MethodNotAllowedError):  # TorchServe's GRPCInterceptor, ManagementImpl
        return grpc.StatusCode.PERMISSION_DENIED, error.message
    return code_for(error.status_code), error.message


def rpc_status(error: ServekitError) -> Status:
    """``error`` as a ``google.rpc.Status`` message, for the answers of ``StreamPredictions2``, which report a failed
    request in the stream and go on: its code and message, and an ``ErrorInfo`` whose reason is the error's type (the
    ``type`` of REST's error bodies)."""
    code, message = status_of(error)
    detail = any_pb2.Any()
    detail.Pack(ErrorInfo(reason=type(error).__name__))
    return Status(code=code.value[0], message=message, details=[detail])
