"""``ts.utils`` for handlers written for TorchServe."""
