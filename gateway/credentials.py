"""API keys and admin keys, checked the same way by every front end (REST and gRPC).

Inference keys open inference, metadata, statistics and system shared memory (registering a
region is as much the client's business as the requests that use it); admin keys open the
repository and admin API, and also pass wherever an inference key is asked for. Keys are
compared in constant time against every configured key (no early exit that would time which one
matched), and are never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from enum import Enum


class Verdict(Enum):
    ALLOWED = "allowed"
    UNAUTHENTICATED = "missing or invalid credential"  # HTTP 401, gRPC UNAUTHENTICATED
    FORBIDDEN = "this endpoint needs the admin credential"  # HTTP 403, gRPC PERMISSION_DENIED


def _matches(token: bytes, keys: Sequence[bytes]) -> bool:
    if not token:  # no credential never matches, even a key configured as ""
        return False
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found


class Credentials:
    """The configured keys.

    No key at all: everything is open (a gateway on a trusted network). Any key configured:
    inference needs an API or admin key, and the repository and admin API need an admin key;
    with API keys but no admin keys the admin API is closed to every caller (safe by default:
    a key handed to inference clients never opens load and unload).
    """

    def __init__(self, api_keys: Sequence[str], admin_keys: Sequence[str]) -> None:
        self.admin = [k.encode() for k in admin_keys]
        self.inference = [k.encode() for k in api_keys] + self.admin

    @property
    def enabled(self) -> bool:
        return bool(self.inference)

    def check(self, token: bytes, admin: bool) -> Verdict:
        """May a caller presenting ``token`` use an endpoint (an admin one when ``admin``)?"""
        if not self.enabled:
            return Verdict.ALLOWED
        if _matches(token, self.admin if admin else self.inference):
            return Verdict.ALLOWED
        if admin and _matches(token, self.inference):
            return Verdict.FORBIDDEN
        return Verdict.UNAUTHENTICATED


def token_of(authorization: bytes | None, api_key: bytes | None) -> bytes:
    """The credential from ``Authorization: Bearer <k>`` or ``X-API-Key: <k>``."""
    if authorization:
        scheme, _, rest = authorization.partition(b" ")
        if scheme.lower() == b"bearer":
            return rest.strip()
    return (api_key or b"").strip()
