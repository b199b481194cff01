"""gRPC front end: ``inference.GRPCInferenceService`` over the same data plane as REST.

- ``server``: the servicer (inference through ``DataPlane.submit``, as REST, streaming
  included), credential rules, and the ``grpc.aio`` transport (``grpc_transport = "grpcio"``).
- ``http2``: HTTP/2 connections on the serving loop (frames, HPACK, flow control).
- ``calls``: gRPC calls on those connections, the default transport (``"asyncio"``).
- ``wire``: ``ModelInfer``'s raw tensors read and written without protobuf's copies.
- ``codec``: protobuf messages <-> the v2 request and response types (raw contents or typed).
- ``errors``: the one gateway error -> gRPC status table.
"""

from gateway.grpc.calls import Http2GrpcServer
from gateway.grpc.server import GrpcServer, InferenceServicer

__all__ = ["GrpcServer", "Http2GrpcServer", "InferenceServicer"]
