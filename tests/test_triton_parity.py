"""Triton parity: where Triton's own clients and tools match on what Triton says and does, the
gateway says and does the same (issue 20, sections 2 to 4).

Each expected message, status and behaviour here was read from a real Triton 2.51 (the one
bundled in nvidia-pytriton) answering the same request, or from Triton's sources where that
build cannot show it. One test per behaviour, each against a real gateway process.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.batching import Batcher, BatchPolicy, Executed
from gateway.errors import QueueFull
from gateway.stats import ModelStats
from tests import models
from tests.helpers import GatewayProcess, free_port, raw, simple_inputs, start_gateway


@pytest.fixture(scope="module")
def parity_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parity-repo")
    models.add_sub(root, "simple")
    models.add_sub(root, "model..1")  # dots inside a name: Triton serves it
    models.dense(root, "classes", features=4, classes=8, config=CLASSES_CONFIG)
    (root / "classes" / "labels.txt").write_text("".join(f"class-{i}\n" for i in range(8)))
    models.strings(root, "echo")
    models.string_add_sub(root, "simple_string")  # Triton's example: empty strings are no numbers
    models.with_initializer_input(root, "biased")
    models.scalar_double(root, "scalar")
    return root


CLASSES_CONFIG = """
name: "classes"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 8 ] label_filename: "labels.txt" } ]
"""


GRPC_PORT = free_port()


@pytest.fixture(scope="module")
def gw(parity_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = start_gateway(
        parity_repo, tmp_path_factory.mktemp("parity-logs"), "--grpc-port", str(GRPC_PORT)
    )
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def gw_grpc(gw: GatewayProcess) -> str:
    """The gRPC address of ``gw``."""
    return f"127.0.0.1:{GRPC_PORT}"


def _post(gw: GatewayProcess, path: str, body: object = None) -> tuple[int, dict[str, object]]:
    payload = b"" if body is None else json.dumps(body).encode()
    status, _, data = raw(gw, "POST", path, payload, {"Content-Type": "application/json"})
    return status, (json.loads(data) if data else {})


# -- section 2: Triton's words for load and unload ----------------------------------------


def test_load_failures_use_tritons_words(gw: GatewayProcess) -> None:
    """``simple_http_model_control.py`` checks for "failed to load" in both of these."""
    client = httpclient.InferenceServerClient(gw.address)
    with pytest.raises(InferenceServerException) as bad_config:
        client.load_model("simple", config='"parameters": {"config": {{"max_batch_size": "16"}}}')
    assert bad_config.value.message().startswith("failed to load 'simple', ")
    assert "override config" in bad_config.value.message()  # the detail is kept
    with pytest.raises(InferenceServerException) as unknown:
        client.load_model("wrong_model_name")
    assert unknown.value.message().startswith("failed to load 'wrong_model_name', ")
    assert client.is_model_ready("simple")  # the bad override left the model serving


def test_unload_of_a_model_not_loaded_succeeds(gw: GatewayProcess) -> None:
    """Triton answers 200 to unloading a name it does not serve."""
    assert _post(gw, "/v2/repository/models/never_loaded/unload") == (200, {})


def test_file_override_without_config_is_refused(gw: GatewayProcess) -> None:
    """Triton's LocalizeRepoAgent: pushed files need a config to go with them."""
    onnx = models.simple_onnx()
    body = {"parameters": {"file:1/model.onnx": base64.b64encode(onnx).decode()}}
    status, answer = _post(gw, "/v2/repository/models/pushed_alone/load", body)
    assert status == 400
    assert answer["error"] == (
        "failed to load 'pushed_alone', "
        "Load parameter 'config' must be specified for model file override"
    )


# -- section 4: behaviours -----------------------------------------------------------------


