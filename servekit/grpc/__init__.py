"""TorchServe's gRPC APIs, served by the front-end process with grpcio's asyncio server (``grpc.aio``).

``port`` (one listening port: its services, key check, error statuses and access log), ``inference`` and
``management`` (TorchServe's ``InferenceAPIsService`` and ``ManagementAPIsService``, on the same registry, batchers
and workers as the REST APIs), ``status`` (errors as gRPC statuses), ``server`` (the two ports the server opens).
``generated`` holds the protobuf modules generated from ``protos/`` (``make protos``).

The server imports this package only when ``enable_grpc`` is on, so that grpcio and the generated messages are
never loaded otherwise (see ``generated``'s docstring for why that matters to a client in the same process).
"""
