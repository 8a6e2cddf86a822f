"""The error tree of servekit (standard library only, and ``servekit.encoding`` for the error body).

Every error a client can see is a ``ServekitError``; the HTTP layer maps it to a response in one
place (``servekit.api.errors``) from the class's ``status_code`` and ``code``::

    ServekitError (500)
    ├── BadRequestError (400)
    │   ├── ArchiveError (400)          unsafe, corrupt or incomplete model archive
    │   │   └── ArchiveNotFoundError (404)  no archive or folder at that location
    │   ├── ConfigError (400)           a setting that cannot be parsed or is out of range
    │   └── DownloadError (400)         a model URL that is not allowed or cannot be fetched
    ├── UnauthorizedError (401)         missing, wrong or expired token
    ├── ForbiddenError (403)            a valid token of the wrong kind
    │   └── DefaultVersionError (403)   removing a model's default version while other versions remain
    ├── ModelNotFoundError (404)
    ├── ModelVersionNotFoundError (404)
    ├── SequenceNotFoundError (404)     a sequence id that was closed, expired or lost with its worker
    ├── MethodNotAllowedError (405)     model register/delete while the model API is off; /token with supplied keys
    ├── RequestTimeoutError (408)       unregister could not finish within its timeout
    ├── ConflictError (409)             that model name and version are already registered
    ├── RequestTooLargeError (413)
    ├── ClientDisconnectedError (499)   the client went away; nobody reads this answer
    ├── HandlerError (500)              the handler raised, or broke the batch contract
    │   └── WorkerStartError (500)      a registration's workers failed to load; the model stays, with none
    ├── ServiceUnavailableError (503)   no worker alive, or the model is shutting down
    │   ├── QueueFullError (503)
    │   └── SequenceLimitError (503)    maxNumSequence sequences open; maxSequenceJobQueueSize of one waiting
    ├── WorkerDiedError (500)           the worker process ended while it held the batch
    ├── ProtocolError (500)             a worker sent a frame that does not parse; treated as a crash
    ├── ResponseTimeoutError (504)      the worker did not answer within response_timeout
    └── DeadlineExceededError (504)     the request's own deadline passed while it was queued

``type`` in the JSON body is the class's ``type_name``: the name of the Java exception TorchServe 0.12 answers the
same case with (``ModelNotFoundError`` is ``ModelNotFoundException``), so that clients written against TorchServe
read the same body; errors that TorchServe has no answer for (a 413's body, a 504, a worker's answer over
``max_response_size``) keep servekit's class name. The Python classes keep servekit's names.
"""

from __future__ import annotations

from servekit.encoding import frontend_json


class ServekitError(Exception):
    """Base of every error servekit reports to a client."""

    status_code = 500
    code = "internal_error"
    type_name = "InternalServerException"  # the JSON body's ``type``: TorchServe's exception for this case
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
    type_name = "BadRequestException"


class ArchiveError(BadRequestError):
    code = "bad_archive"
    type_name = "InvalidModelException"


class ArchiveNotFoundError(ArchiveError):
    status_code = 404
    code = "archive_not_found"
    type_name = "ModelNotFoundException"


class ConfigError(BadRequestError):
    code = "bad_config"
    type_name = "BadRequestException"


class DownloadError(BadRequestError):
    code = "download_failed"
    type_name = "DownloadArchiveException"


class UnauthorizedError(ServekitError):
    status_code = 401
    code = "unauthorized"
    type_name = "InvalidKeyException"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="servekit"'}


class ClientDisconnectedError(ServekitError):
    status_code = 499
    code = "client_disconnected"
    type_name = "ClientDisconnectedError"


class ForbiddenError(ServekitError):
    status_code = 403
    code = "forbidden"
    type_name = "InvalidKeyException"


class DefaultVersionError(ForbiddenError):
    """Unregistering a model's default version while it has others (set another default first)."""

    code = "default_version_in_use"
    type_name = "InvalidModelVersionException"