def test_a_name_with_dots_inside_is_served(gw: GatewayProcess) -> None:
    """``model..1`` is one plain directory name (Triton 2.51 loads and serves it); names that
    could climb out of the repository stay refused."""
    client = httpclient.InferenceServerClient(gw.address)
    assert client.is_model_ready("model..1")
    inputs, a, b = simple_inputs()
    result = client.infer("model..1", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    assert raw(gw, "GET", "/v2/models/..evil/config")[0] == 400


def _simple_body(**extra: object) -> dict[str, object]:
    data = list(range(16))
    inputs = [
        {"name": n, "datatype": "INT32", "shape": [1, 16], "data": data}
        for n in ("INPUT0", "INPUT1")
    ]
    return {"inputs": inputs, **extra}


def test_a_listed_output_without_binary_data_stays_json(gw: GatewayProcess) -> None:
    """``binary_data_output: true`` covers the outputs of a request that lists none; a listed
    output without ``binary_data`` is JSON, as Triton answers."""
    body = _simple_body(parameters={"binary_data_output": True}, outputs=[{"name": "OUTPUT0"}])
    status, headers, data = raw(gw, "POST", "/v2/models/simple/infer", json.dumps(body).encode())
    assert status == 200 and "inference-header-content-length" not in headers
    (output,) = json.loads(data)["outputs"]
    assert output["name"] == "OUTPUT0" and output["data"] == [2 * i for i in range(16)]
    body = _simple_body(parameters={"binary_data_output": True})  # none listed: all binary
    status, headers, _ = raw(gw, "POST", "/v2/models/simple/infer", json.dumps(body).encode())
    assert status == 200 and "inference-header-content-length" in headers


def test_grpc_answers_typed_contents_in_raw_output_contents(gw_grpc: str) -> None:
    """Triton always answers in ``raw_output_contents``; tritonclient's ``as_numpy`` reads
    only that, so a request with typed ``contents`` must be answered the same way."""
    request = pb.ModelInferRequest(model_name="simple", id="typed")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        tensor.contents.int_contents.extend(range(16))
    with grpc.insecure_channel(gw_grpc) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    result = grpcclient.InferResult(response)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), [[2 * i for i in range(16)]])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros((1, 16), np.int32))


async def test_the_queue_admits_max_queue_size_requests_not_one_more() -> None:
    """Triton's queue holds a request until its batch is sent, and refuses the next one when
    it holds ``max_queue_size``: the batch being formed counts."""

    async def double(inputs: dict[str, Any], outputs: Any, deadline_s: Any = None) -> Executed:
        return Executed({"Y": inputs["X"] * 2})

    policy = BatchPolicy(max_batch_size=8, max_queue_delay_s=30.0, max_queue_size=2)
    batcher = Batcher(double, ["Y"], policy, ModelStats("m", "1"))
    row = {"X": np.ones((1, 2), np.float32)}
    admitted = [batcher.enqueue(row), batcher.enqueue(row)]
    for _ in range(5):
        await asyncio.sleep(0)  # the scheduler takes the first into the batch it forms
    with pytest.raises(QueueFull, match=r"^Exceeds maximum queue size$"):
        batcher.enqueue(row)
    for item in admitted:
        item.future.cancel()
    await batcher.close(drain_timeout_s=1.0)


def _error(gw: GatewayProcess, body: dict[str, object], model: str = "simple") -> tuple[int, str]:
    status, answer = _post(gw, f"/v2/models/{model}/infer", body)
    return status, str(answer.get("error"))


def test_inference_errors_use_tritons_words(gw: GatewayProcess) -> None:
    """The messages Triton 2.51 gave for the same requests (it prefixes them with
    ``[request id: ...]``; the gateway names its request id in ``X-Request-ID``)."""
    good = _simple_body()["inputs"]
    assert isinstance(good, list)
    status, message = _error(gw, {"inputs": [*good, good[0]]})
    assert (status, message) == (400, "input 'INPUT0' already exists in request")
    short = {"name": "INPUT0", "datatype": "INT32", "shape": [1, 8], "data": list(range(8))}
    status, message = _error(gw, {"inputs": [short, good[1]]})
    assert status == 400 and message == (
        "unexpected shape for input 'INPUT0' for model 'simple'. Expected [-1,16], got [1,8]. "
        "NOTE: Setting a non-zero max_batch_size in the model config requires a batch "
        "dimension to be prepended to each input shape. If you want to specify the full shape "
        "including the batch dim in your input dims config, try setting max_batch_size to zero. "
        "See the model configuration docs for more info on max_batch_size."
    )
    status, message = _error(gw, {"inputs": [good[1]]})
    assert status == 400 and message == (
        "expected 2 inputs but got 1 inputs for model 'simple'. Got input(s) ['INPUT1'], but "
        "missing required input(s) ['INPUT0']. Please provide all required input(s)."
    )
    fifteen = {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(15))}
    status, message = _error(gw, {"inputs": [fifteen, good[1]]})
    assert status == 400  # Triton answers 500 here; it is the client's error
    assert "Unable to parse 'data': Shape does not match true shape of 'data' field" in message
    status, message = _error(gw, {"inputs": good}, model="nope")
    assert (status, message) == (404, "Request for unknown model: 'nope' is not found")
    status, answer = _post(gw, "/v2/models/simple/versions/7/infer", {"inputs": good})
    assert (status, answer["error"]) == (
        404,
        "Request for unknown model: 'simple' version 7 is not found",
    )


