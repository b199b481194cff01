"""The gRPC front end: the real gateway as a subprocess, driven by ``tritonclient.grpc``.

Models are built at test time with ``onnx.helper``. The codec's pure functions are tested
directly at the end.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http.aio as httpaio
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.errors import InvalidInput
from gateway.grpc.codec import decode_infer_request, encode_infer_response, join_bytes
from gateway.grpc.errors import status_of
from gateway.protocol.types import InferResponse
from tests.models import graph_bytes, simple_onnx

MAX_MESSAGE_BYTES = 1024 * 1024
STARTUP_TIMEOUT_S = 60.0

SIMPLE_CONFIG = """
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input {{ name: "INPUT0" data_type: TYPE_INT32 dims: 16 }}
input {{ name: "INPUT1" data_type: TYPE_INT32 dims: 16 }}
output {{ name: "OUTPUT0" data_type: TYPE_INT32 dims: 16 }}
output {{ name: "OUTPUT1" data_type: TYPE_INT32 dims: 16 }}
dynamic_batching {{ {batching} }}
"""

ECHO_CONFIG = """
name: "echo"
platform: "onnxruntime_onnx"
max_batch_size: 8
input { name: "TEXT" data_type: TYPE_STRING dims: 1 }
output { name: "TEXT_OUT" data_type: TYPE_STRING dims: 1 }
dynamic_batching { }
"""


# -- models built at test time ------------------------------------------------------------


def echo_onnx() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["TEXT"], ["TEXT_OUT"])],
        "echo",
        [helper.make_tensor_value_info("TEXT", TensorProto.STRING, [None, 1])],
        [helper.make_tensor_value_info("TEXT_OUT", TensorProto.STRING, [None, 1])],
    )
    return graph_bytes(graph)


def _write_model(repo: Path, name: str, onnx_bytes: bytes, config: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.onnx").write_bytes(onnx_bytes)
    (repo / name / "config.pbtxt").write_text(config)


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    simple = simple_onnx()
    _write_model(repo, "simple", simple, SIMPLE_CONFIG.format(name="simple", batching=""))
    _write_model(
        repo,
        "simple_delay",
        simple,
        SIMPLE_CONFIG.format(name="simple_delay", batching="max_queue_delay_microseconds: 100000"),
    )
    _write_model(repo, "spare", simple, SIMPLE_CONFIG.format(name="spare", batching=""))
    _write_model(repo, "echo", echo_onnx(), ECHO_CONFIG)
    return repo


# -- the gateway process ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _wait_ready(gw: Gateway) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if gw.process.poll() is not None:
            pytest.fail(f"gateway exited with {gw.process.returncode}:\n{gw.log()}")
        try:
            url = f"http://{gw.http_url}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"gateway not ready after {STARTUP_TIMEOUT_S} s:\n{gw.log()}")


@pytest.fixture(scope="module", params=["asyncio", "grpcio"])
def gateway(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Gateway]:
    """The gateway with each gRPC transport: every test here runs against both."""
    http_port, grpc_port = free_port(), free_port()
    while grpc_port == http_port:
        grpc_port = free_port()
    log_path = tmp_path_factory.mktemp("gateway") / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    command = [
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--model-repo",
        str(model_repo),
        "--port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--grpc-max-message-bytes",
        str(MAX_MESSAGE_BYTES),
        "--execution-provider",
        "cpu",
        "--grpc-transport",
        request.param,
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    gw = Gateway(process, http_port, grpc_port, log_path)
    try:
        _wait_ready(gw)
        yield gw
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=5)


@pytest.fixture
def client(gateway: Gateway) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(gateway.grpc_url)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def stub(gateway: Gateway) -> Iterator[Any]:
    channel = grpc.insecure_channel(gateway.grpc_url)
    try:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    finally:
        channel.close()


def _simple_inputs(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> list[Any]:
    inputs = []
    for name, data in (("INPUT0", a), ("INPUT1", b)):
        tensor = grpcclient.InferInput(name, list(data.shape), "INT32")
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    return inputs


def _operands(rows: int = 2, seed: int = 0) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return (
        rng.integers(-1000, 1000, (rows, 16), dtype=np.int32),
        rng.integers(-1000, 1000, (rows, 16), dtype=np.int32),
    )


# -- health, metadata, config -------------------------------------------------------------


def test_health(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("simple")
    assert client.is_model_ready("simple", "1")
    assert not client.is_model_ready("simple", "2")
    assert not client.is_model_ready("nope")


def test_server_metadata(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta.name == "gateway"
    assert "model_repository" in meta.extensions


def test_model_metadata(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata("simple")
    assert meta.name == "simple"
    assert list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("INPUT0", "INT32", [-1, 16]),
        ("INPUT1", "INT32", [-1, 16]),
    ]
    assert [t.name for t in meta.outputs] == ["OUTPUT0", "OUTPUT1"]


def test_model_config(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("simple_delay").config
    assert config.name == "simple_delay"
    assert config.max_batch_size == 8
    assert [i.name for i in config.input] == ["INPUT0", "INPUT1"]
    assert config.input[0].data_type == grpcclient.model_config_pb2.TYPE_INT32
    assert list(config.input[0].dims) == [16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100000


def test_model_config_as_json(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("echo", as_json=True)["config"]
    assert config["input"][0]["data_type"] == "TYPE_STRING"


def test_statistics_and_index(client: grpcclient.InferenceServerClient) -> None:
    a, b = _operands()
    client.infer("simple", _simple_inputs(a, b))
    stats = client.get_inference_statistics("simple").model_stats
    assert len(stats) == 1 and stats[0].name == "simple" and stats[0].version == "1"
    assert stats[0].inference_count >= 2 and stats[0].execution_count >= 1
    assert stats[0].inference_stats.success.count >= 1
    every = client.get_inference_statistics().model_stats
    assert {s.name for s in every} >= {"simple", "simple_delay", "echo"}
    index = client.get_model_repository_index()
    assert {(m.name, m.state) for m in index.models} >= {("simple", "READY"), ("echo", "READY")}


def test_repository_unload_load(client: grpcclient.InferenceServerClient) -> None:
    client.unload_model("spare")
    assert not client.is_model_ready("spare")
    with pytest.raises(InferenceServerException) as info:
        client.infer("spare", _simple_inputs(*_operands()))
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    client.load_model("spare")
    assert client.is_model_ready("spare")
    with pytest.raises(InferenceServerException) as info:
        client.load_model("spare", config='{"max_batch_size": "many"}')
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


# -- inference ----------------------------------------------------------------------------


def test_infer_raw_matches_onnxruntime(client: grpcclient.InferenceServerClient) -> None:
    a, b = _operands(rows=3, seed=1)
    result = client.infer("simple", _simple_inputs(a, b), request_id="r1")
    session = ort.InferenceSession(simple_onnx(), providers=["CPUExecutionProvider"])
    want0, want1 = session.run(["OUTPUT0", "OUTPUT1"], {"INPUT0": a, "INPUT1": b})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), want0)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), want1)
    response = result.get_response()
    assert response.id == "r1" and response.model_name == "simple"
    assert response.model_version == "1"
    assert len(response.raw_output_contents) == 2  # raw in, raw out


def test_infer_requested_output(client: grpcclient.InferenceServerClient) -> None:
    a, b = _operands(seed=2)
    result = client.infer(
        "simple", _simple_inputs(a, b), outputs=[grpcclient.InferRequestedOutput("OUTPUT1")]
    )
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT1"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_infer_tensor_contents(stub: Any) -> None:
    a, b = _operands(seed=3)
    request = pb.ModelInferRequest(model_name="simple", id="typed")
    for name, data in (("INPUT0", a), ("INPUT1", b)):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[2, 16])
        tensor.contents.int_contents.extend(data.reshape(-1).tolist())
    response = stub.ModelInfer(request, timeout=10)
    assert response.id == "typed"
    # typed in, raw out: Triton answers in raw_output_contents whatever the request used
    assert not any(o.HasField("contents") for o in response.outputs)
    assert [o.name for o in response.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert list(response.outputs[0].shape) == [2, 16]
    out0, out1 = (np.frombuffer(c, np.int32).reshape(2, 16) for c in response.raw_output_contents)
    np.testing.assert_array_equal(out0, a + b)
    np.testing.assert_array_equal(out1, a - b)


def test_infer_bytes_raw_and_contents(client: grpcclient.InferenceServerClient, stub: Any) -> None:
    text = np.array([[b"hello"], [b""], ["h\u00e9llo".encode()]], dtype=object)
    tensor = grpcclient.InferInput("TEXT", [3, 1], "BYTES")
    tensor.set_data_from_numpy(text)
    result = client.infer("echo", [tensor])
    assert result.as_numpy("TEXT_OUT").tolist() == text.tolist()

    request = pb.ModelInferRequest(model_name="echo")
    typed = request.inputs.add(name="TEXT", datatype="BYTES", shape=[3, 1])
    typed.contents.bytes_contents.extend(text.reshape(-1).tolist())
    response = stub.ModelInfer(request, timeout=10)
    framed = b"".join(struct.pack("<I", len(t)) + t for t in text.reshape(-1).tolist())
    assert list(response.raw_output_contents) == [framed]  # raw out, as Triton


# -- errors -------------------------------------------------------------------------------


def _status(exc: InferenceServerException) -> str:
    return str(exc.status())


def test_unknown_model_is_not_found(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("nope", _simple_inputs(*_operands()))
    assert _status(info.value) == "StatusCode.NOT_FOUND"
    assert "unknown model" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert _status(info.value) == "StatusCode.NOT_FOUND"


def test_wrong_datatype_is_invalid_argument(client: grpcclient.InferenceServerClient) -> None:
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = grpcclient.InferInput(name, [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
        inputs.append(tensor)
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", inputs)
    assert _status(info.value) == "StatusCode.INVALID_ARGUMENT"
    assert "data-type is 'FP32'" in info.value.message()


def test_bad_contents_are_invalid_argument(stub: Any) -> None:
    request = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        tensor.contents.int_contents.extend([1] * 15)  # one short
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 16" in info.value.details()


def test_message_above_limit_is_resource_exhausted(
    client: grpcclient.InferenceServerClient,
) -> None:
    big = np.zeros((8, MAX_MESSAGE_BYTES // 4 // 8 + 16), np.int32)
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", _simple_inputs(big, big))
    assert _status(info.value) == "StatusCode.RESOURCE_EXHAUSTED"
    assert client.is_server_live()  # and the server is fine


# -- streaming ----------------------------------------------------------------------------


def test_stream_infer(client: grpcclient.InferenceServerClient) -> None:
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        sent: dict[str, np.ndarray[Any, Any]] = {}
        for i in range(6):
            a, b = _operands(rows=1 + i % 3, seed=10 + i)
            sent[f"s{i}"] = a + b
            client.async_stream_infer("simple", _simple_inputs(a, b), request_id=f"s{i}")
        client.async_stream_infer("nope", _simple_inputs(*_operands()), request_id="bad")
        a, b = _operands(seed=99)
        sent["after"] = a + b
        client.async_stream_infer("simple", _simple_inputs(a, b), request_id="after")
        got: dict[str, np.ndarray[Any, Any]] = {}
        errors: list[str] = []
        for _ in range(len(sent) + 1):
            result, error = results.get(timeout=10)
            if error is not None:
                errors.append(error.message())
            else:
                got[result.get_response().id] = result.as_numpy("OUTPUT0")
    finally:
        client.stop_stream()
    assert len(errors) == 1 and "unknown model" in errors[0]
    assert set(got) == set(sent)
    for key, want in sent.items():
        np.testing.assert_array_equal(got[key], want)


# -- the asyncio client, and REST + gRPC in one batch ---------------------------------------


def _aio_inputs(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> list[Any]:
    inputs = []
    for name, data in (("INPUT0", a), ("INPUT1", b)):
        tensor = grpcaio.InferInput(name, list(data.shape), "INT32")
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    return inputs


def _http_inputs(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> list[Any]:
    inputs = []
    for name, data in (("INPUT0", a), ("INPUT1", b)):
        tensor = httpaio.InferInput(name, list(data.shape), "INT32")
        tensor.set_data_from_numpy(data, binary_data=False)
        inputs.append(tensor)
    return inputs


async def test_aio_infer_and_stream(gateway: Gateway) -> None:
    client = grpcaio.InferenceServerClient(gateway.grpc_url)
    try:
        assert await client.is_server_ready()
        a, b = _operands(seed=5)
        result = await client.infer("simple", _aio_inputs(a, b))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)

        async def requests() -> Any:
            for i in range(4):
                x, y = _operands(seed=20 + i)
                yield {"model_name": "simple", "inputs": _aio_inputs(x, y), "request_id": str(i)}

        got: dict[str, np.ndarray[Any, Any]] = {}
        async for item, error in client.stream_infer(requests()):
            assert error is None
            got[item.get_response().id] = item.as_numpy("OUTPUT0")
            if len(got) == 4:
                break
        for i in range(4):
            x, y = _operands(seed=20 + i)
            np.testing.assert_array_equal(got[str(i)], x + y)
    finally:
        await client.close()


async def test_rest_and_grpc_share_batches(gateway: Gateway) -> None:
    """32 concurrent requests, half REST half gRPC, to a model that waits 100 ms for a batch."""
    grpc_client = grpcaio.InferenceServerClient(gateway.grpc_url)
    http_client = httpaio.InferenceServerClient(gateway.http_url)
    try:
        before = (await grpc_client.get_inference_statistics("simple_delay")).model_stats[0]
        operands = [_operands(rows=1, seed=100 + i) for i in range(32)]

        async def one(i: int) -> np.ndarray[Any, Any]:
            a, b = operands[i]
            if i % 2:
                result = await http_client.infer("simple_delay", _http_inputs(a, b))
            else:
                result = await grpc_client.infer("simple_delay", _aio_inputs(a, b))
            return np.asarray(result.as_numpy("OUTPUT0"))

        outputs = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(32))), 30)
        for (a, b), out in zip(operands, outputs, strict=True):
            np.testing.assert_array_equal(out, a + b)
        after = (await grpc_client.get_inference_statistics("simple_delay")).model_stats[0]
        assert after.inference_count - before.inference_count == 32
        executions = after.execution_count - before.execution_count
        print(f"32 requests (16 REST, 16 gRPC) ran in {executions} executions")
        assert executions < 32
    finally:
        await grpc_client.close()
        await http_client.close()


# -- the codec, without a server ----------------------------------------------------------


def _request(**kwargs: Any) -> Any:
    return pb.ModelInferRequest(model_name="m", **kwargs)


def test_codec_raw_sizes_are_checked() -> None:
    request = _request(raw_input_contents=[b"\x00" * 7])
    request.inputs.add(name="X", datatype="INT32", shape=[2])
    with pytest.raises(InvalidInput, match="got 7 bytes"):
        decode_infer_request(request)


def test_codec_raw_must_cover_every_input() -> None:
    request = _request(raw_input_contents=[b"\x00" * 4])
    request.inputs.add(name="X", datatype="INT32", shape=[1])
    request.inputs.add(name="Y", datatype="INT32", shape=[1])
    with pytest.raises(InvalidInput, match="every input or none"):
        decode_infer_request(request)


def test_codec_raw_and_contents_conflict() -> None:
    request = _request(raw_input_contents=[b"\x00" * 4])
    tensor = request.inputs.add(name="X", datatype="INT32", shape=[1])
    tensor.contents.int_contents.append(1)
    with pytest.raises(InvalidInput, match="both"):
        decode_infer_request(request)


def test_codec_raw_bytes() -> None:
    items = np.array([b"a", b"", b"xyz"], dtype=object)
    request = _request(raw_input_contents=[join_bytes(items)])
    request.inputs.add(name="S", datatype="BYTES", shape=[3])
    decoded = decode_infer_request(request)
    assert decoded.inputs["S"].tolist() == [b"a", b"", b"xyz"]
    for bad in (join_bytes(items)[:-1], join_bytes(items) + b"\x00", b"\x01\x00"):
        request.raw_input_contents[0] = bad
        with pytest.raises(InvalidInput, match="'S'"):
            decode_infer_request(request)


def test_codec_contents_types_and_ranges() -> None:
    request = _request()
    tensor = request.inputs.add(name="X", datatype="INT8", shape=[2])
    tensor.contents.int_contents.extend([1, 300])
    with pytest.raises(InvalidInput, match="out of range"):
        decode_infer_request(request)
    request = _request()
    tensor = request.inputs.add(name="X", datatype="FP16", shape=[1])
    with pytest.raises(InvalidInput, match="raw_input_contents"):
        decode_infer_request(request)
    request = _request()
    tensor = request.inputs.add(name="X", datatype="FP32", shape=[1])
    tensor.contents.int_contents.append(1)
    with pytest.raises(InvalidInput, match="fp32_contents"):
        decode_infer_request(request)
    request = _request()
    request.inputs.add(name="X", datatype="COMPLEX", shape=[1])
    with pytest.raises(InvalidInput, match="unknown datatype"):
        decode_infer_request(request)


def test_codec_parameters_round_trip() -> None:
    request = _request(id="x")
    request.parameters["timeout"].int64_param = 500
    request.parameters["sequence_start"].bool_param = False
    request.parameters["tag"].string_param = "t"
    request.inputs.add(name="X", datatype="FP64", shape=[1]).contents.fp64_contents.append(2.5)
    decoded = decode_infer_request(request)
    assert decoded.timeout_us == 500
    assert decoded.parameters == {"timeout": 500, "sequence_start": False, "tag": "t"}
    assert decoded.id == "x"
    assert decoded.inputs["X"].dtype == np.float64


def test_codec_outputs_are_always_raw() -> None:
    response = InferResponse(
        "m", "1", {"H": np.ones((2,), np.float16), "I": np.arange(2, dtype=np.int16)}
    )
    message = encode_infer_response(response)
    assert len(message.raw_output_contents) == 2
    assert np.frombuffer(message.raw_output_contents[0], np.float16).tolist() == [1.0, 1.0]
    other = encode_infer_response(InferResponse("m", "1", {"I": np.arange(3)}))
    assert np.frombuffer(other.raw_output_contents[0], np.int64).tolist() == [0, 1, 2]
    assert other.outputs[0].datatype == "INT64" and not other.outputs[0].HasField("contents")


def test_status_table() -> None:
    from gateway import errors

    assert status_of(errors.InvalidInput("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(errors.ModelNotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert status_of(errors.ModelLoadError("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(errors.ModelNotReady("x")) == grpc.StatusCode.UNAVAILABLE
    assert status_of(errors.Unavailable("x")) == grpc.StatusCode.UNAVAILABLE
    assert status_of(errors.QueueFull("x")) == grpc.StatusCode.UNAVAILABLE  # as Triton 2.51
    assert status_of(errors.Overloaded("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(errors.DeadlineExceeded("x")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_of(errors.GatewayError("x")) == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(
    ("args", "env", "headers"),
    [
        (["--admin-port", "0"], {}, None),  # port filled in below: the admin API on its own port
        ([], {"GATEWAY_ADMIN_API": "false", "GATEWAY_ADMIN_KEYS": "adm"}, {"x-api-key": "adm"}),
    ],
    ids=["admin-port-no-keys", "admin-off-admin-key"],
)
def test_repository_rpcs_not_served_here_are_unimplemented(
    model_repo: Path, tmp_path: Path, args: list[str], env: dict[str, str], headers: Any
) -> None:
    """Where the gRPC port does not serve the repository API, its RPCs answer UNIMPLEMENTED
    to any caller, an admin key included, and inference still works (with or without keys:
    both the interceptor's path and the one without it)."""
    from tests.helpers import start_gateway

    if args:
        args = [args[0], str(free_port())]
    grpc_port = free_port()
    gw = start_gateway(model_repo, tmp_path, "--grpc-port", str(grpc_port), *args, env=env)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        calls = {
            "index": lambda: client.get_model_repository_index(headers=headers),
            "unload": lambda: client.unload_model("spare", headers=headers),
            "load": lambda: client.load_model("spare", headers=headers),
            "log": lambda: client.get_log_settings(headers=headers),
        }
        for what, call in calls.items():
            with pytest.raises(InferenceServerException) as info:
                call()
            assert _status(info.value) == str(grpc.StatusCode.UNIMPLEMENTED), what
            assert "not served here" in str(info.value.message()), what
        assert client.is_server_live()
        a, b = _operands(1)
        result = client.infer("simple", _simple_inputs(a, b), headers=headers)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        assert client.is_model_ready("spare", headers=headers)  # unload was refused
    finally:
        client.close()
        gw.stop()
