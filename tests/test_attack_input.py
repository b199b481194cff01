"""Attack suite: hostile inference input and repository loads (issue: security holes).

Each test names the hole it keeps closed. Pure decoding is tested on the codecs themselves;
what needs the server (status codes, state after a failed load, scratch files, what a body or
metadata reveals) against a real gateway.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from gateway.errors import InvalidInput
from gateway.grpc import codec as grpc_codec
from gateway.protocol.codec import decode_infer_request
from gateway.protocol.tensors import split_bytes
from tests import models
from tests.helpers import GatewayProcess, raw, start_gateway

HUGE = 18446744073709551615  # 2**64 - 1


def _binary(header: dict[str, Any], data: bytes) -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return head + data, len(head)


def _framed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


# -- BYTES framing: work bounded by the declared shape, not by the body ------------------------


def test_bytes_split_stops_after_one_element_too_many() -> None:
    """A body holding more elements than its shape is refused at the first one too many: the
    rest (here a broken prefix) is never read."""
    body = _framed(b"a", b"b") + b"\x01\x00"
    with pytest.raises(InvalidInput, match="more than the 1 elements"):
        split_bytes(body, 1, "TEXT")
    with pytest.raises(InvalidInput, match="truncated"):  # the same broken prefix, when needed
        split_bytes(body, 3, "TEXT")
    with pytest.raises(InvalidInput, match="cannot hold the 5"):
        split_bytes(_framed(b"", b""), 5, "TEXT")
    assert list(split_bytes(_framed(b"x", b""), 2, "TEXT")) == [b"x", b""]


def test_json_bytes_stop_after_one_element_too_many() -> None:
    header = {"inputs": [{"name": "T", "datatype": "BYTES", "shape": [1], "data": ["a", 5]}]}
    with pytest.raises(InvalidInput, match="more than the 1 elements"):  # 5 is never looked at
        decode_infer_request(json.dumps(header).encode())


# -- shapes, BOOL bytes and the timeout parameter, REST and gRPC -------------------------------


@pytest.mark.parametrize("shape", [[1, 0, HUGE], [0, 1 << 40], [HUGE, 0]])
def test_zero_sized_shape_with_a_huge_dimension_is_refused(shape: list[int]) -> None:
    spec = {"name": "X", "datatype": "FP32", "shape": shape}
    with pytest.raises(InvalidInput, match="too large"):
        decode_infer_request(json.dumps({"inputs": [{**spec, "data": []}]}).encode())
    body, length = _binary({"inputs": [{**spec, "parameters": {"binary_data_size": 0}}]}, b"")
    with pytest.raises(InvalidInput, match="too large"):
        decode_infer_request(body + b"", length)
    grpc_shape = [min(d, (1 << 63) - 1) for d in shape]
    message = pb.ModelInferRequest(
        inputs=[pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP32", shape=grpc_shape)],
        raw_input_contents=[b""],
    )
    with pytest.raises(InvalidInput, match="too large"):
        grpc_codec.decode_infer_request(message)


def test_bool_bytes_other_than_0_and_1_are_refused() -> None:
    spec = {"name": "B", "datatype": "BOOL", "shape": [1, 3]}
    good, length = _binary({"inputs": [{**spec, "parameters": {"binary_data_size": 3}}]}, b"")
    assert decode_infer_request(good + b"\x00\x01\x01", length).inputs["B"].tolist() == [
        [False, True, True]
    ]
    for _ in range(2):  # the second time from the cached header
        with pytest.raises(InvalidInput, match="BOOL data must be bytes 0 or 1"):
            decode_infer_request(good + b"\x00\x02\x01", length)
    message = pb.ModelInferRequest(
        inputs=[pb.ModelInferRequest.InferInputTensor(name="B", datatype="BOOL", shape=[1, 3])],
        raw_input_contents=[b"\xff\x00\x01"],
    )
    with pytest.raises(InvalidInput, match="BOOL data must be bytes 0 or 1"):
        grpc_codec.decode_infer_request(message)


@pytest.mark.parametrize("timeout", ["100", -1, 1.5, True])
def test_a_timeout_the_gateway_cannot_honour_is_refused(timeout: object) -> None:
    spec = {"name": "X", "datatype": "INT32", "shape": [1], "data": [1]}
    body = json.dumps({"inputs": [spec], "parameters": {"timeout": timeout}}).encode()
    with pytest.raises(InvalidInput, match="'timeout' must be a non-negative integer"):
        decode_infer_request(body)
    message = pb.ModelInferRequest(
        inputs=[pb.ModelInferRequest.InferInputTensor(name="X", datatype="INT32", shape=[1])],
        raw_input_contents=[b"\x01\x00\x00\x00"],
    )
    if isinstance(timeout, str):
        message.parameters["timeout"].string_param = timeout
    elif isinstance(timeout, bool):
        message.parameters["timeout"].bool_param = timeout
    elif isinstance(timeout, int):
        message.parameters["timeout"].int64_param = timeout
    else:
        message.parameters["timeout"].double_param = timeout  # type: ignore[assignment]
    with pytest.raises(InvalidInput, match="'timeout' must be a non-negative integer"):
        grpc_codec.decode_infer_request(message)
    ok = json.dumps({"inputs": [spec], "parameters": {"timeout": 0}}).encode()
    assert decode_infer_request(ok).timeout_us is None  # 0: no timeout, as Triton


# -- against the server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Path]]:
    """A gateway whose temporary directory is one the test can look into."""
    tmp = tmp_path_factory.mktemp("attack-input")
    repo, scratch = tmp / "repo", tmp / "tmpdir"
    scratch.mkdir()
    models.add_sub(repo, "simple")
    models.strings(repo, "echo")
    broken = repo / "typo"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.onnx").write_bytes(models.simple_onnx())
    (broken / "config.pbtxt").write_text('name: "typo"\nmax_batch_sise: 8\n')
    gw = start_gateway(repo, tmp, env={"TMPDIR": str(scratch)})
    try:
        yield gw, scratch
    finally:
        gw.stop()


def _peak_rss_bytes(gw: GatewayProcess) -> int:
    for line in Path(f"/proc/{gw.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_small_bytes_shape_over_a_huge_body_is_cheap(
    served: tuple[GatewayProcess, Path],
) -> None:
    """[1, 1] BYTES declared over 40 MB of 4-byte elements: refused without splitting them all
    (which peaked near 1 GB and held the event loop for seconds)."""
    gw, _ = served
    data = b"\x00\x00\x00\x00" * (10 * 1024 * 1024)
    spec = {"name": "TEXT", "datatype": "BYTES", "shape": [1, 1]}
    body, length = _binary(
        {"inputs": [{**spec, "parameters": {"binary_data_size": len(data)}}]}, data
    )
    before = _peak_rss_bytes(gw)
    status, _, answer = raw(
        gw,
        "POST",
        "/v2/models/echo/infer",
        body,
        {
            "Inference-Header-Content-Length": str(length),
            "Content-Type": "application/octet-stream",
        },
    )
    assert status == 400 and b"more than the 1 elements" in answer, answer
    grown = _peak_rss_bytes(gw) - before
    assert grown < 250 * 1024 * 1024, f"peak RSS grew by {grown / 2**20:.0f} MiB"


def test_zero_sized_huge_shape_is_a_400(served: tuple[GatewayProcess, Path]) -> None:
    gw, _ = served
    body = {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 0, HUGE], "data": []},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [0] * 16},
        ]
    }
    status, _, answer = raw(gw, "POST", "/v2/models/simple/infer", json.dumps(body).encode())
    assert status == 400 and "too large" in json.loads(answer)["error"]


def _load(gw: GatewayProcess, name: str, **files: bytes) -> tuple[int, dict[str, Any]]:
    parameters = {key: base64.b64encode(value).decode() for key, value in files.items()}
    parameters["config"] = "{}"  # files need a config to go with them (as in Triton)
    status, _, body = raw(
        gw,
        "POST",
        f"/v2/repository/models/{name}/load",
        json.dumps({"parameters": parameters}).encode(),
    )
    return status, json.loads(body) if body else {}


def _index(gw: GatewayProcess) -> dict[str, dict[str, Any]]:
    status, _, body = raw(gw, "POST", "/v2/repository/index", b"{}")
    assert status == 200
    return {entry["name"]: entry for entry in json.loads(body)}


def test_failed_loads_leave_no_state_and_no_scratch_files(
    served: tuple[GatewayProcess, Path],
) -> None:
    gw, scratch = served
    onnx = models.simple_onnx()
    cases = [
        {"file:\u00b2/model.onnx": onnx},  # a superscript digit is no version
        {"file:\u0661/model.onnx": onnx},  # nor an Arabic-Indic one
        {"file:1/a": b"x", "file:1/a/b": b"y"},  # a file that is also a directory
        {"file:1/model.onnx": b"not a model"},  # refused by ONNX Runtime
    ]
    for files in cases:
        status, body = _load(gw, "pushed", **files)
        assert status == 400, (files.keys(), status, body)
        assert "error" in body
        assert "pushed" not in _index(gw), "a failed load of a new name left an entry"
        assert not list(scratch.glob("gateway-*")), "scratch files left behind"
    assert _load(gw, "pushed", **{"file:1/model.onnx": onnx})[0] == 200
    assert _index(gw)["pushed"]["state"] == "READY"
    assert len(list(scratch.glob("gateway-pushed-*"))) == 1
    assert _load(gw, "pushed", **{"file:1/model.onnx": b"broken"})[0] == 400
    entry = _index(gw)["pushed"]
    assert entry["state"] == "READY" and "load failed" in entry["reason"]  # old one serves on
    assert len(list(scratch.glob("gateway-pushed-*"))) == 1
    assert raw(gw, "POST", "/v2/repository/models/pushed/unload", b"{}")[0] == 200
    assert not list(scratch.glob("gateway-*")), "unload keeps pushed files"


def test_loading_an_unknown_model_is_a_404_and_leaves_nothing(
    served: tuple[GatewayProcess, Path],
) -> None:
    gw, _ = served
    for i in range(20):
        status, body = _load(gw, f"ghost{i}")
        assert status == 404 and "ghost" in body["error"], (status, body)
    assert not [name for name in _index(gw) if name.startswith("ghost")]


def test_names_and_versions_are_matched_whole(served: tuple[GatewayProcess, Path]) -> None:
    gw, _ = served
    status, body = _load(gw, "simple%0A")
    assert status == 400 and "invalid model name" in body["error"]
    status, _, answer = raw(gw, "GET", "/v2/models/simple/versions/%D9%A1")  # Arabic-Indic 1
    assert status == 404, answer
    assert raw(gw, "GET", "/v2/models/simple/versions/1")[0] == 200


def test_clients_see_names_not_paths(served: tuple[GatewayProcess, Path]) -> None:
    gw, _ = served
    repo_dir = str(gw.log_path.parent)
    _, _, metadata = raw(gw, "GET", "/v2/models/simple")
    assert repo_dir not in metadata.decode() and b"/tmp" not in metadata
    assert json.loads(metadata)["parameters"]["model_file"] == "1/model.onnx"
    status, _, answer = raw(gw, "POST", "/v2/repository/models/typo/load", b"{}")
    assert status == 400 and b"typo/config.pbtxt" in answer and repo_dir.encode() not in answer
    index = json.dumps(_index(gw))
    assert repo_dir not in index and "typo/config.pbtxt" in index
    status, _, answer = raw(
        gw,
        "POST",
        "/v2/repository/models/pushed2/load",
        json.dumps(
            {
                "parameters": {
                    "config": "{}",
                    "file:1/model.onnx": base64.b64encode(b"junk").decode(),
                }
            }
        ).encode(),
    )
    assert status == 400 and b"1/model.onnx" in answer and b"gateway-pushed2" not in answer


def test_a_long_request_id_is_cut(served: tuple[GatewayProcess, Path]) -> None:
    gw, _ = served
    body = json.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [0] * 16},
                {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [0] * 16},
            ]
        }
    ).encode()
    rid = "r" * 30_000
    status, headers, _ = raw(gw, "POST", "/v2/models/simple/infer", body, {"X-Request-ID": rid})
    assert status == 200 and headers["x-request-id"] == rid[:128]
    assert rid[:129] not in gw.log()


def test_grpc_refuses_zero_sized_huge_shape(tmp_path: Path) -> None:
    from tests.helpers import free_port

    models.add_sub(tmp_path / "repo", "simple")
    port = free_port()
    gw = start_gateway(tmp_path / "repo", tmp_path, "--grpc-port", str(port))
    try:
        from tritonclient.grpc import service_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            tensor = pb.ModelInferRequest.InferInputTensor
            request = pb.ModelInferRequest(
                model_name="simple",
                inputs=[
                    tensor(name="INPUT0", datatype="INT32", shape=[1, 0, (1 << 63) - 1]),
                    tensor(name="INPUT1", datatype="INT32", shape=[1, 16]),
                ],
                raw_input_contents=[b"", np.zeros(16, np.int32).tobytes()],
            )
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "too large" in (caught.value.details() or "")
    finally:
        gw.stop()


def test_every_name_and_path_check_matches_the_whole_string() -> None:
    """``$`` matches before a trailing newline: each validator must refuse ``x\\n``."""
    from gateway.repository.local import check_model_name, is_version
    from gateway.repository.manifest import check_relpath, check_sha256

    digest = "0" * 64
    assert check_sha256(digest) == digest and check_relpath("1/model.onnx") == "1/model.onnx"
    for call, value in (
        (check_model_name, "nl\n"),
        (check_sha256, digest + "\n"),
        (check_relpath, "1/model.onnx\n"),
    ):
        with pytest.raises(InvalidInput):
            call(value)
    assert is_version("1") and is_version("123456789012345678")
    for text in ("1\n", "\u0661", "\u00b2", "1234567890123456789", "", "-1", "1.0"):
        assert not is_version(text), text
