"""gRPC front end: ``inference.GRPCInferenceService`` over the same data plane as REST."""

from gateway.grpc.server import GrpcServer, InferenceServicer

__all__ = ["GrpcServer", "InferenceServicer"]
