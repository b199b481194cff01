"""The v2 REST surface against the real gateway process, with tritonclient and raw HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

from tests.helpers import GatewayProcess, raw, simple_inputs


def ort_run(repo: Path, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def test_health_and_metadata(gateway: GatewayProcess) -> None:
    client = httpclient.InferenceServerClient(gateway.address)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"]
    assert client.is_model_ready("simple")
    model = client.get_model_metadata("simple")
    assert model["inputs"][0] == {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]}
    assert client.get_model_metadata("simple", "1")["versions"] == ["1"]
    config = client.get_model_config("simple")
    assert config["max_batch_size"] == 8 and config["input"][1]["data_type"] == "TYPE_INT32"


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_simple_matches_onnxruntime(
    gateway: GatewayProcess, repo: Path, binary_in: bool, binary_out: bool
) -> None:
    client = httpclient.InferenceServerClient(gateway.address)
    ins, a, b = simple_inputs(3, binary_in)
    outs = [
        httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in ("OUTPUT0", "OUTPUT1")
    ]
    result = client.infer("simple", ins, outputs=outs, request_id="req-7")
    expected = ort_run(repo, "simple", {"INPUT0": a, "INPUT1": b})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected["OUTPUT0"])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), expected["OUTPUT1"])
    assert result.get_response()["id"] == "req-7"


def test_requested_output_subset_and_default_binary(gateway: GatewayProcess) -> None:
    client = httpclient.InferenceServerClient(gateway.address)
    ins, a, b = simple_inputs()
    only = client.infer("simple", ins, outputs=[httpclient.InferRequestedOutput("OUTPUT1")])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["OUTPUT1"]
    np.testing.assert_array_equal(only.as_numpy("OUTPUT1"), a - b)
    every = client.infer("simple", ins)  # no outputs named: all of them, binary by default
    assert {o["name"] for o in every.get_response()["outputs"]} == {"OUTPUT0", "OUTPUT1"}
    assert all("binary_data_size" in o["parameters"] for o in every.get_response()["outputs"])


def test_nested_json_data_and_dtypes(gateway: GatewayProcess) -> None:
    body = {
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "INT32",
                "shape": [2, 16],
                "data": [list(range(16))] * 2,
            },
            {"name": "INPUT1", "datatype": "INT32", "shape": [2, 16], "data": [1] * 32},
        ]
    }
    status, _, data = raw(gateway, "POST", "/v2/models/simple/infer", json.dumps(body).encode())
    assert status == 200, data
    out = {o["name"]: o for o in json.loads(data)["outputs"]}
    assert out["OUTPUT0"]["shape"] == [2, 16]
    assert out["OUTPUT0"]["data"][:3] == [1, 2, 3]


def test_bytes_and_fixed_shape_models(gateway: GatewayProcess) -> None:
    client = httpclient.InferenceServerClient(gateway.address)
    text = np.array([[b"hello"], ["h\u00e9\x00".encode()]], dtype=object)
    for binary in (True, False):
        tensor = httpclient.InferInput("TEXT", [2, 1], "BYTES")
        tensor.set_data_from_numpy(
            text if binary else np.array([["hello"], ["x"]], dtype=object), binary_data=binary
        )
        got = client.infer("echo", [tensor]).as_numpy("TEXT_OUT")
        assert got.shape == (2, 1)
        if binary:
            assert list(got.ravel()) == [b"hello", "h\u00e9\x00".encode()]
    tensor = httpclient.InferInput("TEXT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=object))
    assert client.infer("echo", [tensor]).as_numpy("TEXT_OUT").tolist() == [[b"\xff\xfe"]]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = httpclient.InferInput("X", [2, 3], "FP32")
    tensor.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("double", [tensor]).as_numpy("Y"), x * 2)
    assert client.get_model_metadata("double")["inputs"][0]["shape"] == [2, 3]


def test_autocompleted_config(gateway: GatewayProcess) -> None:
    config = httpclient.InferenceServerClient(gateway.address).get_model_config("echo")
    assert config["max_batch_size"] == 4  # Triton's default for batchable models
    assert config["input"][0] == {"name": "TEXT", "data_type": "TYPE_STRING", "dims": [1]}
    assert "dynamic_batching" in config


def test_one_bad_model_does_not_stop_the_others(gateway: GatewayProcess) -> None:
    client = httpclient.InferenceServerClient(gateway.address)
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["broken"]["state"] == "UNAVAILABLE"
    assert "load failed" in index["broken"]["reason"]
    assert index["simple"]["state"] == "READY"
    status, _, body = raw(gateway, "POST", "/v2/models/broken/infer", b"{}")
    assert status == 503 and "not ready" in json.loads(body)["error"]


async def test_concurrent_requests_are_batched_and_split(
    gateway: GatewayProcess, repo: Path
) -> None:
    client = aiohttpclient.InferenceServerClient(gateway.address)
    try:
        before = (await client.get_inference_statistics("dense"))["model_stats"][0]
        rng = np.random.default_rng(1)
        xs = [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(32)]

        async def one(x: np.ndarray, binary: bool) -> np.ndarray:
            tensor = aiohttpclient.InferInput("X", [1, 64], "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            result = await client.infer("dense", [tensor])
            return result.as_numpy("Y")

        results = await asyncio.gather(*(one(x, i % 2 == 0) for i, x in enumerate(xs)))
        after = (await client.get_inference_statistics("dense"))["model_stats"][0]
    finally:
        await client.close()
    expected = ort_run(repo, "dense", {"X": np.concatenate(xs)})["Y"]
    for i, got in enumerate(results):
        np.testing.assert_allclose(got, expected[i : i + 1], rtol=1e-5, atol=1e-6)
    requests = (
        after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    )
    executions = after["execution_count"] - before["execution_count"]
    assert requests == 32
    assert after["inference_count"] - before["inference_count"] == 32
    assert executions < requests / 2, (executions, requests)
    assert any(s["batch_size"] > 1 for s in after["batch_stats"])


def test_stats_endpoints(gateway: GatewayProcess) -> None:
    status, _, body = raw(gateway, "GET", "/v2/models/stats")
    assert status == 200 and {s["name"] for s in json.loads(body)["model_stats"]} >= {"simple"}
    status, _, body = raw(gateway, "GET", "/v2/models/simple/versions/1/stats")
    stats = json.loads(body)["model_stats"][0]
    assert stats["name"] == "simple" and stats["version"] == "1"


def test_errors_are_typed(gateway: GatewayProcess) -> None:
    client = httpclient.InferenceServerClient(gateway.address)
    ins, _, _ = simple_inputs()
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("nope", ins)
    with pytest.raises(InferenceServerException, match="version 9"):
        client.infer("simple", ins, model_version="9")
    bad = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException, match="data-type"):
        client.infer("simple", [bad, ins[1]])
    assert client.is_server_live()


def test_pipelined_requests_on_one_connection(gateway: GatewayProcess) -> None:
    """Several requests sent at once on one keep-alive connection (HTTP/1.1 pipelining) come
    back whole and in order: the connection gathers each response's writes, never mixes them."""
    import socket

    bodies = [
        json.dumps(
            {
                "id": f"p{i}",
                "inputs": [
                    {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [i] * 16},
                    {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
                ],
            }
        ).encode()
        for i in range(5)
    ]
    wire = b"".join(
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
        for body in bodies
    )
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(wire)
        reader = sock.makefile("rb")
        for i in range(5):
            status = reader.readline().split()[1]
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            answer = json.loads(reader.read(length))
            assert status == b"200" and answer["id"] == f"p{i}"
            assert answer["outputs"][0]["data"] == [i + 1] * 16


@pytest.mark.parametrize(
    ("error", "status"),
    [
        ("InvalidInput", 400),
        ("PayloadTooLarge", 413),
        ("ModelNotFound", 404),
        ("ModelLoadError", 400),
        ("UnknownHost", 404),
        ("HostConflict", 409),
        ("QueueFull", 503),
        ("Overloaded", 429),
        ("DeadlineExceeded", 504),
        ("GatewayError", 500),
    ],
)
def test_one_status_table_for_every_route(error: str, status: int) -> None:
    """Inference and admin routes answer through the same table (no second mapping)."""
    from gateway import errors
    from gateway.server.errors import status_of

    assert status_of(getattr(errors, error)("x")) == status


def test_an_invalid_host_table_is_a_400() -> None:
    from gateway.server.errors import status_of
    from gateway.settings import SettingsError

    assert status_of(SettingsError("x")) == 400
