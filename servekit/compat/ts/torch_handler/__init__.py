"""``ts.torch_handler`` for handlers written for TorchServe."""
