"""Starlette app factory: endpoints only translate HTTP <-> :class:`gateway.dataplane.DataPlane`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import context
from gateway.dataplane import DataPlane
from gateway.errors import ClientTimeout, GatewayError, InvalidInput, PayloadTooLarge
from gateway.logs import log_inference
from gateway.metrics import CONTENT_TYPE
from gateway.protocol.codec import decode_infer_request, encode_infer_response
from gateway.routing.hosts import HostConflict, UnknownHost
from gateway.server.auth import ADMIN_PREFIXES, AdminPortMiddleware, AuthMiddleware
from gateway.server.distribution import distribution_routes
from gateway.server.errors import error_response, gateway_error_response, handle_gateway_error
from gateway.server.openapi import OPENAPI
from gateway.settings import SettingsError

HEADER_LENGTH = "inference-header-content-length"
NOT_ROUTED = (
    "hosts can be changed at run time only when the gateway routes across hosts "
    '(start it with at least one [[hosts]] table of kind = "v2")'
)


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


async def read_body(request: Request, limit: int, timeout_s: float = 30.0) -> bytes:
    """The whole body, refusing (before buffering) anything above ``limit`` bytes, and giving up
    on clients that trickle it slower than ``timeout_s`` in total."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidInput("invalid Content-Length header")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            if declared is not None:
                return await request.body()
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise ClientTimeout(f"request body not received within {timeout_s:g} s") from None
    return b"".join(chunks)


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    body = await read_body(request, limit, 30.0)
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    return data