# -- section 3: logging extension ---------------------------------------------------------


def test_logging_extension_changes_logging_at_run_time(parity_repo: Path, tmp_path: Path) -> None:
    """``GET/POST /v2/logging`` with Triton's fields (tritonclient's ``get_log_settings`` /
    ``update_log_settings``, and gRPC ``LogSettings``); the change shows in the log at once."""
    port = free_port()
    gateway = start_gateway(parity_repo, tmp_path, "--grpc-port", str(port))
    try:
        client = httpclient.InferenceServerClient(gateway.address)
        assert "logging" in client.get_server_metadata()["extensions"]
        assert client.get_log_settings() == {
            "log_file": "",
            "log_info": True,
            "log_warning": True,
            "log_error": True,
            "log_verbose_level": 0,
            "log_format": "json",
        }
        client.load_model("simple")
        assert '"msg":"model simple loaded' in gateway.log()  # JSON lines
        settings = client.update_log_settings({"log_format": "ISO8601", "unknown": 1})
        assert settings["log_format"] == "ISO8601"
        client.load_model("simple")
        line = gateway.log().splitlines()[-1]
        assert "INFO gateway.dataplane: model simple loaded" in line and line[10] == "T"
        updated = client.update_log_settings({"log_info": False})
        assert updated["log_info"] is False and updated["log_warning"] is True
        lines = len(gateway.log().splitlines())
        client.load_model("simple")
        assert len(gateway.log().splitlines()) == lines  # info lines are off
        status, answer = _post(gateway, "/v2/logging", {"log_verbose_level": "x"})
        assert status == 400 and "log_verbose_level" in str(answer["error"])
        status, answer = _post(gateway, "/v2/logging", {"log_file": "/tmp/elsewhere.log"})
        assert status == 400 and client.get_log_settings()["log_file"] == ""
        grpc_client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        answered = grpc_client.update_log_settings({"log_info": True}, as_json=True)
        assert answered["settings"]["log_info"] == {"bool_param": True}
        assert client.get_log_settings()["log_info"] is True
    finally:
        gateway.stop()


# -- section 4: classification extension ---------------------------------------------------


def _texts(array: np.ndarray) -> list[list[str]]:
    """BYTES as tritonclient gives them (bytes when binary, str from JSON), as text rows."""
    return [[v.decode() if isinstance(v, bytes) else v for v in row] for row in array]


def _top(row: np.ndarray, count: int, labelled: bool) -> list[str]:
    order = sorted(range(len(row)), key=lambda i: -float(row[i]))[:count]
    return [f"{float(row[i]):f}:{i}" + (f":class-{i}" if labelled else "") for i in order]


def test_classification_answers_top_classes_as_triton(gw: GatewayProcess, gw_grpc: str) -> None:
    """``"classification": K`` (gRPC ``class_count``): per batch row the top K as BYTES
    ``value:index:label`` (labels from the config's ``label_filename``), best first; K past
    the row's size gives the whole row, as Triton 2.51 does."""
    x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    client = httpclient.InferenceServerClient(gw.address)
    tensor = httpclient.InferInput("X", [2, 4], "FP32")
    tensor.set_data_from_numpy(x, binary_data=False)
    plain = client.infer("classes", [tensor]).as_numpy("Y")
    for binary in (False, True):
        wanted = httpclient.InferRequestedOutput("Y", binary_data=binary, class_count=3)
        result = client.infer("classes", [tensor], outputs=[wanted])
        assert result.get_output("Y")["datatype"] == "BYTES"
        assert _texts(result.as_numpy("Y")) == [_top(row, 3, labelled=True) for row in plain]
    wanted = httpclient.InferRequestedOutput("Y", binary_data=False, class_count=20)
    result = client.infer("classes", [tensor], outputs=[wanted])
    assert result.as_numpy("Y").shape == (2, 8)
    grpc_client = grpcclient.InferenceServerClient(gw_grpc)
    grpc_tensor = grpcclient.InferInput("X", [2, 4], "FP32")
    grpc_tensor.set_data_from_numpy(x)
    out = grpcclient.InferRequestedOutput("Y", class_count=2)
    answer = grpc_client.infer("classes", [grpc_tensor], outputs=[out]).as_numpy("Y")
    assert _texts(answer) == [_top(row, 2, labelled=True) for row in plain]
    inputs, _, _ = simple_inputs()  # integers, no labels: "value:index"
    wanted = httpclient.InferRequestedOutput("OUTPUT0", class_count=2)
    result = client.infer("simple", inputs, outputs=[wanted])
    assert _texts(result.as_numpy("OUTPUT0")) == [["18:15", "17:14"]]  # a + b: 15 + 3, 14 + 3


