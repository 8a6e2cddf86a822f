"""``ts.metrics.metric_type_enum`` for handlers written for TorchServe."""

from servekit.handler_metrics import MetricTypes

__all__ = ["MetricTypes"]
