"""The v2 codec as pure functions, including property-based round trips."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.errors import InvalidInput
from gateway.protocol import (
    InferResponse,
    RequestedOutput,
    decode_infer_request,
    encode_infer_response,
)


def test_binary_and_json_inputs_mix() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = json.dumps(
        {
            "id": "r1",
            "inputs": [
                {
                    "name": "A",
                    "datatype": "FP32",
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": a.nbytes},
                },
                {"name": "B", "datatype": "BOOL", "shape": [2], "data": [True, False]},
                {
                    "name": "S",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": 11},
                },
            ],
            "outputs": [{"name": "Y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    strings = struct.pack("<I", 2) + b"hi" + struct.pack("<I", 1) + b"x"
    request = decode_infer_request(header + a.tobytes() + strings, len(header))
    np.testing.assert_array_equal(request.inputs["A"], a)
    assert request.inputs["B"].dtype == np.bool_
    assert list(request.inputs["S"]) == [b"hi", b"x"]
    assert request.id == "r1" and request.outputs == [RequestedOutput("Y", True)]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"inputs": [{"name": "A", "datatype": "FP32", "shape": [1], "data": [NaN]}]}', "JSON"),
        (b'{"inputs": [{"name": "A", "datatype": "INT8", "shape": [1], "data": [300]}]}', "range"),
        (
            b'{"inputs": [{"name": "A", "datatype": "INT8", "shape": [1], "data": [1.5]}]}',
            "integers",
        ),
        (b'{"inputs": [{"name": "A", "datatype": "FP32", "shape": [1.5], "data": [1]}]}', "shape"),
        (b'{"inputs": [{"name": "A", "datatype": "FP32", "shape": [true], "data": [1]}]}', "shape"),
        (b'{"inputs": [{"name": "A", "datatype": "BOOL", "shape": [1], "data": [1]}]}', "BOOL"),
        (b'{"inputs": [{"name": "A", "datatype": "FP16", "shape": [1], "data": [1e10]}]}', "range"),
        (
            b'{"inputs": [{"name": "A", "datatype": "FP32", "shape": [1], "data": ["x"]}]}',
            "numbers",
        ),
        (b'{"inputs": [{"name": "A", "datatype": "FP32", "shape": [1]}]}', "neither"),
        (
            b'{"inputs": [{"name": "A", "datatype": "FP32", "shape": [1], "data": [1]},'
            b' {"name": "A", "datatype": "FP32", "shape": [1], "data": [1]}]}',
            "already exists in request",
        ),
        (b'{"inputs": [{"name": "A", "datatype": "BYTES", "shape": [1], "data": [1]}]}', "strings"),
        (b"[" * 2000 + b"]" * 2000, "JSON"),
    ],
)
def test_rejects(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_infer_request(body)


def test_bytes_prefix_overrun() -> None:
    header = (
        b'{"inputs": [{"name": "S", "datatype": "BYTES", "shape": [1],'
        b' "parameters": {"binary_data_size": 6}}]}'
    )
    with pytest.raises(InvalidInput, match="overruns"):
        decode_infer_request(header + struct.pack("<I", 99) + b"ab", len(header))


dtypes = st.sampled_from(
    [np.int8, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_]
)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(dtypes, hnp.array_shapes(min_dims=1, max_dims=3, max_side=5)), st.booleans())
def test_response_round_trip(array: np.ndarray, binary: bool) -> None:
    """Whatever we encode, decoding it as a request gives the same tensor back."""
    if array.dtype.kind == "f":
        array = np.nan_to_num(array, posinf=1, neginf=-1)
    body, length = encode_infer_response(
        InferResponse("m", "1", {"T": array}), [RequestedOutput("T", binary)]
    )
    header = json.loads(body[: length or len(body)])
    out = header["outputs"][0]
    spec = {"name": "T", "datatype": out["datatype"], "shape": out["shape"]}
    if binary:
        spec["parameters"] = out["parameters"]
        request = json.dumps({"inputs": [spec]}).encode()
        decoded = decode_infer_request(request + body[length:], len(request))
    else:
        spec["data"] = out["data"]
        decoded = decode_infer_request(json.dumps({"inputs": [spec]}).encode())
    np.testing.assert_array_equal(decoded.inputs["T"], array)
    assert decoded.inputs["T"].dtype == array.dtype


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=-5, max_value=400))
def test_garbage_never_escapes_as_another_error(body: bytes, header_length: int) -> None:
    try:
        decode_infer_request(body, header_length)
    except InvalidInput:
        pass


def _binary_body(a: np.ndarray, b: np.ndarray) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": n,
                    "datatype": "INT32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
                for n, x in (("A", a), ("B", b))
            ],
            "outputs": [{"name": "Y", "parameters": {"binary_data": True}}],
            "parameters": {"timeout": 5000},
        }
    ).encode()
    return header + a.tobytes() + b.tobytes(), len(header)


def test_a_repeated_header_is_parsed_once_and_decodes_the_same() -> None:
    """The header of binary requests is cached by its bytes; each body still gets its own
    tensors and its own copies of what a caller could change."""
    from gateway.protocol import codec

    codec._TEMPLATES.clear()
    first, length = _binary_body(
        np.arange(4, dtype=np.int32).reshape(1, 4), np.ones((1, 2), np.int32)
    )
    one = decode_infer_request(first, length)
    assert len(codec._TEMPLATES) == 1
    second, _ = _binary_body(np.full((1, 4), 7, np.int32), np.zeros((1, 2), np.int32))
    two = decode_infer_request(second, length)
    assert len(codec._TEMPLATES) == 1  # the same header: served from the cache
    np.testing.assert_array_equal(one.inputs["A"], [[0, 1, 2, 3]])
    np.testing.assert_array_equal(two.inputs["A"], [[7, 7, 7, 7]])
    np.testing.assert_array_equal(two.inputs["B"], [[0, 0]])
    assert two.outputs == one.outputs == [RequestedOutput("Y", True)]
    assert two.parameters == {"timeout": 5000} and two.timeout_us == 5000
    assert two.outputs is not one.outputs and two.parameters is not one.parameters
    with pytest.raises(InvalidInput, match="binary data sizes add up"):
        decode_infer_request(second + b"extra", length)  # same header, lying body: still caught
    mixed = json.dumps(
        {
            "inputs": [
                {"name": "A", "datatype": "INT32", "shape": [1], "data": [1]},
                {
                    "name": "B",
                    "datatype": "INT32",
                    "shape": [1],
                    "parameters": {"binary_data_size": 4},
                },
            ]
        }
    ).encode()
    assert decode_infer_request(mixed + b"\x02\0\0\0", len(mixed)).inputs["B"][0] == 2
    assert len(codec._TEMPLATES) == 1  # JSON data is per request: nothing to reuse
    for rid in ("r-1", "r-22"):  # a leading id is left out of the key: one more entry
        with_id = b'{"id":"%s",' % rid.encode() + first[1:length]
        assert decode_infer_request(with_id + first[length:], len(with_id)).id == rid
    assert len(codec._TEMPLATES) == 2


def test_header_cache_is_bounded() -> None:
    from gateway.protocol import codec

    codec._TEMPLATES.clear()
    for width in range(1, codec._TEMPLATES_MAX + 50):
        body, length = _binary_body(np.zeros((1, width), np.int32), np.zeros((1, 1), np.int32))
        decode_infer_request(body, length)
    assert 0 < len(codec._TEMPLATES) <= codec._TEMPLATES_MAX


def test_binary_response_headers_are_reused_with_each_id() -> None:
    """All-binary responses take their JSON header from a cache; the id is each response's own
    (escaped), and the bytes match what the general encoder writes."""
    out = np.arange(6, dtype=np.float32).reshape(2, 3)
    expected = {
        "model_name": "m",
        "model_version": "1",
        "outputs": [
            {
                "name": "Y",
                "datatype": "FP32",
                "shape": [2, 3],
                "parameters": {"binary_data_size": 24},
            }
        ],
    }
    for rid in (None, 'say "hi"', None, "r2"):
        body, length = encode_infer_response(
            InferResponse("m", "1", {"Y": out}, id=rid), None, True
        )
        assert length is not None
        header = json.loads(body[:length])
        assert header == (expected if rid is None else {**expected, "id": rid})
        np.testing.assert_array_equal(np.frombuffer(body[length:], np.float32).reshape(2, 3), out)
    general, glength = encode_infer_response(
        InferResponse("m", "1", {"Y": out}, id="r2", parameters={"x": 1}), None, True
    )
    assert json.loads(general[:glength]) == {**expected, "id": "r2", "parameters": {"x": 1}}
    assert body[length:] == general[glength:]


def test_binary_outputs_are_the_arrays_bytes_whatever_their_layout() -> None:
    """Outputs are joined from the arrays' own buffers (one copy): views, FP16, BOOL, empty and
    0-d arrays come out byte for byte, in both the fast and the general encoder."""
    outputs = {
        "view": np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2],  # not contiguous
        "half": np.linspace(0, 1, 5, dtype=np.float16),
        "flags": np.array([[True, False, True]]),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(7, np.int32),
    }
    for parameters in ({}, {"x": 1}):  # {} takes the fast path, parameters the general one
        body, length = encode_infer_response(
            InferResponse("m", "1", outputs, parameters=parameters), None, True
        )
        assert length is not None
        header = json.loads(body[:length])
        offset = length
        for entry, (name, array) in zip(header["outputs"], outputs.items(), strict=True):
            size = entry["parameters"]["binary_data_size"]
            assert entry["name"] == name and size == array.nbytes
            assert body[offset : offset + size] == array.tobytes()
            offset += size
        assert offset == len(body)
