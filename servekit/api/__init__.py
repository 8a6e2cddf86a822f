"""The HTTP layer: one app per port (inference, management, metrics)."""
