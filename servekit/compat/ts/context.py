"""``ts.context`` for handlers written for TorchServe."""

from servekit.handler import Context, RequestProcessor
from servekit.handler_metrics import Metrics

__all__ = ["Context", "Metrics", "RequestProcessor"]
