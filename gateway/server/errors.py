"""The one table from gateway errors to HTTP status codes (Triton-compatible): every route,
inference and admin alike, raises typed errors and answers through it."""

from __future__ import annotations

import math

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import (
    ClientTimeout,
    DeadlineExceeded,
    GatewayError,
    HostConflict,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    Unavailable,
    UnknownHost,
    UnsupportedEncoding,
)
from gateway.settings import SettingsError

# Most specific first.
STATUS: list[tuple[type[GatewayError], int]] = [
    (PayloadTooLarge, 413),
    (UnsupportedEncoding, 415),
    (ClientTimeout, 408),
    (InvalidInput, 400),
    (ModelNotFound, 404),
    (ModelLoadError, 400),
    (SettingsError, 400),  # an invalid host table given to the admin API
    (UnknownHost, 404),
    (HostConflict, 409),
    (Overloaded, 429),
    (Unavailable, 503),
    (DeadlineExceeded, 504),
]


def status_of(exc: GatewayError) -> int:
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def error_response(status: int, message: str, retry_after_s: float | None = None) -> Response:
    headers = {}
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return Response(
        orjson.dumps({"error": message}),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def gateway_error_response(exc: GatewayError) -> Response:
    retry = exc.retry_after_s if isinstance(exc, Unavailable) else None
    return error_response(status_of(exc), exc.message, retry)


async def handle_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return gateway_error_response(exc)