def test_classification_refusals_use_tritons_words(gw: GatewayProcess) -> None:
    """A BYTES output has no classes (Triton's message); K must be a non-negative integer."""
    body = {
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": ["a"]}],
        "outputs": [{"name": "TEXT_OUT", "parameters": {"classification": 1}}],
    }
    assert _error(gw, body, model="echo") == (
        400,
        "class result not available for output due to unsupported type 'BYTES'",
    )
    for count in (-1, "2", 1.5):
        body = _simple_body(outputs=[{"name": "OUTPUT0", "parameters": {"classification": count}}])
        status, message = _error(gw, body)
        assert status == 400 and "'classification'" in message


# -- section 4: warm-up only as the config's model_warmup says ------------------------------


def test_a_model_that_refuses_made_up_inputs_loads_and_serves(gw: GatewayProcess) -> None:
    """Triton's ``simple_string`` parses its BYTES inputs as numbers, so the gateway's own
    warm-up (empty strings) fails on it: that must not keep the model from loading."""
    client = httpclient.InferenceServerClient(gw.address)
    assert client.is_model_ready("simple_string")
    numbers = np.array([[str(i).encode() for i in range(16)]], dtype=object)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = httpclient.InferInput(name, [1, 16], "BYTES")
        tensor.set_data_from_numpy(numbers)
        inputs.append(tensor)
    result = client.infer("simple_string", inputs)
    assert [int(v) for v in result.as_numpy("OUTPUT0")[0]] == [2 * i for i in range(16)]


def _warmup_config(name: str, data: str) -> str:
    base = models.SIMPLE_CONFIG.replace("simple", name).replace("TYPE_INT32", "TYPE_STRING")
    inputs = " ".join(
        f'inputs {{ key: "{n}" value {{ data_type: TYPE_STRING dims: [ 16 ] {data} }} }}'
        for n in ("INPUT0", "INPUT1")
    )
    return base + f'model_warmup [ {{ name: "sample" batch_size: 2 {inputs} count: 2 }} ]\n'


def test_model_warmup_runs_as_triton_defines_it(tmp_path: Path) -> None:
    """A config's ``model_warmup`` is run at load (``input_data_file`` from
    ``<model>/warmup/``, ``batch_size`` rows); a sample the model refuses fails the load, as in
    Triton, unlike the gateway's own made-up inputs."""
    repo = tmp_path / "repo"
    models.string_add_sub(repo, "from_file", _warmup_config("from_file", 'input_data_file: "n"'))
    (repo / "from_file" / "warmup").mkdir()
    (repo / "from_file" / "warmup" / "n").write_bytes(
        b"".join(len(t).to_bytes(4, "little") + t for t in (b"7",) * 16)
    )
    models.string_add_sub(repo, "zeros", _warmup_config("zeros", "zero_data: true"))
    gateway = start_gateway(repo, tmp_path)
    try:
        client = httpclient.InferenceServerClient(gateway.address)
        assert client.is_model_ready("from_file")
        config = client.get_model_config("from_file")["model_warmup"]
        assert config[0]["inputs"]["INPUT0"]["input_data_file"] == "n"
        assert not client.is_model_ready("zeros")
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert "model_warmup 'sample' failed" in index["zeros"]["reason"]
    finally:
        gateway.stop()


# -- section 4: compressed request bodies --------------------------------------------------


