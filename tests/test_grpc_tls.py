"""gRPC over TLS on both transports: real ``gateway serve`` processes, real clients
(``tritonclient.grpc`` with ``ssl=True``, ``grpc.secure_channel``), certificates made here."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from gateway.settings import Settings, SettingsError
from gateway.testing.gateway_process import serve_command, stop_process
from tests.helpers import GatewayProcess, free_port, start_gateway
from tests.models import simple_onnx

SIMPLE_CONFIG = """
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
input { name: "INPUT0" data_type: TYPE_INT32 dims: 16 }
input { name: "INPUT1" data_type: TYPE_INT32 dims: 16 }
output { name: "OUTPUT0" data_type: TYPE_INT32 dims: 16 }
output { name: "OUTPUT1" data_type: TYPE_INT32 dims: 16 }
dynamic_batching { }
"""
TRANSPORTS = ["asyncio", "grpcio"]


# -- certificates ----------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path  # the CA's certificate (clients trust it; the gateway checks client certs with it)
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # signed by another CA
    stranger_key: Path

    def read(self, name: str) -> bytes:
        return Path(getattr(self, name)).read_bytes()


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca_key, other_key = _key(), _key()
    ca = _cert("test ca", ca_key, None, ca=True)
    other = _cert("other ca", other_key, None, ca=True)
    _write(root / "ca", ca, ca_key)
    for name, issuer, server in (
        ("server", (ca, ca_key), True),
        ("client", (ca, ca_key), False),
        ("stranger", (other, other_key), False),
    ):
        key = _key()
        _write(root / name, _cert(name, key, issuer, server=server), key)
    return Pki(
        root / "ca.crt",
        root / "server.crt",
        root / "server.key",
        root / "client.crt",
        root / "client.key",
        root / "stranger.crt",
        root / "stranger.key",
    )


# -- gateways ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    (repo / "simple" / "1").mkdir(parents=True)
    (repo / "simple" / "1" / "model.onnx").write_bytes(simple_onnx())
    (repo / "simple" / "config.pbtxt").write_text(SIMPLE_CONFIG)
    return repo


@dataclass
class TlsGateway:
    process: GatewayProcess
    grpc_port: int
    transport: str

    @property
    def address(self) -> str:
        return f"localhost:{self.grpc_port}"


def _start(repo: Path, tmp: Path, transport: str, pki: Pki, mutual: bool) -> Iterator[TlsGateway]:
    grpc_port = free_port()
    args = ["--grpc-tls-certfile", str(pki.server_cert), "--grpc-tls-keyfile", str(pki.server_key)]
    if mutual:
        args += ["--grpc-tls-client-cafile", str(pki.ca)]
    process = start_gateway(
        repo,
        tmp,
        "--grpc-port",
        str(grpc_port),
        "--grpc-transport",
        transport,
        *args,
        env={"GATEWAY_HEADER_TIMEOUT_S": "2"},
    )
    try:
        yield TlsGateway(process, grpc_port, transport)
    finally:
        process.stop()


@pytest.fixture(scope="module", params=TRANSPORTS)
def tls_gateway(
    request: pytest.FixtureRequest,
    model_repo: Path,
    pki: Pki,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TlsGateway]:
    yield from _start(model_repo, tmp_path_factory.mktemp("tls"), request.param, pki, False)


@pytest.fixture(scope="module", params=TRANSPORTS)
def mtls_gateway(
    request: pytest.FixtureRequest,
    model_repo: Path,
    pki: Pki,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TlsGateway]:
    yield from _start(model_repo, tmp_path_factory.mktemp("mtls"), request.param, pki, True)


def _infer(client: grpcclient.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
              grpcclient.InferInput("INPUT1", [1, 16], "INT32")]  # fmt: skip
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("simple", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def _live(channel: grpc.Channel) -> bool:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    return bool(stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live)


# -- TLS ----------------------------------------------------------------------------------------


def test_tritonclient_over_tls(tls_gateway: TlsGateway, pki: Pki) -> None:
    client = grpcclient.InferenceServerClient(
        tls_gateway.address, ssl=True, root_certificates=str(pki.ca)
    )
    try:
        assert client.is_server_live()
        _infer(client)
        stream_results: list[Any] = []
        client.start_stream(callback=lambda result, error: stream_results.append((result, error)))
        a = np.zeros((1, 16), dtype=np.int32)
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
                  grpcclient.InferInput("INPUT1", [1, 16], "INT32")]  # fmt: skip
        for item in inputs:
            item.set_data_from_numpy(a)
        client.async_stream_infer("simple", inputs, request_id="7")
        client.stop_stream()
        assert [(r.get_response().id, e) for r, e in stream_results] == [("7", None)]
    finally:
        client.close()


def test_secure_channel_checks_the_server(tls_gateway: TlsGateway, pki: Pki) -> None:
    """The client verifies the gateway's certificate: with the right CA it works, with another
    CA the call fails UNAVAILABLE (no plaintext fallback)."""
    good = grpc.ssl_channel_credentials(root_certificates=pki.read("ca"))
    with grpc.secure_channel(tls_gateway.address, good) as channel:
        assert _live(channel)
    wrong = grpc.ssl_channel_credentials(root_certificates=pki.read("stranger_cert"))
    with grpc.secure_channel(tls_gateway.address, wrong) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            _live(channel)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_fails_and_server_keeps_serving(tls_gateway: TlsGateway, pki: Pki) -> None:
    with grpc.insecure_channel(tls_gateway.address) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            _live(channel)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    # raw bytes that are no TLS at all, and a connection that never says anything
    with socket.create_connection(("127.0.0.1", tls_gateway.grpc_port), timeout=10) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0" * 64)
        sock.settimeout(10)
        assert sock.recv(4096) is not None  # an alert or a close, not a hang
    silent = socket.create_connection(("127.0.0.1", tls_gateway.grpc_port), timeout=10)
    try:
        good = grpc.ssl_channel_credentials(root_certificates=pki.read("ca"))
        with grpc.secure_channel(tls_gateway.address, good) as channel:
            assert _live(channel)
    finally:
        silent.close()
    assert tls_gateway.process.process.poll() is None


def test_tls_handshake_is_bounded(tls_gateway: TlsGateway, pki: Pki) -> None:
    """asyncio transport: a client that connects and never starts TLS is closed after
    ``header_timeout_s`` (2 s here), as a slow HTTP/2 preface is."""
    if tls_gateway.transport != "asyncio":
        pytest.skip("grpc.aio's handshake timeout is grpc's own (not a setting here)")
    with socket.create_connection(("127.0.0.1", tls_gateway.grpc_port), timeout=10) as sock:
        start = time.monotonic()
        assert sock.recv(4096) == b""
        assert 1.0 < time.monotonic() - start < 9.0


def _tls_client(pki: Pki, alpn: list[str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


@pytest.mark.parametrize("alpn", [None, ["http/1.1"]])
def test_client_without_alpn_h2_is_refused(
    tls_gateway: TlsGateway, pki: Pki, alpn: list[str] | None
) -> None:
    """Like grpc's own servers: a TLS client that does not agree on h2 gets no HTTP/2 (the
    connection is closed at, or right after, the handshake)."""
    context = _tls_client(pki, alpn)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
    with socket.create_connection(("127.0.0.1", tls_gateway.grpc_port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(preface)
                data = sock.recv(4096)
        except (ssl.SSLError, ConnectionError):
            return  # refused in the handshake (grpc's way)
        assert data == b""  # closed without a SETTINGS frame (ours)


def test_client_offering_h2_gets_http2(tls_gateway: TlsGateway, pki: Pki) -> None:
    """The control for the test above: with ALPN h2 the same bytes get the server's SETTINGS."""
    context = _tls_client(pki, ["h2"])
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
    with socket.create_connection(("127.0.0.1", tls_gateway.grpc_port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            assert sock.selected_alpn_protocol() == "h2"
            sock.sendall(preface)
            data = sock.recv(4096)
    assert len(data) >= 9 and data[3] == 0x4  # a SETTINGS frame


# -- mutual TLS ---------------------------------------------------------------------------------


def test_mutual_tls_needs_a_client_certificate(mtls_gateway: TlsGateway, pki: Pki) -> None:
    ca = pki.read("ca")
    with grpc.secure_channel(
        mtls_gateway.address, grpc.ssl_channel_credentials(root_certificates=ca)
    ) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            _live(channel)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    stranger = grpc.ssl_channel_credentials(ca, pki.read("stranger_key"), pki.read("stranger_cert"))
    with grpc.secure_channel(mtls_gateway.address, stranger) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            _live(channel)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    client = grpcclient.InferenceServerClient(
        mtls_gateway.address,
        ssl=True,
        root_certificates=str(pki.ca),
        private_key=str(pki.client_key),
        certificate_chain=str(pki.client_cert),
    )
    try:
        _infer(client)
    finally:
        client.close()
    assert mtls_gateway.process.process.poll() is None


# -- settings -----------------------------------------------------------------------------------


def test_grpc_tls_settings() -> None:
    assert Settings().grpc_tls is None
    rest = Settings(tls_certfile="r.crt", tls_keyfile="r.key")
    assert rest.grpc_tls == ("r.crt", "r.key")  # HTTPS: gRPC is not left in the clear
    own = Settings(
        tls_certfile="r.crt", tls_keyfile="r.key", grpc_tls_certfile="g.crt", grpc_tls_keyfile="k"
    )
    assert own.grpc_tls == ("g.crt", "k")
    with pytest.raises(SettingsError):
        Settings(grpc_tls_certfile="g.crt")
    with pytest.raises(SettingsError):
        Settings(grpc_tls_client_cafile="ca.crt")  # mutual TLS without TLS


def test_unreadable_tls_file_stops_the_start(model_repo: Path, tmp_path: Path, pki: Pki) -> None:
    for transport in TRANSPORTS:
        with pytest.raises(RuntimeError, match=r"no-such\.key"):
            start_gateway(
                model_repo,
                tmp_path,
                "--grpc-port",
                str(free_port()),
                "--grpc-transport",
                transport,
                env={
                    "GATEWAY_GRPC_TLS_CERTFILE": str(pki.server_cert),
                    "GATEWAY_GRPC_TLS_KEYFILE": str(tmp_path / "no-such.key"),
                },
                ready_s=30,
            )


def test_https_gateway_serves_grpc_over_tls_with_the_same_certificate(
    model_repo: Path, pki: Pki, tmp_path: Path
) -> None:
    """``tls_certfile`` / ``tls_keyfile`` alone: REST over HTTPS, and gRPC over TLS with the same
    pair (not in the clear), on the default transport."""
    http_port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {"GATEWAY_TLS_CERTFILE": str(pki.server_cert),
            "GATEWAY_TLS_KEYFILE": str(pki.server_key)}  # fmt: skip
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            serve_command(model_repo, http_port, "--grpc-port", str(grpc_port)),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        context = ssl.create_default_context(cafile=str(pki.ca))
        url = f"https://localhost:{http_port}/v2/health/ready"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                with urllib.request.urlopen(url, timeout=1, context=context) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        client = grpcclient.InferenceServerClient(
            f"localhost:{grpc_port}", ssl=True, root_certificates=str(pki.ca)
        )
        try:
            _infer(client)
        finally:
            client.close()
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            with pytest.raises(grpc.RpcError):
                _live(channel)
    finally:
        assert stop_process(process, timeout_s=15, kill_wait_s=5) is not None
