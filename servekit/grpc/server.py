"""The gRPC ports the server opens: TorchServe's inference API on ``grpc_inference_address:grpc_inference_port``
(7070) with the inference key, its management API on ``grpc_management_address:grpc_management_port`` (7071) with
the management key, both on 127.0.0.1 by default. ``Ping`` needs no key, as ``/ping`` does not.

With ``enable_grpc_ssl``, both serve TLS with the HTTPS ports' key and certificate (``servekit.tls``; TorchServe
reads ``private_key_file`` and ``certificate_file``, servekit also a ``keystore``), and ask clients for a certificate
when ``client_ca_file`` is set. Another service joins a port with one call: ``ports.inference.add(descriptor,
implementation)`` (``servekit.grpc.port``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from servekit.api.auth import TokenStore
from servekit.errors import ConfigError
from servekit.grpc.generated import inference_pb2, management_pb2, open_inference_pb2, open_inference_torchserve_pb2
from servekit.grpc.inference import InferenceAPIs
from servekit.grpc.management import ManagementAPIs
from servekit.grpc.open_inference import OPEN_METHODS, OpenInference
from servekit.grpc.port import GrpcPort
from servekit.registry import ModelRegistry
from servekit.settings import Settings
from servekit.tls import load_identity


@dataclass(frozen=True, slots=True)
class GrpcPorts:
    """The two gRPC ports, with their services added, not yet listening."""

    inference: GrpcPort
    management: GrpcPort

    @property
    def both(self) -> tuple[GrpcPort, GrpcPort]:
        return self.inference, self.management


def credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The TLS credentials of ``enable_grpc_ssl``, or ``None``; ``ConfigError`` naming the key at fault."""
    if not settings.enable_grpc_ssl:
        return None
    identity = load_identity(settings, "enable_grpc_ssl")
    roots = None
    if settings.client_ca_file is not None:
        try:
            roots = settings.client_ca_file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"client_ca_file: cannot read {settings.client_ca_file}: {exc.strerror}") from None
    pairs = [(identity.key_pem, identity.chain_pem)]
    return grpc.ssl_server_credentials(pairs, root_certificates=roots, require_client_auth=roots is not None)


def grpc_ports(settings: Settings, registry: ModelRegistry, tokens: TokenStore | None) -> GrpcPorts:
    """The inference and management ports with TorchServe's services; ``ConfigError`` for bad TLS settings."""
    tls = credentials(settings)

    def port(name: str, kind: str) -> GrpcPort:
        """The port of the ``grpc_<kind>_*`` settings."""

        def setting(key: str) -> Any:
            return getattr(settings, f"grpc_{kind}_{key}")

        return GrpcPort(
            name, setting("address"), setting("port"), tokens=tokens, kind=kind, credentials=tls,
            max_request_size=settings.max_request_size, max_connection_age_ms=setting("max_connection_age_ms"),
            max_connection_age_grace_ms=setting("max_connection_age_grace_ms"), access_log=settings.access_log,
        )  # fmt: skip

    inference = port("gRPC inference", "inference")
    inference.add(inference_pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"], InferenceAPIs(registry), {"Ping"})
    open_inference = OpenInference(registry)
    for oip_service in (open_inference_pb2, open_inference_torchserve_pb2):
        inference.add(oip_service.DESCRIPTOR.services_by_name["GRPCInferenceService"], open_inference, OPEN_METHODS)
    management = port("gRPC management", "management")
    management.add(management_pb2.DESCRIPTOR.services_by_name["ManagementAPIsService"], ManagementAPIs(registry))
    return GrpcPorts(inference, management)
