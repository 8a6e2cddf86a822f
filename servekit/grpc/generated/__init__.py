"""Generated code: the protobuf messages and gRPC client stubs of ``servekit/grpc/protos/*.proto``, written by
``servekit/grpc/protos/generate.py`` (``make protos``). Do not edit; change the ``.proto`` files and regenerate.

Only the server process imports these modules, and only when gRPC is on: their messages have TorchServe's names
(``org.pytorch.serve.grpc.*``), which a process can register once, so a client generated from TorchServe's own
files cannot share a process with them."""
