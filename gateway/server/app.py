"""The HTTP app: endpoints only translate HTTP <-> :class:`gateway.dataplane.DataPlane`.

Inference goes through :class:`gateway.server.infer.HotPath`; every other route is starlette's.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.dataplane import DataPlane
from gateway.errors import GatewayError, HostConflict, InvalidInput, ModelNotFound
from gateway.logs import ACCESS, CONTROL
from gateway.metrics import CONTENT_TYPE
from gateway.server.auth import AdminPortGuard, AuthGuard, Guard, GuardMiddleware, is_admin
from gateway.server.distribution import distribution_routes
from gateway.server.errors import error_response, handle_gateway_error
from gateway.server.infer import HotPath, read_body
from gateway.server.openapi import OPENAPI
from gateway.server.shared_memory import shared_memory_routes
from gateway.server.trace_setting import trace_routes

NOT_ROUTED = (
    "hosts can be changed at run time only when the gateway routes across hosts "
    '(start it with at least one [[hosts]] table: kind = "v2" or kind = "triton")'
)

# GET /admin/hosts pages: a thousand hosts' rows are some 450 KB of JSON.
ADMIN_HOSTS_PAGE = 100
ADMIN_HOSTS_MAX_PAGE = 1000


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    body = await read_body(request.receive, request.headers.get("content-length"), limit, 30.0)
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    return data


class HostAdmin(Protocol):
    """The router's admin surface (``gateway.backends.placement.RoutedFactory``), for
    ``/admin/hosts``. Errors are typed (``SettingsError``, ``UnknownHost``, ``HostConflict``)
    and answer through the one status table."""

    def table(self, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        """Hosts ``offset`` to ``offset + limit``: state, in-flight, estimates, ejection."""

    async def add_host(self, table: object) -> dict[str, Any]:
        """Add a host from a ``[[hosts]]`` table, or replace the one of that name."""

    async def remove_host(self, name: str, *, wait: bool = False) -> dict[str, Any]:
        """Take a host (or DNS group) out; with ``wait``, until its batches finished."""


def create_app(
    dataplane: DataPlane,
    on_startup: Sequence[Callable[[], Awaitable[None]]] = (),
    on_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
    hosts: HostAdmin | None = None,
) -> HotPath:
    """The v2 REST surface over one data plane.

    ``on_startup`` hooks run once the data plane has started, ``on_shutdown`` hooks before it
    stops (other front ends on the same loop, such as gRPC). ``hosts`` is the router, for the
    admin API (a gateway with ``[[hosts]]`` has one).
    """
    settings = dataplane.settings
    limit = settings.max_body_bytes

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

    def _page_param(request: Request, name: str, default: int, high: int) -> int:
        text = request.query_params.get(name)
        if text is None:
            return default
        if not text.isdigit() or not 0 <= int(text) <= high:
            raise InvalidInput(f"'{name}' must be an integer in 0..{high}")
        return int(text)

    async def logging_get(request: Request) -> Response:
        """Triton's logging extension: the log settings in force."""
        return _json(CONTROL.settings())

    async def logging_post(request: Request) -> Response:
        """Triton's logging extension: change log settings now; answers the new ones."""
        return _json(CONTROL.update(await _json_body(request, limit)))

    async def admin_hosts(request: Request) -> Response:
        """The router's host table (state, in-flight, latency estimates, ejection, weights),
        a page at a time: ``?offset=&limit=`` (``ADMIN_HOSTS_PAGE`` hosts by default)."""
        offset = _page_param(request, "offset", 0, 10_000_000)
        limit = _page_param(request, "limit", ADMIN_HOSTS_PAGE, ADMIN_HOSTS_MAX_PAGE)
        return _json(hosts.table(offset, limit) if hosts is not None else {"hosts": []})

    def _router() -> HostAdmin:
        if hosts is None:
            raise HostConflict(NOT_ROUTED)
        return hosts

    async def admin_hosts_add(request: Request) -> Response:
        """Add a host (a ``[[hosts]]`` table as JSON), or replace the one of that name."""
        router = _router()
        body = await _json_body(request, limit)
        return _json(await router.add_host(body))

    async def admin_hosts_remove(request: Request) -> Response:
        """Remove a host: no new batches at once, those in flight finish, then it closes."""
        router = _router()
        wait = request.query_params.get("wait", "false").lower()
        if wait not in ("true", "1", "false", "0"):
            raise InvalidInput("'wait' must be true or false")
        name = request.path_params["name"]
        return _json(await router.remove_host(name, wait=wait in ("true", "1")))

    async def admin_splits(request: Request) -> Response:
        """Every model's traffic split between versions."""
        return _json(dataplane.splits.table())

    async def admin_splits_set(request: Request) -> Response:
        """Set a model's split (weights, sticky_header, shadow); requests from now on follow
        it. A rollback is this with all the weight on the old version."""
        body = await _json_body(request, limit)
        return _json(dataplane.splits.set(request.path_params["model"], body))

    async def admin_splits_remove(request: Request) -> Response:
        """Drop a model's split: requests without a version get the newest again."""
        if not dataplane.splits.remove(request.path_params["model"]):
            raise ModelNotFound(f"model '{request.path_params['model']}' has no traffic split")
        return _json({})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(exc.status_code, exc.detail or "error")

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}")

    m = "/v2/models/{model}"
    mv = "/v2/models/{model}/versions/{version}"
    routes = [  # inference requests never get here: HotPath answers them
        Route("/v2/health/live", health_live, methods=["GET"]),
        Route("/v2/health/ready", health_ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v2/models/stats", model_stats, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", repository_unload, methods=["POST"]),
        Route("/v2/logging", logging_get, methods=["GET"]),
        Route("/v2/logging", logging_post, methods=["POST"]),
        Route("/admin/hosts", admin_hosts, methods=["GET"]),
        Route("/admin/hosts", admin_hosts_add, methods=["POST"]),
        Route("/admin/hosts/{name:path}", admin_hosts_remove, methods=["DELETE"]),
        Route("/admin/splits", admin_splits, methods=["GET"]),
        Route("/admin/splits/{model}", admin_splits_set, methods=["PUT"]),
        Route("/admin/splits/{model}", admin_splits_remove, methods=["DELETE"]),
    ]
    routes += distribution_routes(dataplane)  # edges pull models from here
    routes += trace_routes(dataplane)  # Triton's trace extension
    routes += shared_memory_routes(dataplane.shared_memory)  # Triton's extension
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
            ACCESS.flush()

    if not settings.admin_api:
        routes = [r for r in routes if not is_admin(r.path)]
    guards: list[Guard] = []
    if settings.admin_port and settings.admin_api:
        guards.append(AdminPortGuard(settings.admin_port))
    if settings.api_keys or settings.admin_keys:
        guards.append(AuthGuard(settings.api_keys, settings.admin_keys))
    app = Starlette(
        routes=routes,
        middleware=[Middleware(GuardMiddleware, guard=guard) for guard in guards],
        lifespan=lifespan,
        exception_handlers={
            GatewayError: handle_gateway_error,
            HTTPException: http_error,
            Exception: internal_error,
        },
    )
    return HotPath(app, dataplane, guards)
