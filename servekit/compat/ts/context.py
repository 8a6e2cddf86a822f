"""``ts.context`` for handlers written for TorchServe."""

from servekit.handler import Context, Metrics, RequestProcessor

__all__ = ["Context", "Metrics", "RequestProcessor"]