def test_compressed_request_bodies_are_decompressed_within_the_limit(gw: GatewayProcess) -> None:
    """tritonclient's ``request_compression_algorithm`` (gzip, deflate) works; the inflated
    size counts against ``max_body_bytes`` (64 MiB here): a zip bomb is a 413, and an unknown
    coding a 415."""
    client = httpclient.InferenceServerClient(gw.address)
    for algorithm in ("gzip", "deflate"):
        for binary in (True, False):
            inputs, a, b = simple_inputs(batch=2, binary=binary)
            result = client.infer("simple", inputs, request_compression_algorithm=algorithm)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    header = json.dumps(_simple_body()).encode()
    bomb = gzip.compress(header + b" " * (65 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 1024 * 1024
    status, _, answer = raw(
        gw, "POST", "/v2/models/simple/infer", bomb, {"Content-Encoding": "gzip"}
    )
    assert status == 413 and b"decompressed request body exceeds" in answer
    assert raw(gw, "GET", "/v2/health/ready")[0] == 200
    status, _, answer = raw(
        gw, "POST", "/v2/models/simple/infer", header, {"Content-Encoding": "br"}
    )
    assert status == 415 and b"unsupported Content-Encoding 'br'" in answer
    status, _, _ = raw(
        gw, "POST", "/v2/models/simple/infer", b"not gzip", {"Content-Encoding": "gzip"}
    )
    assert status == 400


# -- section 4: the raw binary request -----------------------------------------------------


def _binary_outputs(body: bytes, headers: dict[str, str]) -> dict[str, tuple[dict, bytes]]:
    """Each output of a binary response: its JSON entry and its bytes."""
    length = int(headers["inference-header-content-length"])
    header, offset, found = json.loads(body[:length]), length, {}
    for output in header["outputs"]:
        size = output["parameters"]["binary_data_size"]
        found[output["name"]] = (output, body[offset : offset + size])
        offset += size
    return found


def test_raw_binary_request_for_a_single_input_model(gw: GatewayProcess) -> None:
    """``Inference-Header-Content-Length: 0``: the body is the one input's tensor, its shape
    from the config (batch of one), every output answered as binary (Triton's extension)."""
    x = np.array([0.5, 3.0, -1.0, 2.0], np.float32)
    raw_header = {"Inference-Header-Content-Length": "0"}
    status, headers, body = raw(gw, "POST", "/v2/models/classes/infer", x.tobytes(), raw_header)
    assert status == 200, body
    output, data = _binary_outputs(body, headers)["Y"]
    assert output["shape"] == [1, 8] and output["datatype"] == "FP32"
    client = httpclient.InferenceServerClient(gw.address)
    tensor = httpclient.InferInput("X", [1, 4], "FP32")
    tensor.set_data_from_numpy(x.reshape(1, 4))
    expected = client.infer("classes", [tensor]).as_numpy("Y")
    np.testing.assert_array_equal(np.frombuffer(data, np.float32).reshape(1, 8), expected)
    status, headers, body = raw(gw, "POST", "/v2/models/echo/infer", b"h\xc3\xa9llo", raw_header)
    assert status == 200, body
    output, data = _binary_outputs(body, headers)["TEXT_OUT"]
    assert output["shape"] == [1, 1] and data == b"\x06\x00\x00\x00h\xc3\xa9llo"
    status, _, body = raw(gw, "POST", "/v2/models/classes/infer", x.tobytes()[:12], raw_header)
    assert status == 400 and b"12 bytes do not make input 'X'" in body
    status, _, body = raw(gw, "POST", "/v2/models/simple/infer", x.tobytes(), raw_header)
    assert status == 400 and b"needs a model with one input" in body


# -- section 4: what ONNX models may declare -----------------------------------------------


def _fp32(name: str, array: np.ndarray) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array.astype(np.float32))
    return tensor


def test_optional_inputs_may_be_left_out(gw: GatewayProcess) -> None:
    """``optional: true`` on an ONNX input with an initializer (which ORT lists apart from the
    graph's inputs): the model loads; left out, the initializer is used; given, it is fed."""
    client = httpclient.InferenceServerClient(gw.address)
    x = np.array([1.0, 2.0, 3.0], np.float32)
    result = client.infer("biased", [_fp32("X", x)])
    np.testing.assert_array_equal(result.as_numpy("Y"), x + 1)
    result = client.infer("biased", [_fp32("X", x), _fp32("B", np.full(3, 10.0))])
    np.testing.assert_array_equal(result.as_numpy("Y"), x + 10)
    inputs = client.get_model_config("biased")["input"]
    assert {i["name"]: i.get("optional", False) for i in inputs} == {"X": False, "B": True}


def test_a_scalar_onnx_tensor_is_served_with_config_dims_one(gw: GatewayProcess) -> None:
    """A rank-0 ONNX input and output described with ``dims: [ 1 ]`` (Triton's way to declare
    scalars): requests and answers are shape [1]."""
    client = httpclient.InferenceServerClient(gw.address)
    assert client.get_model_metadata("scalar")["inputs"][0]["shape"] == [1]
    result = client.infer("scalar", [_fp32("X", np.array([4.5]))])
    assert result.as_numpy("Y").shape == (1,) and result.as_numpy("Y")[0] == 9.0


def test_bytes_that_are_not_utf8_pass_through_a_model(gw: GatewayProcess) -> None:
    """Triton's ORT backend hands BYTES to the model as they are; a model that passes them on
    (here an Identity) gives back the very bytes, whether they are UTF-8 text or not."""
    client = httpclient.InferenceServerClient(gw.address)
    blobs = np.array(
        [[b"\xff\xd8\xff\xe0\x00JFIF"], [b"h\xc3\xa9llo"], [bytes(range(256))]], object
    )
    tensor = httpclient.InferInput("TEXT", [3, 1], "BYTES")
    tensor.set_data_from_numpy(blobs)
    result = client.infer("echo", [tensor], outputs=[httpclient.InferRequestedOutput("TEXT_OUT")])
    assert result.as_numpy("TEXT_OUT").tolist() == blobs.tolist()


def test_an_override_config_stays_until_unload(parity_repo: Path, tmp_path: Path) -> None:
    """Triton 2.51: a plain load of a model loaded with an override config keeps the override
    (the model did not change); after an unload, a plain load reads the repository again."""
    gateway = start_gateway(parity_repo, tmp_path)
    try:
        client = httpclient.InferenceServerClient(gateway.address)
        client.load_model("simple", config='{"max_batch_size": 4}')
        assert client.get_model_config("simple")["max_batch_size"] == 4
        client.load_model("simple")
        assert client.get_model_config("simple")["max_batch_size"] == 4
        inputs, a, b = simple_inputs(batch=2)
        np.testing.assert_array_equal(client.infer("simple", inputs).as_numpy("OUTPUT0"), a + b)
        client.unload_model("simple")
        client.load_model("simple")
        assert client.get_model_config("simple")["max_batch_size"] == 8  # config.pbtxt's
    finally:
        gateway.stop()


# -- section 3: statistics as Triton reports them -------------------------------------------


def test_statistics_have_tritons_fields(gw: GatewayProcess, gw_grpc: str) -> None:
    """Every field Triton 2.51 reports for a model version (perf_analyzer's server-side
    section and model analyzer read them), over REST and gRPC; unknown names are 400s in
    Triton's words."""
    client = httpclient.InferenceServerClient(gw.address)
    inputs, _, _ = simple_inputs(batch=2)
    client.infer("simple", inputs)
    (stats,) = client.get_inference_statistics("simple")["model_stats"]
    assert set(stats) == {
        "name",
        "version",
        "last_inference",
        "inference_count",
        "execution_count",
        "inference_stats",
        "response_stats",
        "batch_stats",
        "memory_usage",
    }
    assert set(stats["inference_stats"]) == {
        "success",
        "fail",
        "queue",
        "compute_input",
        "compute_infer",
        "compute_output",
        "cache_hit",
        "cache_miss",
    }
    assert stats["inference_count"] >= 2 and stats["execution_count"] >= 1
    assert stats["last_inference"] > 1_600_000_000_000  # ms since the epoch
    sizes = {b["batch_size"]: b for b in stats["batch_stats"]}
    assert sizes[2]["compute_infer"]["count"] >= 1 and sizes[2]["compute_infer"]["ns"] > 0
    for kind in ("compute_input", "compute_infer", "compute_output"):  # measured, not zeros
        assert stats["inference_stats"][kind]["ns"] > 0, kind
    grpc_stats = grpcclient.InferenceServerClient(gw_grpc).get_inference_statistics(
        "simple", as_json=True
    )
    assert grpc_stats["model_stats"][0]["inference_count"] == str(stats["inference_count"])
    assert _error_of(gw, "/v2/models/nope/stats") == (
        400,
        "requested model 'nope' is not available",
    )
    assert _error_of(gw, "/v2/models/simple/versions/3/stats") == (
        400,
        "requested model version is not available for model 'simple'",
    )


def _error_of(gw: GatewayProcess, path: str) -> tuple[int, str]:
    status, _, body = raw(gw, "GET", path)
    return status, json.loads(body)["error"]


def test_data_nested_deeper_than_any_rank_is_refused(gw: GatewayProcess) -> None:
    """No tensor has more than 32 dimensions, so no 'data' nests deeper (Triton 2.51 recurses
    once per level without a bound; about 100,000 levels bring its HTTP server down)."""
    deep = "a"
    for _ in range(40):
        deep = [deep]  # type: ignore[assignment]
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": deep}]}
    status, message = _error(gw, body, model="echo")
    assert (status, message) == (400, "input 'TEXT': 'data' is nested deeper than 32 levels")
    within = "a"
    for _ in range(31):
        within = [within]  # type: ignore[assignment]
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": within}]}
    assert _post(gw, "/v2/models/echo/infer", body)[0] == 200
    number: object = 1.0
    for _ in range(40):
        number = [number]
    x = {"name": "X", "datatype": "FP32", "shape": [1, 4], "data": [number, 1, 1, 1]}
    assert _error(gw, {"inputs": [x]}, model="classes")[0] == 400
    assert raw(gw, "GET", "/v2/health/ready")[0] == 200


def test_a_full_queue_is_unavailable_over_grpc_as_over_rest() -> None:
    """Triton 2.51 answers "Exceeds maximum queue size" with gRPC UNAVAILABLE (REST 503)."""
    from gateway.grpc.errors import status_of as grpc_status
    from gateway.server.errors import status_of as http_status

    full = QueueFull("Exceeds maximum queue size")
    assert (grpc_status(full), http_status(full)) == (grpc.StatusCode.UNAVAILABLE, 503)


async def test_each_request_of_a_batch_counts_the_whole_execution() -> None:
    """Triton 2.51: a batch of two that ran 0.6 s added 1.2 s to the model's compute_infer
    (count 2) and 0.6 s to batch size 2's (count 1); perf_analyzer divides by the count."""

    now = [100.0]  # the batcher's clock: a run moves it by the 0.5 s it reports

    async def slow(inputs: dict[str, Any], outputs: Any, deadline_s: Any = None) -> Executed:
        now[0] += 0.5
        return Executed({"Y": inputs["X"]}, "", 0.5, input_s=0.125, output_s=0.0625)

    stats = ModelStats("m", "1")
    policy = BatchPolicy(max_batch_size=8, preferred_batch_sizes=(2,), max_queue_delay_s=1.0)
    batcher = Batcher(slow, ["Y"], policy, stats, clock=lambda: now[0])
    row = {"X": np.ones((1, 2), np.float32)}
    items = [batcher.enqueue(row), batcher.enqueue(row)]
    await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 5.0)
    await batcher.close(drain_timeout_s=1.0)
    as_dict = stats.to_dict()
    model, (batch,) = as_dict["inference_stats"], as_dict["batch_stats"]
    assert batch["batch_size"] == 2
    for kind, each_ns in (
        ("compute_input", 125_000_000),
        ("compute_infer", 312_500_000),
        ("compute_output", 62_500_000),
    ):
        assert model[kind] == {"count": 2, "ns": 2 * each_ns}, kind
        assert batch[kind] == {"count": 1, "ns": each_ns}, kind


def test_model_control_over_grpc_as_tritons_example_does_it(
    parity_repo: Path, tmp_path: Path
) -> None:
    """The steps of Triton's ``simple_grpc_model_control.py``: a bad override config and an
    unknown model both say "failed to load"; a good override changes ``max_batch_size``."""
    port = free_port()
    gateway = start_gateway(parity_repo, tmp_path, "--grpc-port", str(port))
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        client.load_model("simple")
        assert client.is_model_ready("simple")
        with pytest.raises(InferenceServerException) as bad:
            client.load_model(
                "simple", config='"parameters": {"config": {{"max_batch_size": "16"}}}'
            )
        assert "failed to load" in bad.value.message()
        client.load_model("simple", config='{"max_batch_size":"16"}')
        assert client.get_model_config("simple").config.max_batch_size == 16
        client.unload_model("simple")
        assert not client.is_model_ready("simple")
        with pytest.raises(InferenceServerException) as unknown:
            client.load_model("wrong_model_name")
        assert "failed to load" in unknown.value.message()
    finally:
        gateway.stop()
