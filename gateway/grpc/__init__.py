"""gRPC front end: ``inference.GRPCInferenceService`` over the same data plane as REST.

- ``server``: the servicer (inference through ``DataPlane.submit``, as REST, streaming
  included), credential interceptor and the server's start and stop.
- ``codec``: protobuf messages <-> the v2 request and response types (raw contents or typed).
- ``errors``: the one gateway error -> gRPC status table.
"""

from gateway.grpc.server import GrpcServer, InferenceServicer

__all__ = ["GrpcServer", "InferenceServicer"]
