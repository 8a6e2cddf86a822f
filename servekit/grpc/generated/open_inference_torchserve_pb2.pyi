# Generated from servekit/grpc/protos/open_inference_torchserve.proto by servekit/grpc/protos/generate.py (`make protos`) with
# grpcio-tools 1.72.1. Do not edit: change the .proto file and regenerate.
from servekit.grpc.generated import open_inference_pb2 as _open_inference_pb2
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor
