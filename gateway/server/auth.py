"""Optional bearer-token / API-key authentication, as pure ASGI middleware.

Health probes and ``/metrics`` stay open for orchestrators and scrapers; the repository and admin
API need an admin key (``gateway.credentials`` decides; this module only maps HTTP onto it).
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.credentials import Credentials, Verdict, token_of
from gateway.server.errors import error_response

OPEN_PREFIXES = ("/v2/health/", "/metrics")
ADMIN_PREFIXES = ("/v2/repository/", "/admin")


def _token(scope: Scope) -> bytes:
    authorization = api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value
        elif name == b"x-api-key":
            api_key = value
    return token_of(authorization, api_key)


class AuthMiddleware:
    """Rejects requests without a valid credential with 401 (none/unknown) or 403 (not admin)."""

    def __init__(
        self, app: ASGIApp, api_keys: Sequence[str], admin_keys: Sequence[str]
    ) -> None:
        self.app = app
        self.credentials = Credentials(api_keys, admin_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        verdict = self.credentials.check(_token(scope), scope["path"].startswith(ADMIN_PREFIXES))
        if verdict is Verdict.ALLOWED:
            await self.app(scope, receive, send)
            return
        if verdict is Verdict.FORBIDDEN:
            response = error_response(403, verdict.value)
        else:
            response = error_response(401, verdict.value)
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

