"""``ts.metrics`` for handlers written for TorchServe."""