class MethodNotAllowedError(ServekitError):
    status_code = 405
    code = "method_not_allowed"
    type_name = "MethodNotAllowedException"


class RequestTimeoutError(ServekitError):
    status_code = 408
    code = "request_timeout"
    type_name = "RequestTimeoutException"


class ConflictError(ServekitError):
    status_code = 409
    code = "conflict"
    type_name = "ConflictStatusException"


class ModelNotFoundError(ServekitError):
    status_code = 404
    code = "model_not_found"
    type_name = "ModelNotFoundException"

    def __init__(self, name: str) -> None:
        super().__init__(f"Model not found: {name}")
        self.name = name


class ModelVersionNotFoundError(ServekitError):
    status_code = 404
    code = "model_version_not_found"
    type_name = "ModelVersionNotFoundException"

    def __init__(self, name: str, version: str, message: str | None = None) -> None:
        super().__init__(message or f"Model version: {version} does not exist for model: {name}")
        self.name = name
        self.version = version


class SequenceNotFoundError(ServekitError):
    """Sequence batching: a request names a sequence that was closed, expired, ended when its worker died, or that
    this server never started (an id in the server's own ``ts-seq-`` form)."""

    status_code = 404
    code = "sequence_not_found"
    type_name = "SequenceNotFoundError"  # TorchServe answers these 503, with the no-worker words

    def __init__(self, model: str, sequence_id: str, reason: str) -> None:
        super().__init__(f'Sequence "{sequence_id}" of model "{model}" {reason}')
        self.model = model
        self.sequence_id = sequence_id
        self.reason = reason


class RequestTooLargeError(ServekitError):
    status_code = 413
    code = "request_too_large"
    type_name = "RequestTooLargeError"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"Request body of {size} bytes exceeds max_request_size={limit}")
        self.size = size
        self.limit = limit


class HandlerError(ServekitError):
    """The handler raised or returned something that breaks the batch contract."""

    code = "handler_error"
    type_name = "InternalServerException"

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
    type_name = "ServiceUnavailableException"
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


class SequenceLimitError(ServiceUnavailableError):
    """Sequence batching: a new sequence while ``maxNumSequence`` are open, or a request while
    ``maxSequenceJobQueueSize`` requests of its sequence wait. TorchServe's words, then the numbers."""

    code = "sequence_limit"

    def __init__(self, model: str, detail: str) -> None:
        super().__init__(
            f'Model "{model}" has no worker to serve inference request. Please use scale workers API to add workers.'
            " If this is a sequence inference, please check if it is closed, or expired; or exceeds"
            f" maxSequenceJobQueueSize ({detail})"
        )
        self.model = model
        self.detail = detail


class WorkerDiedError(ServekitError):
    code = "worker_died"


class ResponseTimeoutError(ServekitError):
    status_code = 504
    code = "response_timeout"
    type_name = "ResponseTimeoutError"


class DeadlineExceededError(ServekitError):
    status_code = 504
    code = "deadline_exceeded"
    type_name = "DeadlineExceededError"


class ProtocolError(ServekitError):
    """A frame across the process boundary is malformed or too large."""

    code = "protocol_error"


def type_name(kind: str) -> str:
    """The ``type`` of an error body for the servekit error class named ``kind`` (its ``type_name``); any other name
    (TorchServe's own, such as ``ResourceNotFoundException``) as it is."""
    pending: list[type[ServekitError]] = [ServekitError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == kind:
            return cls.type_name
        pending += cls.__subclasses__()
    return kind


def error_body(status: int, kind: str, message: str) -> bytes:
    """The JSON error body clients get, as TorchServe's front end writes it: ``{"code", "type", "message"}``, Gson's
    pretty printing (``servekit.encoding.frontend_json``); ``kind`` is an error class's name or TorchServe's
    exception name (``type_name``)."""
    return frontend_json({"code": status, "type": type_name(kind), "message": message})
