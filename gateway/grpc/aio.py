"""The ``grpc.aio`` transport (``grpc_transport = "grpcio"``): :class:`GrpcServer` and its
access interceptor.

The servicer (:class:`gateway.grpc.server.InferenceServicer`), its method table and the access
rules (``refusal``) are shared with the default transport (:mod:`gateway.grpc.calls`); this
module is only what ``grpc.aio`` needs around them: the server's options, the interceptor that
applies the rules per call when keys are checked, the registered-method choice and TLS
credentials (:mod:`gateway.grpc.tls`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc  # type: ignore[import-untyped]  # no stubs in the venv

from gateway.batching import clients
from gateway.credentials import Credentials
from gateway.dataplane import DataPlane
from gateway.grpc.server import ADMIN_METHODS, InferenceServicer, method_handlers, refusal
from gateway.grpc.tls import server_credentials

log = logging.getLogger(__name__)


_SERVICE = "inference.GRPCInferenceService"


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


REGISTERED_METHODS = ("ModelInfer",)


def _metadata_bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The REST front end's rules over gRPC: keys from ``authorization`` (``Bearer <k>``) or
    ``x-api-key`` metadata; the repository RPCs need the admin key, and are not served at all
    when the admin API is off or bound to its own (HTTP) port."""

    def __init__(self, credentials: Credentials, admin_here: bool) -> None:
        self.credentials = credentials
        self.admin_here = admin_here

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler
        metadata = dict(details.invocation_metadata or ())
        refused = refusal(
            details.method.rsplit("/", 1)[-1],
            self.credentials,
            self.admin_here,
            _metadata_bytes(metadata.get("authorization")),
            _metadata_bytes(metadata.get("x-api-key")),
        )
        return handler if refused is None else _refusal(handler, *refused)


def _refusal(handler: Any, code: Any, message: str) -> Any:
    """A handler of the same shape as ``handler`` that only aborts with ``code``."""

    async def refuse(request: Any, context: Any) -> None:
        await context.abort(code, message)

    kinds = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for kind, make in kinds.items():
        if getattr(handler, kind) is not None:
            return make(
                refuse,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class GrpcServer:
    """The gRPC front end's life cycle, for the app's start-up and shut-down hooks.

    ``start`` must run on the serving event loop (``grpc.aio`` binds to the running loop).
    """

    def __init__(
        self,
        dataplane: DataPlane,
        host: str,
        port: int,
        max_message_bytes: int,
        grace_s: float = 30.0,
    ) -> None:
        self.dataplane = dataplane
        self.address = _address(host, port)
        self.max_message_bytes = max_message_bytes
        self.grace_s = grace_s
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        settings = self.dataplane.settings
        credentials = Credentials(settings.api_keys, settings.admin_keys)
        admin_here = bool(settings.admin_api and not settings.admin_port)
        # The interceptor runs a coroutine chain on every call: only when keys are checked.
        interceptors = [AccessInterceptor(credentials, admin_here)] if credentials.enabled else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a second gateway on the port fails, not shares
            ],
        )
        servicer = InferenceServicer(self.dataplane, settings.grpc_stream_max_inflight)
        handlers = method_handlers(servicer)
        if not admin_here:  # refused whoever asks, so without a per-call check
            message, code = "the repository API is not served here", grpc.StatusCode.UNIMPLEMENTED
            for method in ADMIN_METHODS:
                handlers[method] = _refusal(handlers[method], code, message)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
        # Only ModelInfer as a registered method: grpc.aio waits on one pending request per
        # registered method and every accepted call re-arms that wait over all of them, so
        # registering the service's 22 methods costs each call a wait over 23 futures.
        server.add_registered_method_handlers(
            _SERVICE, {name: handlers[name] for name in REGISTERED_METHODS}
        )
        tls = server_credentials(settings)
        try:
            if tls is None:
                self.port = server.add_insecure_port(self.address)
            else:
                self.port = server.add_secure_port(self.address, tls)
        except RuntimeError as exc:
            raise OSError(f"cannot bind gRPC to {self.address}: {exc}") from None
        await server.start()
        self._server = server
        # grpc.aio's connections are not seen one by one: as if one carrying any number of
        # calls were always open (the batcher's count of who may send)
        clients.opened(asyncio.get_running_loop(), carries=None)
        log.info("gRPC listening on %s%s", self.address, " (TLS)" if tls else "")

    async def stop(self) -> None:
        """Refuse new RPCs, let running ones finish within ``grace_s``."""
        server, self._server = self._server, None
        if server is not None:
            clients.closed(asyncio.get_running_loop(), carries=None)
            await server.stop(self.grace_s)
