"""``ts.metrics.dimension`` for handlers written for TorchServe."""

from servekit.handler import Dimension

__all__ = ["Dimension"]