class _DisconnectWatch:
    """Cancels the handler's task if the client goes away, so it does not keep a batch slot.

    One extra task per request waits on ``receive()``, which only returns once the body is read
    when the client disconnects.
    """

    def __init__(self, request: Request) -> None:
        self.gone = False
        self._task = asyncio.current_task()
        self._watcher: asyncio.Task[Any] = asyncio.get_running_loop().create_task(
            self._receive(request)
        )
        self._watcher.add_done_callback(self._on_message)

    @staticmethod
    async def _receive(request: Request) -> Any:
        return await request.receive()

    def _on_message(self, done: asyncio.Task[Any]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        if done.result().get("type") == "http.disconnect" and self._task is not None:
            self.gone = True
            self._task.cancel()

    def close(self) -> None:
        self._watcher.remove_done_callback(self._on_message)
        self._watcher.cancel()

    def absorb(self) -> bool:
        """After a CancelledError: was it ours? If so, swallow it."""
        if self.gone and self._task is not None:
            self._task.uncancel()
            return True
        return False


_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


class InferFastPath:
    """``POST .../infer`` straight to its handler, past starlette's router and exception
    middleware: the hot path. It sits inside the auth and admin-port middleware, so they still
    apply; anything else (and any other path shape) goes through the router as before."""

    def __init__(self, app: ASGIApp, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self.app = app
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                model, version = match.groups()
                scope["path_params"] = (
                    {"model": model} if version is None else {"model": model, "version": version}
                )
                response = await self.handler(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    dataplane: DataPlane,
    on_startup: Sequence[Callable[[], Awaitable[None]]] = (),
    on_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
) -> Starlette:
    """The v2 REST surface over one data plane.

    ``on_startup`` hooks run once the data plane has started, ``on_shutdown`` hooks before it
    stops (other front ends on the same loop, such as gRPC).
    """
    limit = dataplane.settings.max_body_bytes
    access_log = dataplane.settings.access_log
    body_timeout_s = dataplane.settings.body_timeout_s

    async def health_live(request: Request) -> Response:
        return Response(status_code=200 if dataplane.live() else 503)

    async def health_ready(request: Request) -> Response:
        return Response(status_code=200 if dataplane.ready() else 503)

    async def server_metadata(request: Request) -> Response:
        return _json(dataplane.server_metadata())

    def _names(request: Request) -> tuple[str, str | None]:
        params = request.path_params
        return params["model"], params.get("version")

    async def model_metadata(request: Request) -> Response:
        return _json(dataplane.model_metadata(*_names(request)))

    async def model_ready(request: Request) -> Response:
        return Response(status_code=200 if dataplane.model_ready(*_names(request)) else 400)

    async def model_config(request: Request) -> Response:
        return _json(dataplane.model_config(*_names(request)))

    async def model_stats(request: Request) -> Response:
        params = request.path_params
        return _json(dataplane.model_stats(params.get("model"), params.get("version")))

    async def infer(request: Request) -> Response:
        """Request id in, access-log line out; the work is in ``_infer``."""
        started_ns = time.perf_counter_ns()
        name, version = _names(request)
        rid = request.headers.get("x-request-id") or context.new_request_id()
        context.request_id.set(rid)
        try:
            response = await _infer(request, name, version)
        except GatewayError as exc:
            response = gateway_error_response(exc)
        response.headers["X-Request-ID"] = rid
        if access_log:
            log_inference(name, version, response.status_code, started_ns, rid)
        return response

    async def _infer(request: Request, name: str, version: str | None) -> Response:
        dataplane.prepare(name, version)  # 404/503 before reading a large body
        body = await read_body(request, limit, body_timeout_s)
        header = request.headers.get(HEADER_LENGTH)
        header_length: int | None = None
        if header is not None:
            try:
                header_length = int(header)
            except ValueError:
                raise InvalidInput(
                    f"invalid Inference-Header-Content-Length {header[:32]!r}"
                ) from None
        req = decode_infer_request(body, header_length)
        watch = _DisconnectWatch(request)
        try:
            result = await dataplane.infer(name, version, req)
        except asyncio.CancelledError:
            if watch.absorb():
                return Response(status_code=499)  # nobody is listening; nginx's code
            raise
        finally:
            watch.close()
        payload, json_length = encode_infer_response(result, req.outputs, req.binary_output)
        if json_length is None:
            return Response(payload, media_type="application/json")
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(json_length)},
        )

    async def openapi(request: Request) -> Response:
        return _json(OPENAPI)

    async def metrics(request: Request) -> Response:
        return Response(dataplane.metrics.render(), media_type=CONTENT_TYPE)

    async def repository_index(request: Request) -> Response:
        body = await _json_body(request, limit)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput("'ready' must be true or false")
        return _json(dataplane.repository_index(ready_only=ready))

    async def repository_load(request: Request) -> Response:
        name = request.path_params["model"]
        body = await _json_body(request, limit)
        params = body.get("parameters", {})
        if not isinstance(params, dict):
            raise InvalidInput("'parameters' must be an object")
        config = params.get("config")
        if config is not None and not isinstance(config, str):
            raise InvalidInput("'parameters.config' must be a JSON string")
        files: dict[str, bytes] = {}
        for key, value in params.items():
            if key.startswith("file:"):
                if not isinstance(value, str):
                    raise InvalidInput(f"'{key}' must be base64 text")
                try:
                    files[key] = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    raise InvalidInput(f"'{key}' is not valid base64") from None
            elif key != "config":
                raise InvalidInput(f"unknown load parameter '{key[:64]}'")
        await dataplane.load(name, config, files or None)
        return Response(status_code=200)

    async def repository_unload(request: Request) -> Response:
        name = request.path_params["model"]
        await _json_body(request, limit)
        await dataplane.unload(name)
        return Response(status_code=200)

    async def admin_hosts(request: Request) -> Response:
        """The router's host table (state, in-flight, latency estimates, ejection, weights)."""
        table = getattr(dataplane.factory, "table", None)
        return _json(table() if callable(table) else {"hosts": []})

    async def _host_change(call: Callable[[], Awaitable[dict[str, Any]]]) -> Response:
        try:
            return _json(await call())
        except SettingsError as exc:  # an invalid host table
            return error_response(400, exc.message)
        except UnknownHost as exc:
            return error_response(404, str(exc))
        except HostConflict as exc:
            return error_response(409, str(exc))

    def _routed(method: str) -> Callable[..., Awaitable[dict[str, Any]]] | None:
        call = getattr(dataplane.factory, method, None)
        return call if callable(call) else None

    async def admin_hosts_add(request: Request) -> Response:
        """Add a host (a ``[[hosts]]`` table as JSON), or replace the one of that name."""
        add = _routed("add_host")
        if add is None:
            return error_response(409, NOT_ROUTED)
        body = await _json_body(request, limit)
        return await _host_change(lambda: add(body))

    async def admin_hosts_remove(request: Request) -> Response:
        """Remove a host: no new batches at once, those in flight finish, then it closes."""
        remove = _routed("remove_host")
        if remove is None:
            return error_response(409, NOT_ROUTED)
        wait = request.query_params.get("wait", "false").lower()
        if wait not in ("true", "1", "false", "0"):
            raise InvalidInput("'wait' must be true or false")
        name = request.path_params["name"]
        return await _host_change(lambda: remove(name, wait=wait in ("true", "1")))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(exc.status_code, exc.detail or "error")

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}")

    m = "/v2/models/{model}"
    mv = "/v2/models/{model}/versions/{version}"
    routes = [  # the hot path first: starlette tries routes in order
        Route(m + "/infer", infer, methods=["POST"]),
        Route(mv + "/infer", infer, methods=["POST"]),
        Route("/v2/health/live", health_live, methods=["GET"]),
        Route("/v2/health/ready", health_ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v2/models/stats", model_stats, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", repository_unload, methods=["POST"]),
        Route("/admin/hosts", admin_hosts, methods=["GET"]),
        Route("/admin/hosts", admin_hosts_add, methods=["POST"]),
        Route("/admin/hosts/{name:path}", admin_hosts_remove, methods=["DELETE"]),
    ]
    routes += distribution_routes(dataplane)  # edges pull models from here
    for prefix in (m, mv):
        routes += [
            Route(prefix, model_metadata, methods=["GET"]),
            Route(prefix + "/ready", model_ready, methods=["GET"]),
            Route(prefix + "/config", model_config, methods=["GET"]),
            Route(prefix + "/stats", model_stats, methods=["GET"]),
        ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await dataplane.start()
        try:
            for hook in on_startup:
                await hook()
            yield
        finally:
            for hook in on_shutdown:
                await hook()
            await dataplane.stop()

    if not dataplane.settings.admin_api:
        routes = [r for r in routes if not r.path.startswith(ADMIN_PREFIXES)]
    middleware = []
    if dataplane.settings.admin_port and dataplane.settings.admin_api:
        middleware.append(Middleware(AdminPortMiddleware, admin_port=dataplane.settings.admin_port))
    if dataplane.settings.api_keys or dataplane.settings.admin_keys:
        middleware.append(
            Middleware(
                AuthMiddleware,
                api_keys=dataplane.settings.api_keys,
                admin_keys=dataplane.settings.admin_keys,
            )
        )
    middleware.append(Middleware(InferFastPath, handler=infer))  # innermost
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            GatewayError: handle_gateway_error,
            HTTPException: http_error,
            Exception: internal_error,
        },
    )
    app.state.dataplane = dataplane
    return app
