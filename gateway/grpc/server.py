"""``inference.GRPCInferenceService`` over :class:`gateway.dataplane.DataPlane`: what both
gRPC transports share. (Over 450 lines on purpose: one servicer, one method per RPC of the
service, each a translation; split by RPC they would share all the rest.)

The servicer is served by either transport: :mod:`gateway.grpc.calls` (HTTP/2 on the serving
loop, the default) or :mod:`gateway.grpc.aio` (``grpc.aio``, ``grpc_transport = "grpcio"``);
:func:`grpc_server` picks one from the settings.

Each RPC only translates messages (tritonclient's generated ``service_pb2``) to and from the
data plane's calls, the same calls the REST endpoints make on the same instance (for inference,
``DataPlane.submit``: a model an edge has not pulled yet is pulled, as over REST), so gRPC and
REST requests for one model share its batcher. Errors become gRPC statuses through
:mod:`gateway.grpc.errors`; in ``ModelStreamInfer`` they go in ``error_message`` and the stream
goes on. Stream requests run concurrently, so their responses may come back out of order (match
them by ``id``), as with Triton; at most ``stream_max_inflight`` of them are held at once, read
but not yet answered and written (see :meth:`InferenceServicer.ModelStreamInfer`).

Why one module of this size: it is the gRPC front end's one servicer, whose RPCs mirror the
REST routes (inference, repository, statistics, shared memory, logging, trace settings), each a
few lines of translation, plus the method table and access rules (``refusal``) both transports
apply.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

import grpc  # type: ignore[import-untyped]  # no stubs in the venv
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from gateway import trace_settings, tracing
from gateway.credentials import Credentials, Verdict, token_of
from gateway.dataplane import DataPlane
from gateway.errors import (
    GatewayError,
    InvalidInput,
    SharedMemoryError,
    Unavailable,
    UnknownRegion,
)
from gateway.grpc.errors import status_of
from gateway.grpc.wire import (
    RawResponse,
    decode_request,
    encode_raw_response,
    parse_infer_request,
    serialize_infer_response,
    serialize_stream_response,
)
from gateway.logs import CONTROL
from gateway.pending import Pending

log = logging.getLogger(__name__)

Handler = Callable[[Any, Any, Any], Awaitable[Any]]
H = TypeVar("H", bound=Handler)


def _version(text: str) -> str | None:
    return text or None


def _unary(method: H) -> H:
    """Turn the data plane's exceptions into gRPC statuses with REST's messages."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await method(self, request, context)
        except GatewayError as exc:
            await context.abort(status_of(exc), exc.message, failure_metadata(exc))
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.exception("gRPC %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    return wrapper  # type: ignore[return-value]


def stream_response(request: Any, outcome: Any) -> Any:
    """A ``ModelStreamInfer`` answer: the encoded response (``_infer``'s; a ``RawResponse`` as
    it is, for ``serialize_stream_response``), or for an error its message in
    ``error_message`` with the request's name, version and id echoed (the stream goes on)."""
    if not isinstance(outcome, Exception):
        if isinstance(outcome, RawResponse):
            return outcome
        return pb.ModelStreamInferResponse(infer_response=outcome)
    if isinstance(outcome, GatewayError):
        message = outcome.message
    else:
        log.error("gRPC ModelStreamInfer request failed", exc_info=outcome)
        message = f"internal error: {type(outcome).__name__}"
    echo = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    return pb.ModelStreamInferResponse(error_message=message, infer_response=echo)


def failure_metadata(exc: GatewayError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata of a failed call: ``retry-after`` when the error has one."""
    if isinstance(exc, Unavailable) and exc.retry_after_s is not None:
        return (("retry-after", str(max(1, math.ceil(exc.retry_after_s)))),)
    return ()


def _metadata_value(context: Any, name: str) -> str | None:
    """A call's metadata entry ``name`` (gRPC keys are lower case), for the data plane."""
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else None
    return None


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The Open Inference Protocol's gRPC service, with Triton's system shared memory (CUDA
    shared memory refused: not supported) and logging extension; trace RPCs are left
    UNIMPLEMENTED (the generated base class's answer)."""

    def __init__(self, dataplane: DataPlane, stream_max_inflight: int = 16) -> None:
        if stream_max_inflight < 1:
            raise ValueError("stream_max_inflight must be at least 1")
        self.dataplane = dataplane
        self.stream_max_inflight = stream_max_inflight

    # -- health and metadata ----------------------------------------------------------------

    @_unary
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    @_unary
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    @_unary
    async def ModelReady(self, request: Any, context: Any) -> Any:
        ready = self.dataplane.model_ready(request.name, _version(request.version))
        return pb.ModelReadyResponse(ready=ready)

    @_unary
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        meta = self.dataplane.server_metadata()
        return pb.ServerMetadataResponse(
            name=meta["name"], version=meta["version"], extensions=meta["extensions"]
        )

    @_unary
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        meta = self.dataplane.model_metadata(request.name, _version(request.version))

        def tensors(items: list[dict[str, Any]]) -> list[Any]:
            return [
                pb.ModelMetadataResponse.TensorMetadata(
                    name=t["name"], datatype=t["datatype"], shape=t["shape"]
                )
                for t in items
            ]

        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=tensors(meta["inputs"]),
            outputs=tensors(meta["outputs"]),
        )

    @_unary
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        config = self.dataplane.model_config(request.name, _version(request.version))
        message = json_format.ParseDict(config, mc.ModelConfig(), ignore_unknown_fields=True)
        return pb.ModelConfigResponse(config=message)

    @_unary
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        stats = self.dataplane.model_stats(request.name or None, _version(request.version))
        return json_format.ParseDict(
            stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True
        )

    # -- inference --------------------------------------------------------------------------

    def submit(self, request: Any, context: Any = None) -> Pending:
        """The one call into the data plane (decoding there, once the model is known: an
        unknown model is NOT_FOUND whatever the message). The call's metadata are its headers
        (a traffic split's sticky header). Synchronous, so a transport can submit every
        request of one read before any waits (they then batch together)."""
        decode = functools.partial(decode_request, request)
        version = _version(request.model_version)
        header = None if context is None else functools.partial(_metadata_value, context)
        trace = None
        if tracing.enabled:  # the call's metadata (a stream's, for each of its requests)
            call = context if context is not None else _STREAM.get()
            metadata = call.invocation_metadata() if call is not None else None
            trace = tracing.from_metadata(metadata, request.ByteSize())
        return self.dataplane.submit(request.model_name, version, decode, None, header, trace)

    async def _infer(self, request: Any, context: Any = None) -> Any:
        """``submit``, then the answer encoded (raw outputs as a ``RawResponse``: see
        ``gateway.grpc.wire``)."""
        pending = self.submit(request, context)
        if pending.span is not None:
            return await traced_answer(pending)
        result = await pending
        # raw_output_contents always, as Triton; without protobuf's copies where that pays
        # (gateway/grpc/wire.py)
        return encode_raw_response(result)

    @_unary
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return await self._infer(request, context)

    async def _stream_one(self, request: Any, context: Any = None) -> Any:
        try:
            return stream_response(request, await self._infer(request, context))
        except Exception as exc:
            return stream_response(request, exc)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        """Answer each request as it completes, holding at most ``stream_max_inflight`` requests
        read but not yet answered and written.

        A slot is taken before each read and given back only once its answer is written, so a
        client that sends and never reads stops being read: its requests wait in gRPC's HTTP/2
        flow-control window, not in this process. When the stream ends abnormally (the client
        cancels or goes away), every request still running is cancelled.
        """
        if tracing.enabled:
            _STREAM.set(context)  # this handler's context: its requests' tasks inherit it
        slots = asyncio.Semaphore(self.stream_max_inflight)
        answers: asyncio.Queue[Any] = asyncio.Queue()  # at most one per slot
        running: set[asyncio.Task[None]] = set()
        done = object()

        async def answer(request: Any) -> None:
            answers.put_nowait(await self._stream_one(request, context))

        async def read() -> None:
            try:
                while True:
                    await slots.acquire()
                    try:
                        request = await anext(request_iterator)
                    except StopAsyncIteration:
                        break
                    task = asyncio.create_task(answer(request))
                    del request  # the task holds it until answered
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.wait(set(running))
            finally:
                answers.put_nowait(done)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not done:
                yield item
                item = None  # written: drop it before the slot frees another read
                slots.release()
            await reader  # surfaces a failed read (the client went away)
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()
            running.clear()

    @_unary
    async def TraceSetting(self, request: Any, context: Any) -> Any:
        """Triton's trace extension over gRPC: no settings reads them; a setting with no
        value clears it (``gateway.trace_settings.update_trace_setting``)."""
        model = self.dataplane.check_known(request.model_name) if request.model_name else None
        if request.settings:
            changes: dict[str, object] = {}
            for key, setting in request.settings.items():
                values = list(setting.value)
                changes[key] = None if not values else values if key == "trace_level" else values[0]
            current = trace_settings.update_trace_setting(model, changes)
        else:
            current = trace_settings.trace_setting(model)
        response = pb.TraceSettingResponse()
        for key, value in current.items():
            response.settings[key].value.extend(value if isinstance(value, list) else [value])
        return response

    # -- logging (Triton's extension; admin, as over REST) -----------------------------------

    @_unary
    async def LogSettings(self, request: Any, context: Any) -> Any:
        changes = {}
        for key, value in request.settings.items():
            kind = value.WhichOneof("parameter_choice")
            if kind is not None:
                changes[key] = getattr(value, kind)
        settings = CONTROL.update(changes) if changes else CONTROL.settings()
        response = pb.LogSettingsResponse()
        for key, item in settings.items():
            target = response.settings[key]
            if isinstance(item, bool):
                target.bool_param = item
            elif isinstance(item, int):
                target.uint32_param = item
            else:
                target.string_param = str(item)
        return response

    # -- repository -------------------------------------------------------------------------

    @_unary
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        index = self.dataplane.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=m["name"],
                    version=m.get("version", ""),
                    state=m["state"],
                    reason=m.get("reason", ""),
                )
                for m in index
            ]
        )

    @_unary
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        config: str | None = None
        files: dict[str, bytes] = {}
        for key, param in request.parameters.items():
            kind = param.WhichOneof("parameter_choice")
            if key == "config":
                if kind != "string_param":
                    raise InvalidInput("'config' must be a string parameter (JSON text)")
                config = param.string_param
            elif key.startswith("file:"):
                if kind != "bytes_param":
                    raise InvalidInput(f"'{key[:64]}' must be a bytes parameter")
                files[key] = param.bytes_param
            else:
                raise InvalidInput(f"unknown load parameter '{key[:64]}'")
        await self.dataplane.load(request.model_name, config, files or None)
        return pb.RepositoryModelLoadResponse()

    @_unary
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await self.dataplane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- shared memory (gateway/shared_memory.py; the REST side: server/shared_memory.py) ---

    @_unary
    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        regions = self.dataplane.shared_memory.status(request.name or None)
        response = pb.SystemSharedMemoryStatusResponse()
        for region in regions:
            response.regions[region["name"]].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(**region)
            )
        return response

    @_unary
    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        self.dataplane.shared_memory.register(
            request.name, request.key, request.offset, request.byte_size
        )
        return pb.SystemSharedMemoryRegisterResponse()

    @_unary
    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        self.dataplane.shared_memory.unregister(request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()

    @_unary
    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        if request.name:
            raise UnknownRegion(f"Unable to find cuda shared memory region: '{request.name}'")
        return pb.CudaSharedMemoryStatusResponse()  # nothing is ever registered

    @_unary
    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        raise SharedMemoryError(
            f"failed to register CUDA shared memory region: '{request.name}', CUDA shared "
            "memory is not supported by this gateway (use system shared memory)"
        )

    @_unary
    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        return pb.CudaSharedMemoryUnregisterResponse()


async def traced_answer(pending: Pending) -> Any:
    """``_infer``'s wait and answer for a traced request: its span ends with the status code
    and the answer's size."""
    status, size = "OK", 0
    try:
        result = await pending
        size = sum(array.nbytes for array in result.outputs.values())  # the tensors' bytes
        return encode_raw_response(result)
    except GatewayError as exc:
        status = status_of(exc).name
        raise
    except asyncio.CancelledError:
        status = "CANCELLED"
        raise
    except Exception:
        status = "INTERNAL"
        raise
    finally:
        pending.answered(status, size)


# The ModelStreamInfer call whose requests are being answered, for their trace context.
_STREAM: ContextVar[Any] = ContextVar("grpc_stream", default=None)


class _Capture:
    """Stands in for the server while the generated code registers the service's methods."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same methods come again below, by name

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers.update(handlers)


def method_handlers(servicer: InferenceServicer) -> dict[str, Any]:
    """The generated code's handlers, with ``ModelInfer`` and ``ModelStreamInfer`` reading and
    writing raw tensors without protobuf's copies (``gateway.grpc.wire``)."""
    capture = _Capture()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, capture)
    handlers = capture.handlers
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=parse_infer_request,
        response_serializer=serialize_infer_response,
    )
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        request_deserializer=parse_infer_request,
        response_serializer=serialize_stream_response,
    )
    return handlers


