"""gRPC front end: ``inference.GRPCInferenceService`` over the same data plane as REST.

- ``server``: the servicer (inference through ``DataPlane.submit``, as REST, streaming
  included), its method table, credential rules, and the transport choice (``grpc_server``).
- ``http2``: HTTP/2 connections on the serving loop (frames, HPACK, flow control).
- ``calls``: gRPC calls on those connections, the default transport (``"asyncio"``).
- ``aio``: the ``grpc.aio`` transport (``grpc_transport = "grpcio"``).
- ``tls``: TLS for either transport, from the settings.
- ``wire``: ``ModelInfer``'s raw tensors read and written without protobuf's copies.
- ``codec``: protobuf messages <-> the v2 request and response types (raw contents or typed).
- ``errors``: the one gateway error -> gRPC status table.
"""

from gateway.grpc.aio import GrpcServer
from gateway.grpc.calls import Http2GrpcServer
from gateway.grpc.server import InferenceServicer, grpc_server

__all__ = ["GrpcServer", "Http2GrpcServer", "InferenceServicer", "grpc_server"]
