"""TLS for the gRPC front end, on either transport, from the settings.

Triton's ``--grpc-use-ssl`` / ``--grpc-server-cert`` / ``--grpc-server-key`` /
``--grpc-root-cert`` / ``--grpc-use-ssl-mutual`` become: a certificate and key
(``Settings.grpc_tls``: gRPC's own pair, else the REST listener's) turn TLS on, and
``grpc_tls_client_cafile`` makes it mutual (a client without a certificate that CA signed fails
the handshake). The ``asyncio`` transport gets an :class:`ssl.SSLContext` that offers only the
ALPN protocol ``h2`` (:mod:`gateway.grpc.http2` closes a connection that did not agree on it, as
grpc's servers do); ``grpc.aio`` gets ``grpc.ssl_server_credentials``. Files are read once, at
start: a file that cannot be read stops the start with its name.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]  # no stubs in the venv

from gateway.settings import Settings

ALPN_H2 = "h2"


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read the gRPC TLS {what} {path}: {exc.strerror}") from None


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The ``asyncio`` transport's TLS, or None when gRPC is served in the clear."""
    files = settings.grpc_tls
    if files is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # HTTP/2 over TLS (RFC 9113 9.2)
    try:
        context.load_cert_chain(*files)
        if settings.grpc_tls_client_cafile:
            context.load_verify_locations(settings.grpc_tls_client_cafile)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        named = [*files, settings.grpc_tls_client_cafile]
        raise OSError(f"gRPC TLS files {', '.join(filter(None, named))}: {exc}") from None
    context.set_alpn_protocols([ALPN_H2])
    return context


def server_credentials(settings: Settings) -> Any:
    """The ``grpc.aio`` transport's TLS (``grpc.ServerCredentials``), or None."""
    files = settings.grpc_tls
    if files is None:
        return None
    cert, key = _read(files[0], "certificate"), _read(files[1], "key")
    ca = settings.grpc_tls_client_cafile
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=_read(ca, "client CA") if ca else None,
        require_client_auth=bool(ca),
    )