OPEN_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})
ADMIN_METHODS = frozenset(
    {
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
        "LogSettings",
        "TraceSetting",
    }
)


def refusal(
    method: str,
    credentials: Credentials,
    admin_here: bool,
    authorization: bytes | None,
    api_key: bytes | None,
) -> tuple[Any, str] | None:
    """Why a call to ``method`` is refused (a status code and message), or None: the REST
    front end's rules, for either gRPC transport."""
    if method in OPEN_METHODS:
        return None
    admin = method in ADMIN_METHODS
    if admin and not admin_here:
        return grpc.StatusCode.UNIMPLEMENTED, "the repository API is not served here"
    if not credentials.enabled:
        return None
    verdict = credentials.check(token_of(authorization, api_key), admin)
    if verdict is Verdict.ALLOWED:
        return None
    if verdict is Verdict.FORBIDDEN:
        return grpc.StatusCode.PERMISSION_DENIED, verdict.value
    return grpc.StatusCode.UNAUTHENTICATED, verdict.value


class GrpcFrontEnd(Protocol):
    """What the app's start-up and shut-down hooks use of either transport's server."""

    port: int | None

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def grpc_server(dataplane: DataPlane) -> GrpcFrontEnd:
    """The gRPC front end the settings ask for (``grpc_transport``), on ``grpc_port``."""
    settings = dataplane.settings
    server: type[GrpcFrontEnd]
    if settings.grpc_transport == "asyncio":
        from gateway.grpc.calls import Http2GrpcServer  # imports this module

        server = Http2GrpcServer
    else:
        from gateway.grpc.aio import GrpcServer  # imports this module

        server = GrpcServer
    return server(
        dataplane,
        settings.host,
        settings.grpc_port,
        settings.grpc_max_message_bytes,
        grace_s=settings.drain_timeout_s,
    )
