"""``ts.handler_utils``: the parts of TorchServe's handler utilities that servekit provides."""
