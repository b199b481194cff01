"""Optional bearer-token / API-key authentication and the admin-port split, as guards.

A guard looks at a request's scope and returns the response refusing it, or None to let it
through. ``GuardMiddleware`` applies one to starlette's routes; the inference hot path
(``gateway.server.infer``) asks the same guards itself.

Health probes and ``/metrics`` stay open for orchestrators and scrapers; the repository and admin
API need an admin key (``gateway.credentials`` decides; this module only maps HTTP onto it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.credentials import Credentials, Verdict, token_of
from gateway.server.errors import error_response

OPEN_PREFIXES = ("/v2/health/", "/metrics")
ADMIN_PREFIXES = ("/v2/repository/", "/admin", "/v2/logging")
# Triton's trace extension, global and per model: it changes what the whole server traces.
ADMIN_SUFFIXES = ("/trace/setting",)


def is_admin(path: str) -> bool:
    """Whether ``path`` belongs to the repository / admin API (admin key, admin port)."""
    return path.startswith(ADMIN_PREFIXES) or path.endswith(ADMIN_SUFFIXES)


Guard = Callable[[Scope], Response | None]


def _token(scope: Scope) -> bytes:
    authorization = api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value
        elif name == b"x-api-key":
            api_key = value
    return token_of(authorization, api_key)


class AuthGuard:
    """Refuses requests without a valid credential: 401 (none or unknown), 403 (not admin)."""

    def __init__(self, api_keys: Sequence[str], admin_keys: Sequence[str]) -> None:
        self.credentials = Credentials(api_keys, admin_keys)

    def __call__(self, scope: Scope) -> Response | None:
        path: str = scope["path"]
        if path.startswith(OPEN_PREFIXES):
            return None
        verdict = self.credentials.check(_token(scope), is_admin(path))
        if verdict is Verdict.ALLOWED:
            return None
        if verdict is Verdict.FORBIDDEN:
            return error_response(403, verdict.value)
        response = error_response(401, verdict.value)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response


class AdminPortGuard:
    """With ``admin_port`` set, the admin API answers only on that listener (and nothing else
    but health there): one server, two sockets, told apart by the local port of the connection."""

    def __init__(self, admin_port: int) -> None:
        self.admin_port = admin_port

    def __call__(self, scope: Scope) -> Response | None:
        server = scope.get("server") or ("", 0)
        on_admin_port = server[1] == self.admin_port
        path: str = scope["path"]
        admin = is_admin(path)
        if admin != on_admin_port and not (on_admin_port and path.startswith(OPEN_PREFIXES)):
            where = "the admin port" if admin else "the main port"
            return error_response(404, f"{path[:200]} is served on {where} only")
        return None


class GuardMiddleware:
    """ASGI middleware applying one guard to every HTTP request."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.guard(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)
