"""servekit's stand-in for TorchServe's ``ts`` package (see ``../README.md``)."""
