"""``ts.metrics.dimension`` for handlers written for TorchServe."""

from servekit.handler_metrics import Dimension

__all__ = ["Dimension"]
