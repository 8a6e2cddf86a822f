"""``ts.handler_utils.utils``: ``send_intermediate_predict_response`` streams a chunk to each client of the batch."""

from __future__ import annotations

from typing import Any

from servekit.handler import Context


def send_intermediate_predict_response(
    ret: list[Any], req_id_map: dict[int, str] | None, message: str, code: int, context: Context
) -> bool:
    """Send ``ret[i]`` to the client of request ``req_id_map[i]`` (a request id; ``None``: request ``i`` of the
    batch) now, as one chunk of its streamed response (TorchServe's signature; ``message`` is not needed here)."""
    context.send_intermediate_response(ret, code, req_id_map)
    return True
