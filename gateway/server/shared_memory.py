"""Triton's shared-memory endpoints over HTTP: ``/v2/systemsharedmemory/...`` on the data plane's
registry (``gateway.shared_memory``), and ``/v2/cudasharedmemory/...``, which the gateway does
not support (no GPU memory is shared with clients): registering there is refused with a clear
error, while status lists nothing and unregister is a no-op, so clients that clean up both kinds
(Triton's examples, perf_analyzer) work unchanged.

Guarded as inference is (an API or admin key when keys are set: ``gateway.server.auth``).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import SharedMemoryError, UnknownRegion
from gateway.server.infer import read_body
from gateway.shared_memory import SharedMemoryRegistry

SYSTEM = "/v2/systemsharedmemory"
CUDA = "/v2/cudasharedmemory"
_BODY_LIMIT = 64 * 1024  # a register request is a small JSON object
_BODY_TIMEOUT_S = 30.0


def _json(data: Any) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")


async def _register_body(request: Request) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    body = await read_body(request.receive, declared, _BODY_LIMIT, _BODY_TIMEOUT_S)
    try:
        data = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise SharedMemoryError(f"register request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SharedMemoryError("register request body must be a JSON object")
    return data


def shared_memory_routes(registry: SharedMemoryRegistry) -> list[Route]:
    """The system and CUDA shared-memory routes, as Triton's HTTP server has them."""

    async def system_status(request: Request) -> Response:
        return _json(registry.status(request.path_params.get("name")))

    async def system_register(request: Request) -> Response:
        name = request.path_params["name"]
        body = await _register_body(request)
        missing = [k for k in ("key", "byte_size") if k not in body]
        if missing:
            raise SharedMemoryError(
                f"failed to register shared memory region '{name}': missing "
                f"{', '.join(repr(k) for k in missing)}"
            )
        registry.register(name, body["key"], body.get("offset", 0), body["byte_size"])
        return Response(status_code=200)

    async def system_unregister(request: Request) -> Response:
        registry.unregister(request.path_params.get("name"))
        return Response(status_code=200)

    async def cuda_status(request: Request) -> Response:
        name = request.path_params.get("name")
        if name:
            raise UnknownRegion(f"Unable to find cuda shared memory region: '{name}'")
        return _json([])

    async def cuda_register(request: Request) -> Response:
        name = request.path_params["name"]
        raise SharedMemoryError(
            f"failed to register CUDA shared memory region: '{name}', CUDA shared memory is not "
            "supported by this gateway (use system shared memory)"
        )

    async def cuda_unregister(request: Request) -> Response:
        return Response(status_code=200)  # nothing is ever registered

    routes = []
    for prefix, status, register, unregister in (
        (SYSTEM, system_status, system_register, system_unregister),
        (CUDA, cuda_status, cuda_register, cuda_unregister),
    ):
        routes += [
            Route(prefix + "/status", status, methods=["GET"]),
            Route(prefix + "/region/{name}/status", status, methods=["GET"]),
            Route(prefix + "/region/{name}/register", register, methods=["POST"]),
            Route(prefix + "/unregister", unregister, methods=["POST"]),
            Route(prefix + "/region/{name}/unregister", unregister, methods=["POST"]),
        ]
    return routes


__all__ = ["shared_memory_routes"]
