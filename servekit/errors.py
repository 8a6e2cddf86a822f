"""The error tree of servekit (standard library only).

Every error a client can see is a ``ServekitError``; the HTTP layer maps it to a response in one
place (``servekit.api.errors``) from the class's ``status_code`` and ``code``::

    ServekitError (500)
    ├── BadRequestError (400)
    │   ├── ArchiveError (400)          unsafe, corrupt or incomplete model archive
    │   │   └── ArchiveNotFoundError (404)  no archive or folder at that location
    │   ├── ConfigError (400)           a setting that cannot be parsed or is out of range
    │   └── DownloadError (400)         a model URL that is not allowed or cannot be fetched
    ├── UnauthorizedError (401)         missing, wrong or expired token
    ├── ForbiddenError (403)            a valid token of the wrong kind; removing a default version in use
    ├── ModelNotFoundError (404)
    ├── ModelVersionNotFoundError (404)
    ├── MethodNotAllowedError (405)     model register/delete while the model API is off; /token with supplied keys
    ├── RequestTimeoutError (408)       unregister could not finish within its timeout
    ├── ConflictError (409)             that model name and version are already registered
    ├── RequestTooLargeError (413)
    ├── ClientDisconnectedError (499)   the client went away; nobody reads this answer
    ├── HandlerError (500)              the handler raised, or broke the batch contract
    │   └── WorkerStartError (500)      a registration's workers failed to load; the model stays, with none
    ├── ServiceUnavailableError (503)   no worker alive, or the model is shutting down
    │   └── QueueFullError (503)
    ├── WorkerDiedError (500)           the worker process ended while it held the batch
    ├── ProtocolError (500)             a worker sent a frame that does not parse; treated as a crash
    ├── ResponseTimeoutError (504)      the worker did not answer within response_timeout
    └── DeadlineExceededError (504)     the request's own deadline passed while it was queued

``type`` in the JSON body is the class name, as TorchServe reports its Java exception names.
"""

from __future__ import annotations


class ServekitError(Exception):
    """Base of every error servekit reports to a client."""

    status_code = 500
    code = "internal_error"
    logged = False  # already logged where it was raised (a refusal for overload, summarized per model and second)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        """Extra HTTP headers that belong with this error."""
        return {}


class BadRequestError(ServekitError):
    status_code = 400
    code = "bad_request"


class ArchiveError(BadRequestError):
    code = "bad_archive"


class ArchiveNotFoundError(ArchiveError):
    status_code = 404
    code = "archive_not_found"


class ConfigError(BadRequestError):
    code = "bad_config"


class DownloadError(BadRequestError):
    code = "download_failed"


class UnauthorizedError(ServekitError):
    status_code = 401
    code = "unauthorized"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="servekit"'}


class ClientDisconnectedError(ServekitError):
    status_code = 499
    code = "client_disconnected"


class ForbiddenError(ServekitError):
    status_code = 403
    code = "forbidden"


class MethodNotAllowedError(ServekitError):
    status_code = 405
    code = "method_not_allowed"


class RequestTimeoutError(ServekitError):
    status_code = 408
    code = "request_timeout"


class ConflictError(ServekitError):
    status_code = 409
    code = "conflict"


class ModelNotFoundError(ServekitError):
    status_code = 404
    code = "model_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"Model not found: {name}")
        self.name = name


class ModelVersionNotFoundError(ServekitError):
    status_code = 404
    code = "model_version_not_found"

    def __init__(self, name: str, version: str, message: str | None = None) -> None:
        super().__init__(message or f"Model version: {version} does not exist for model: {name}")
        self.name = name
        self.version = version


class RequestTooLargeError(ServekitError):
    status_code = 413
    code = "request_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"Request body of {size} bytes exceeds max_request_size={limit}")
        self.size = size
        self.limit = limit


class HandlerError(ServekitError):
    """The handler raised or returned something that breaks the batch contract."""

    code = "handler_error"

    def __init__(self, message: str, status_code: int = 500) -> None:
        super().__init__(message)
        self.status_code = status_code


class WorkerStartError(HandlerError):
    """A synchronous registration's workers failed to load (the handler's error is in the server log). The model
    stays registered with no workers, as TorchServe keeps it: scale it once the cause is fixed, or unregister it."""

    code = "worker_start_failed"

    def __init__(self, name: str, version: str) -> None:
        super().__init__(f"Failed to start workers for model {name} version: {version}")  # TorchServe's words
        self.name = name
        self.version = version


class ServiceUnavailableError(ServekitError):
    status_code = 503
    code = "service_unavailable"
    retry_after_s = 1

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class QueueFullError(ServiceUnavailableError):
    code = "queue_full"

    def __init__(self, model: str, capacity: int) -> None:
        super().__init__(f'Model "{model}" queue full: {capacity} requests waiting (job_queue_size={capacity})')
        self.model = model
        self.capacity = capacity


class WorkerDiedError(ServekitError):
    code = "worker_died"


class ResponseTimeoutError(ServekitError):
    status_code = 504
    code = "response_timeout"


class DeadlineExceededError(ServekitError):
    status_code = 504
    code = "deadline_exceeded"


class ProtocolError(ServekitError):
    """A frame across the process boundary is malformed or too large."""

    code = "protocol_error"


def error_body(status: int, kind: str, message: str) -> bytes:
    """The JSON error body clients get, TorchServe's shape: ``{"code", "type", "message"}``."""
    import json

    return json.dumps({"code": status, "type": kind, "message": message}).encode()
