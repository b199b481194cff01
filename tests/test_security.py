"""Authentication, admin lock-down and slow clients, against the real gateway."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import models
from tests.helpers import GatewayProcess, raw, start_gateway

BODY = json.dumps(
    {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [0] * 16},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [0] * 16},
        ]
    }
).encode()


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("locked")
    models.add_sub(tmp / "repo", "simple")
    gw = start_gateway(
        tmp / "repo",
        tmp,
        env={
            "GATEWAY_API_KEYS": "user-key-1,user-key-2",
            "GATEWAY_ADMIN_KEYS": "admin-key",
            "GATEWAY_BODY_TIMEOUT_S": "1",
        },
    )
    try:
        yield gw
    finally:
        gw.stop()


def test_inference_needs_a_key(locked: GatewayProcess) -> None:
    infer = "/v2/models/simple/infer"
    status, headers, body = raw(locked, "POST", infer, BODY)
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert "credential" in json.loads(body)["error"]
    assert raw(locked, "POST", infer, BODY, {"Authorization": "Bearer wrong"})[0] == 401
    assert raw(locked, "POST", infer, BODY, {"Authorization": "Bearer user-key-2"})[0] == 200
    assert raw(locked, "POST", infer, BODY, {"X-API-Key": "user-key-1"})[0] == 200
    assert raw(locked, "POST", infer, BODY, {"Authorization": "Bearer admin-key"})[0] == 200
    assert raw(locked, "GET", "/v2/health/ready")[0] == 200  # probes stay open
    assert raw(locked, "GET", "/metrics")[0] == 200


def test_repository_needs_the_admin_key(locked: GatewayProcess) -> None:
    unload = "/v2/repository/models/simple/unload"
    assert raw(locked, "POST", unload, b"{}", {"Authorization": "Bearer user-key-1"})[0] == 403
    assert raw(locked, "POST", unload, b"{}")[0] == 401
    index = raw(locked, "POST", "/v2/repository/index", b"{}", {"X-API-Key": "admin-key"})
    assert index[0] == 200
    assert "user-key" not in locked.log() and "admin-key" not in locked.log()


def test_trickling_body_times_out(locked: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", locked.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nX-API-Key: user-key-1\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        started = time.monotonic()
        reply = sock.recv(4096)
    assert b" 408 " in reply.split(b"\r\n")[0]
    assert time.monotonic() - started < 5
    ok = raw(locked, "POST", "/v2/models/simple/infer", BODY, {"X-API-Key": "user-key-1"})
    assert ok[0] == 200


def test_trickling_body_times_out_on_plain_uvicorn(tmp_path: Path) -> None:
    """Without the gateway's connection protocol (uvicorn's own, as with h11) the hot path keeps
    the body deadline itself: the same 408, and the gateway keeps serving."""
    from gateway.settings import Settings
    from tests.helpers import InProcessGateway, free_port

    models.add_sub(tmp_path / "repo", "simple")
    port = free_port()
    settings = Settings(
        model_repo=str(tmp_path / "repo"), port=port, body_timeout_s=1.0, access_log=False
    )
    gw = InProcessGateway(settings).start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
            )
            started = time.monotonic()
            reply = sock.recv(4096)
        assert b" 408 " in reply.split(b"\r\n")[0]
        assert time.monotonic() - started < 5
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                % (len(BODY), BODY)
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        gw.stop()


def test_admin_api_can_be_turned_off(tmp_path: Path) -> None:
    models.add_sub(tmp_path / "repo", "simple")
    gw = start_gateway(tmp_path / "repo", tmp_path, env={"GATEWAY_ADMIN_API": "false"})
    try:
        assert raw(gw, "POST", "/v2/repository/models/simple/unload", b"{}")[0] == 404
        assert raw(gw, "POST", "/v2/models/simple/infer", BODY)[0] == 200
    finally:
        gw.stop()


def test_admin_api_on_its_own_port(tmp_path: Path) -> None:
    from tests.helpers import free_port

    models.add_sub(tmp_path / "repo", "simple")
    admin_port = free_port()
    gw = start_gateway(tmp_path / "repo", tmp_path, "--admin-port", str(admin_port))
    admin = GatewayProcess(gw.process, admin_port, gw.log_path)  # same process, other socket
    try:
        status, _, body = raw(gw, "POST", "/v2/repository/index", b"{}")
        assert status == 404 and b"admin port" in body
        assert raw(gw, "GET", "/admin/hosts")[0] == 404
        status, _, body = raw(admin, "POST", "/v2/repository/index", b"{}")
        assert status == 200 and json.loads(body)[0]["name"] == "simple"
        status, _, body = raw(admin, "POST", "/v2/models/simple/infer", BODY)
        assert status == 404 and b"main port" in body
        assert raw(admin, "GET", "/v2/health/ready")[0] == 200
        assert raw(gw, "POST", "/v2/models/simple/infer", BODY)[0] == 200
        assert raw(admin, "POST", "/v2/repository/models/simple/unload", b"{}")[0] == 200
        assert raw(gw, "POST", "/v2/models/simple/infer", BODY)[0] == 503  # unloaded there
    finally:
        gw.stop()


def test_grpc_needs_the_same_keys(tmp_path: Path) -> None:
    import grpc
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from tests.helpers import free_port

    models.add_sub(tmp_path / "repo", "simple")
    grpc_port = free_port()
    gw = start_gateway(
        tmp_path / "repo",
        tmp_path,
        "--grpc-port",
        str(grpc_port),
        env={"GATEWAY_API_KEYS": "user-key", "GATEWAY_ADMIN_KEYS": "admin-key"},
    )
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = grpcclient.InferInput(name, [1, 16], "INT32")
        tensor.set_data_from_numpy(np.ones((1, 16), np.int32))
        inputs.append(tensor)

    def status(call: Any) -> str:
        try:
            call()
        except InferenceServerException as exc:
            return str(exc.status())
        return "OK"

    user = {"authorization": "Bearer user-key"}
    admin = {"x-api-key": "admin-key"}
    try:
        assert client.is_server_live() and client.is_model_ready("simple")  # open, as HTTP health
        assert status(lambda: client.infer("simple", inputs)) == str(
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert status(lambda: client.infer("simple", inputs, headers={"x-api-key": "nope"})) == (
            str(grpc.StatusCode.UNAUTHENTICATED)
        )
        assert status(lambda: client.infer("simple", inputs, headers=user)) == "OK"
        assert status(lambda: client.get_model_repository_index(headers=user)) == str(
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert status(lambda: client.get_model_repository_index(headers=admin)) == "OK"
        assert status(lambda: client.infer("simple", inputs, headers=admin)) == "OK"
    finally:
        client.close()
        gw.stop()


def test_slow_or_silent_clients_get_408_on_headers(tmp_path: Path) -> None:
    """Slowloris: a connection that sends nothing, or trickles its headers, is closed with a
    408 once ``header_timeout_s`` has passed; others are served meanwhile."""
    models.add_sub(tmp_path / "repo", "simple")
    gw = start_gateway(tmp_path / "repo", tmp_path, env={"GATEWAY_HEADER_TIMEOUT_S": "1"})
    silent = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    trickle = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    try:
        started = time.monotonic()
        trickle.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\n")
        closed_at: float | None = None
        answer = b""
        for i in range(40):  # one header byte every 0.1 s: never complete within 1 s
            try:
                trickle.sendall(b"X-Slow-%d: 1\r\n" % i)
            except OSError:
                break
            if i == 3:  # the gateway serves others meanwhile
                assert raw(gw, "POST", "/v2/models/simple/infer", BODY)[0] == 200
            time.sleep(0.1)
            trickle.settimeout(0.01)
            try:
                chunk = trickle.recv(4096)
            except TimeoutError:
                continue
            answer += chunk
            if not chunk or b"408" in answer:
                closed_at = time.monotonic() - started
                break
        assert closed_at is not None and closed_at < 3.0, (closed_at, answer)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        silent.settimeout(3.0)
        assert silent.recv(4096).startswith(b"HTTP/1.1 408")  # never sent a byte
        assert raw(gw, "POST", "/v2/models/simple/infer", BODY)[0] == 200
    finally:
        silent.close()
        trickle.close()
        gw.stop()
