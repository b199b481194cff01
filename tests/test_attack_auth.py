"""Attack suite: the credential matrix (no key / API key / admin key) over every door.

Doors: inference, the repository API and the admin API over HTTP (main port and admin port) and
over gRPC. The rule under test (README, Security): no key configured leaves everything open; any
key configured closes every endpoint but health and metrics to callers without one, and the
repository and admin API open only to an admin key, so with API keys but no admin keys they are
closed to everyone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from gateway.credentials import Credentials, Verdict
from tests import models
from tests.helpers import GatewayProcess, free_port, raw, start_gateway

BODY = json.dumps(
    {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [0] * 16},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [0] * 16},
        ]
    }
).encode()
NO_KEY: dict[str, str] = {}
USER = {"Authorization": "Bearer user-key"}
ADMIN = {"X-API-Key": "admin-key"}


def test_credentials_matrix() -> None:
    both = Credentials(["user-key"], ["admin-key"])
    only_api = Credentials(["user-key"], [])
    only_admin = Credentials([], ["admin-key"])
    none = Credentials([], [])
    cases = [
        # credentials, token, admin endpoint, verdict
        (none, b"", False, Verdict.ALLOWED),
        (none, b"", True, Verdict.ALLOWED),
        (both, b"", False, Verdict.UNAUTHENTICATED),
        (both, b"wrong", False, Verdict.UNAUTHENTICATED),
        (both, b"user-key", False, Verdict.ALLOWED),
        (both, b"admin-key", False, Verdict.ALLOWED),
        (both, b"", True, Verdict.UNAUTHENTICATED),
        (both, b"user-key", True, Verdict.FORBIDDEN),
        (both, b"admin-key", True, Verdict.ALLOWED),
        (only_api, b"", False, Verdict.UNAUTHENTICATED),
        (only_api, b"user-key", False, Verdict.ALLOWED),
        (only_api, b"", True, Verdict.UNAUTHENTICATED),  # was ALLOWED: the hole
        (only_api, b"user-key", True, Verdict.FORBIDDEN),
        (only_admin, b"", False, Verdict.UNAUTHENTICATED),
        (only_admin, b"admin-key", False, Verdict.ALLOWED),
        (only_admin, b"admin-key", True, Verdict.ALLOWED),
        (Credentials([""], []), b"", False, Verdict.UNAUTHENTICATED),  # "" never matches
    ]
    for credentials, token, admin, verdict in cases:
        assert credentials.check(token, admin) is verdict, (credentials.inference, token, admin)


def _grpc_status(call: Callable[[], Any]) -> str:
    try:
        call()
    except InferenceServerException as exc:
        return str(exc.status())
    return "OK"


def _grpc_inputs() -> list[Any]:
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = grpcclient.InferInput(name, [1, 16], "INT32")
        tensor.set_data_from_numpy(np.ones((1, 16), np.int32))
        inputs.append(tensor)
    return inputs


@pytest.fixture(scope="module")
def only_api_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, int]]:
    """The configuration that left the admin API open: API keys and no admin keys."""
    tmp = tmp_path_factory.mktemp("only-api")
    models.add_sub(tmp / "repo", "simple")
    grpc_port = free_port()
    gw = start_gateway(
        tmp / "repo", tmp, "--grpc-port", str(grpc_port), env={"GATEWAY_API_KEYS": "user-key"}
    )
    try:
        yield gw, grpc_port
    finally:
        gw.stop()


@pytest.mark.parametrize("headers", [NO_KEY, USER, ADMIN], ids=["no-key", "api-key", "wrong"])
def test_api_keys_alone_never_open_the_admin_api(
    only_api_keys: tuple[GatewayProcess, int], headers: dict[str, str]
) -> None:
    gw, _ = only_api_keys
    expected = 403 if headers is USER else 401
    for path in (
        "/v2/repository/index",
        "/v2/repository/models/simple/unload",
        "/v2/repository/models/simple/load",
    ):
        status, _, body = raw(gw, "POST", path, b"{}", headers)
        assert status == expected, (path, status, body)
        assert "error" in json.loads(body)
    assert raw(gw, "GET", "/admin/hosts", None, headers)[0] == expected
    assert raw(gw, "POST", "/v2/models/simple/infer", BODY, USER)[0] == 200  # still loaded


def test_api_keys_alone_never_open_the_admin_api_over_grpc(
    only_api_keys: tuple[GatewayProcess, int],
) -> None:
    gw, grpc_port = only_api_keys
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    user = {"authorization": "Bearer user-key"}
    unauthenticated = str(grpc.StatusCode.UNAUTHENTICATED)
    denied = str(grpc.StatusCode.PERMISSION_DENIED)
    try:
        assert _grpc_status(lambda: client.unload_model("simple")) == unauthenticated
        assert _grpc_status(lambda: client.unload_model("simple", headers=user)) == denied
        assert _grpc_status(lambda: client.load_model("simple", headers=user)) == denied
        assert _grpc_status(lambda: client.get_model_repository_index()) == unauthenticated
        assert _grpc_status(lambda: client.get_model_repository_index(headers=user)) == denied
        assert _grpc_status(lambda: client.infer("simple", _grpc_inputs(), headers=user)) == "OK"
    finally:
        client.close()
    assert raw(gw, "GET", "/v2/models/simple/ready", None, USER)[0] == 200


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, ...]]:
    """Both kinds of key, the admin API on its own port, and gRPC."""
    tmp = tmp_path_factory.mktemp("split")
    models.add_sub(tmp / "repo", "simple")
    admin_port, grpc_port = free_port(), free_port()
    gw = start_gateway(
        tmp / "repo",
        tmp,
        "--admin-port",
        str(admin_port),
        "--grpc-port",
        str(grpc_port),
        env={"GATEWAY_API_KEYS": "user-key", "GATEWAY_ADMIN_KEYS": "admin-key"},
    )
    try:
        yield (
            gw,
            GatewayProcess(gw.process, admin_port, gw.log_path),
            GatewayProcess(gw.process, grpc_port, gw.log_path),
        )
    finally:
        gw.stop()


@pytest.mark.parametrize(
    ("headers", "inference", "admin"),
    [(NO_KEY, 401, 401), (USER, 200, 403), (ADMIN, 200, 200)],
    ids=["no-key", "api-key", "admin-key"],
)
def test_matrix_over_http_ports(
    split: tuple[GatewayProcess, ...], headers: dict[str, str], inference: int, admin: int
) -> None:
    main, admin_door, _ = split
    assert raw(main, "POST", "/v2/models/simple/infer", BODY, headers)[0] == inference
    assert raw(main, "GET", "/v2/models/simple", None, headers)[0] == inference
    assert raw(admin_door, "POST", "/v2/repository/index", b"{}", headers)[0] == admin
    admin_hosts = raw(admin_door, "GET", "/admin/hosts", None, headers)[0]
    assert admin_hosts == admin or (admin == 200 and admin_hosts == 409)  # 409: no routing
    # The admin API is not on the main port, whatever the key.
    assert raw(main, "POST", "/v2/repository/index", b"{}", headers)[0] in (401, 404)
    assert raw(main, "POST", "/v2/repository/index", b"{}", ADMIN)[0] == 404
    # Probes stay open on both listeners.
    assert raw(main, "GET", "/v2/health/ready", None, headers)[0] == 200
    assert raw(admin_door, "GET", "/v2/health/live", None, headers)[0] == 200


@pytest.mark.parametrize(
    ("headers", "inference"),
    [
        ({}, "UNAUTHENTICATED"),
        ({"authorization": "Bearer user-key"}, "OK"),
        ({"x-api-key": "admin-key"}, "OK"),
    ],
    ids=["no-key", "api-key", "admin-key"],
)
def test_matrix_over_grpc(
    split: tuple[GatewayProcess, ...], headers: dict[str, str], inference: str
) -> None:
    _, _, grpc_door = split
    client = grpcclient.InferenceServerClient(grpc_door.address)
    expected = "OK" if inference == "OK" else str(grpc.StatusCode.UNAUTHENTICATED)
    try:
        assert _grpc_status(lambda: client.infer("simple", _grpc_inputs(), headers=headers)) == (
            expected
        )
        assert _grpc_status(lambda: client.get_model_metadata("simple", headers=headers)) == (
            expected
        )
        # With admin_port set the repository RPCs are served on that HTTP port only.
        assert _grpc_status(lambda: client.get_model_repository_index(headers=headers)) == str(
            grpc.StatusCode.UNIMPLEMENTED
        )
        assert client.is_server_live()
    finally:
        client.close()


def test_empty_keys_are_refused_at_start(tmp_path: Path) -> None:
    from gateway.settings import SettingsError, load_settings

    for text in ('api_keys = ["", "k"]', 'admin_keys = [" "]', 'api_keys = ["k "]'):
        config = tmp_path / "gateway.toml"
        config.write_text(text + "\n")
        with pytest.raises(SettingsError, match="keys must be non-empty"):
            load_settings(config, env={})
    assert load_settings(env={"GATEWAY_API_KEYS": "a, b"}).api_keys == ("a", "b")
