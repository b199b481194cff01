"""Optional bearer-token / API-key authentication, as pure ASGI middleware.

Two credentials: inference keys (inference, metadata, statistics) and admin keys (repository
load/unload/index and the admin API). An admin key also passes where an inference key is asked
for. Health probes and ``/metrics`` stay open for orchestrators and scrapers. Keys are compared
in constant time against every configured key, and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.server.errors import error_response

OPEN_PREFIXES = ("/v2/health/", "/metrics")
ADMIN_PREFIXES = ("/v2/repository/", "/admin")


def _matches(token: bytes, keys: Sequence[bytes]) -> bool:
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found


def _token(scope: Scope) -> bytes:
    name: bytes
    value: bytes
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, rest = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return rest.strip()
        elif name == b"x-api-key":
            return value.strip()
    return b""


class AuthMiddleware:
    """Rejects requests without a valid credential with 401 (none/unknown) or 403 (not admin)."""

    def __init__(
        self, app: ASGIApp, api_keys: Sequence[str], admin_keys: Sequence[str]
    ) -> None:
        self.app = app
        self.admin = [k.encode() for k in admin_keys]
        self.inference = [k.encode() for k in api_keys] + self.admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        admin_path = scope["path"].startswith(ADMIN_PREFIXES)
        required = self.admin if admin_path else self.inference
        if not required:  # no keys of that kind configured: open
            await self.app(scope, receive, send)
            return
        token = _token(scope)
        if _matches(token, required):
            await self.app(scope, receive, send)
            return
        if admin_path and token and _matches(token, self.inference):
            response = error_response(403, "this endpoint needs the admin credential")
        else:
            response = error_response(401, "missing or invalid credential")
            response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


class AdminPortMiddleware:
    """With ``admin_port`` set, the admin API answers only on that listener (and nothing else
    but health there): one server, two sockets, told apart by the local port of the connection."""

    def __init__(self, app: ASGIApp, admin_port: int) -> None:
        self.app = app
        self.admin_port = admin_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            server = scope.get("server") or ("", 0)
            on_admin_port = server[1] == self.admin_port
            path: str = scope["path"]
            admin = path.startswith(ADMIN_PREFIXES)
            if admin != on_admin_port and not (on_admin_port and path.startswith(OPEN_PREFIXES)):
                where = "the admin port" if admin else "the main port"
                response = error_response(404, f"{path[:200]} is served on {where} only")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

