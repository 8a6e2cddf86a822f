"""What a handler sees of its model and of the batch it runs: TorchServe's ``ts.context`` (``Context``,
``RequestProcessor``), part of the handler contract (``servekit.handler``).

Runs in the worker process; never imports asyncio or fastapi."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from servekit.handler_metrics import Metrics

SERVER_NAME = "MMS"  # what TorchServe reports, kept for handlers that check it
SERVER_VERSION = "0.1.0"


class RequestProcessor:
    """Per-request headers in, status and headers out (TorchServe's ``ts.context.RequestProcessor``)."""

    def __init__(self, request_header: dict[str, Any]) -> None:
        self._status_code = 200
        self._reason_phrase: str | None = None
        self._response_header: dict[str, str] = {}
        self._request_header = request_header

    def get_request_property(self, key: str) -> Any:
        """A request header, or ``None``; the name in any case (the front end passes names in lower case, while
        handlers written for TorchServe ask in the client's case, ``"X-Foo"``)."""
        value = self._request_header.get(key)
        if value is None and not key.islower():
            value = self._request_header.get(key.lower())
        return value

    def get_request_properties(self) -> dict[str, Any]:
        return self._request_header

    def report_status(self, code: int, reason_phrase: str | None = None) -> None:
        self._status_code = code
        self._reason_phrase = reason_phrase

    def get_response_status_code(self) -> int:
        return self._status_code

    def get_response_status_phrase(self) -> str | None:
        return self._reason_phrase

    def add_response_property(self, key: str, value: str) -> None:
        self._response_header[key] = value

    def get_response_headers(self) -> dict[str, str]:
        return self._response_header

    def get_response_header(self, key: str) -> str | None:
        return self._response_header.get(key)


class Context:
    """What a handler knows about its model and the current batch (TorchServe's ``ts.context.Context``)."""

    def __init__(
        self,
        model_name: str,
        model_dir: str,
        manifest: dict[str, Any] | None,
        batch_size: int,
        gpu: int | None,
        mms_version: str = SERVER_VERSION,
        limit_max_image_pixels: bool = True,
        metrics: Metrics | None = None,
        model_yaml_config: dict[str, Any] | None = None,
    ) -> None:
        self.model_name = model_name
        self.manifest = manifest
        self.system_properties: dict[str, Any] = {
            "model_dir": model_dir,
            "gpu_id": gpu,
            "batch_size": batch_size,
            "server_name": SERVER_NAME,
            "server_version": mms_version,
            "limit_max_image_pixels": limit_max_image_pixels,
        }
        self.request_ids: dict[int, str] | None = None
        self.request_processor: list[RequestProcessor] = []
        self.metrics = metrics if metrics is not None else Metrics(model_name)
        self.model_yaml_config = model_yaml_config or {}
        self.stopping_criteria: Any = None
        self.cl_socket: Any = None
        # set by the worker for each batch: sends (request index, value) pairs as chunks, with a status code
        self.intermediate: Callable[[list[tuple[int, Any]], int], None] | None = None
        # Sequence batching: the header names TorchServe's handlers read through the context. The front end sends the
        # sequence id and start under these names whatever ts_header_key_sequence_* say (docs/handlers.md).
        self.header_key_sequence_id = "ts_request_sequence_id"
        self.header_key_sequence_start = "ts_request_sequence_start"
        self.header_key_sequence_end = "ts_request_sequence_end"

    def send_intermediate_response(
        self, values: list[Any], code: int = 200, request_ids: dict[int, str] | None = None
    ) -> None:
        """Send ``values[i]`` to the client of request ``i`` of the batch now, as one chunk of a streamed (chunked)
        response; ``handle``'s return value is the last chunk. With ``request_ids`` (TorchServe's ``req_id_map``,
        ``{i: request id}``), ``values[i]`` goes to the request of that id instead, so that a handler may send to some
        requests of its batch only. TorchServe's ``send_intermediate_predict_response``."""
        if self.intermediate is None:
            raise RuntimeError("Intermediate responses can only be sent from a worker running a batch")
        if request_ids is None:
            if len(values) != len(self.request_processor):
                raise ValueError(f"Expected {len(self.request_processor)} intermediate values, one per request")
            self.intermediate(list(enumerate(values)), code)
            return
        index = {request_id: i for i, request_id in (self.request_ids or {}).items()}
        pairs = []
        for i, value in enumerate(values):
            request_id = request_ids.get(i)
            if request_id not in index:
                raise ValueError(f"req_id_map[{i}] = {request_id!r} is no request of this batch")
            pairs.append((index[request_id], value))
        self.intermediate(pairs, code)

    def get_request_id(self, idx: int = 0) -> str | None:
        return self.request_ids.get(idx) if self.request_ids else None

    def get_request_header(self, idx: int, key: str) -> Any:
        return self.request_processor[idx].get_request_property(key)

    def get_all_request_header(self, idx: int) -> dict[str, Any]:
        return self.request_processor[idx].get_request_properties()

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.set_response_header(idx, "content-type", value)

    def get_response_content_type(self, idx: int) -> str | None:
        return self.get_response_headers(idx).get("content-type")

    def get_response_status(self, idx: int) -> tuple[int, str | None]:
        processor = self.request_processor[idx]
        return processor.get_response_status_code(), processor.get_response_status_phrase()

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        if self.request_processor:
            self.request_processor[idx].report_status(code, phrase)

    def set_all_response_status(self, code: int = 200, phrase: str = "") -> None:
        for processor in self.request_processor:
            processor.report_status(code, phrase)

    def get_response_headers(self, idx: int) -> dict[str, str]:
        return self.request_processor[idx].get_response_headers()

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.request_processor[idx].add_response_property(key, value)

    def get_sequence_id(self, idx: int) -> str | None:
        """The id of request ``idx``'s sequence (sequence batching), else that header if sent, else ``None``."""
        sequence_id = self.request_processor[idx].get_request_property(self.header_key_sequence_id)
        return None if sequence_id is None else str(sequence_id)
