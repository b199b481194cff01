"""The one table from gateway errors to gRPC status codes (Triton-compatible where Triton says).

Messages are the same as the REST front end's ``{"error": ...}`` bodies.
"""

from __future__ import annotations

import grpc  # type: ignore[import-untyped]  # no stubs in the venv

from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RegionExists,
    Unavailable,
    UnknownRegion,
)

# Most specific first.
STATUS: list[tuple[type[GatewayError], grpc.StatusCode]] = [
    (PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnknownRegion, grpc.StatusCode.NOT_FOUND),  # shared memory, as Triton
    (RegionExists, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (ModelLoadError, grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # QueueFull too ("Exceeds maximum queue size": UNAVAILABLE from Triton 2.51, as REST's 503)
    (Unavailable, grpc.StatusCode.UNAVAILABLE),  # ModelNotReady, shutting down
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
]


def status_of(exc: GatewayError) -> grpc.StatusCode:
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL
