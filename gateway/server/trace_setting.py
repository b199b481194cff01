"""Triton's trace extension over HTTP: ``GET/POST /v2/trace/setting`` and
``/v2/models/{m}/trace/setting`` read and change sampling at run time (``gateway.trace_settings``
owns the settings; ``gateway.tracing``'s sampler maps them onto OpenTelemetry)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import trace_settings
from gateway.dataplane import DataPlane
from gateway.errors import InvalidInput
from gateway.server.infer import read_body

MAX_SETTING_BYTES = 64 * 1024


def _json(data: Any) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")


def trace_routes(dataplane: DataPlane) -> list[Route]:
    """The four routes (GET and POST, global and per model)."""

    def model_of(request: Request) -> str | None:
        name = request.path_params.get("model")
        return None if name is None else dataplane.check_known(name)

    async def get_setting(request: Request) -> Response:
        return _json(trace_settings.trace_setting(model_of(request)))

    async def post_setting(request: Request) -> Response:
        model = model_of(request)
        length = request.headers.get("content-length")
        body = await read_body(request.receive, length, MAX_SETTING_BYTES, 30.0)
        try:
            data = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidInput("request body must be a JSON object of trace settings")
        return _json(trace_settings.update_trace_setting(model, data))

    routes = []
    for path in ("/v2/trace/setting", "/v2/models/{model}/trace/setting"):
        routes += [
            Route(path, get_setting, methods=["GET"]),
            Route(path, post_setting, methods=["POST"]),
        ]
    return routes
