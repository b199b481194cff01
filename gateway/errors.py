"""One exception tree for the whole gateway.

The core raises these; only ``gateway.server`` knows which status code each becomes::

    GatewayError
    ├── InvalidInput          malformed request: bad JSON, shape, dtype, binary lengths
    │   ├── PayloadTooLarge   body above the configured limit (decompressed, if compressed)
    │   ├── UnsupportedEncoding  a Content-Encoding the gateway cannot decode
    │   ├── ClientTimeout     the client did not send its body in time
    │   └── SharedMemoryError a shared-memory region, offset or size that cannot be used
    │       ├── UnknownRegion     no region of that name is registered
    │       └── RegionExists      a region of that name is registered already
    ├── ModelNotFound         unknown model or version
    ├── ModelLoadError        a model (or its config) cannot be loaded
    ├── UnknownHost           no host (or DNS group) of that name (admin API)
    ├── HostConflict          a host change not possible now (admin API)
    ├── Unavailable           cannot serve right now; retrying later may work
    │   ├── ModelNotReady     known model, not loaded / unloading
    │   ├── QueueFull         the model's batch queue is at its bound
    │   ├── HostUnreachable   a remote host refused, reset or timed out the connection
    │   └── Overloaded        admission control: no capacity within the deadline
    └── DeadlineExceeded      the request's timeout expired before it ran
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway reports to a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(GatewayError):
    """The request cannot be served as written; retrying it unchanged will fail again."""


class PayloadTooLarge(InvalidInput):
    """The request body exceeds the configured size limit."""


class UnsupportedEncoding(InvalidInput):
    """The request body is compressed with a coding the gateway does not decode."""


class ClientTimeout(InvalidInput):
    """The client was too slow delivering its request (slow-loris protection)."""


class SharedMemoryError(InvalidInput):
    """A shared-memory region cannot be registered or used as asked (400, naming it)."""


class UnknownRegion(SharedMemoryError):
    """No shared-memory region of that name is registered (gRPC: NOT_FOUND)."""


class RegionExists(SharedMemoryError):
    """A shared-memory region of that name is registered already (gRPC: ALREADY_EXISTS)."""


class ModelNotFound(GatewayError):
    """No such model, or no such version of it."""


class ModelLoadError(GatewayError):
    """A model or its configuration is invalid and cannot be loaded."""


class UnknownHost(GatewayError):
    """No host (or DNS group) of that name in the router's table."""


class HostConflict(GatewayError):
    """The host change is not possible in the current state (a DNS-discovered host, no
    router, shutdown)."""


class Unavailable(GatewayError):
    """The gateway cannot serve this now; ``retry_after_s`` hints when to try again."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelNotReady(Unavailable):
    """The model is known but not ready (loading, unloading, or failed)."""


class QueueFull(Unavailable):
    """The model's queue is at its bound; fail fast rather than grow latency."""


class HostUnreachable(Unavailable):
    """A remote host could not be reached or dropped the connection before answering.

    The request did not complete there, so the router may retry it on another host.
    """


class Overloaded(Unavailable):
    """Admission control: no host can serve the request within its deadline."""


class DeadlineExceeded(GatewayError):
    """The request's timeout expired before it could be executed."""
