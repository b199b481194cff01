"""Pins of the v2 codec's behaviour, value by value, before the request path is redesigned.

Pure functions only (no server): every boundary, message and default that a client can observe
through ``decode_infer_request`` / ``encode_infer_response``, and the two header caches (a
repeated header is parsed once, a repeated response header built once). Error messages are
compared whole: they are what a client reads in the 400 body.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from gateway.errors import InvalidInput
from gateway.protocol import (
    InferRequest,
    InferResponse,
    RequestedOutput,
    codec,
    datatype_of,
    decode_infer_request,
    encode_infer_response,
    tensors,
)
from gateway.protocol.types import SharedInput, SharedMemoryRef

LIMIT = 1 << 28  # the default element limit of one tensor

UNPARSED = "Unable to parse 'data': Shape does not match true shape of 'data' field"


def _body(*inputs: dict[str, Any], **top: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **top}).encode()


def _inp(
    name: str = "A", datatype: str = "INT32", shape: Any = (1,), **fields: Any
) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    spec.update(fields)
    if isinstance(shape, tuple):
        spec["shape"] = list(shape)
    return spec


def _bin(name: str, datatype: str, shape: list[int], data: bytes) -> tuple[dict[str, Any], bytes]:
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape,
        "parameters": {"binary_data_size": len(data)},
    }, data


def _binary_body(*inputs: tuple[dict[str, Any], bytes], **top: Any) -> tuple[bytes, int]:
    header = _body(*(spec for spec, _ in inputs), **top)
    return header + b"".join(data for _, data in inputs), len(header)


def _prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _error(body: bytes, header_length: int | None = None, max_elements: int = LIMIT) -> str:
    with pytest.raises(InvalidInput) as info:
        decode_infer_request(body, header_length, max_elements)
    return str(info.value)


def _one(spec: dict[str, Any]) -> np.ndarray[Any, Any]:
    return decode_infer_request(_body(spec)).inputs[spec["name"]]


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts full parses of a request header (a cached header skips them); empty caches."""
    calls: list[int] = []
    real = codec._decode

    def counting(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(codec, "_decode", counting)
    codec._TEMPLATES.clear()
    yield calls
    codec._TEMPLATES.clear()


# --- names --------------------------------------------------------------------------------------


def test_tensor_names_up_to_255_characters_without_nul() -> None:
    name = "n" * 255
    assert list(decode_infer_request(_body(_inp(name, data=[1]))).inputs) == [name]
    assert _error(_body(_inp("n" * 256, data=[1]))) == "input 'name' is not a valid tensor name"
    assert _error(_body(_inp("a\x00b", data=[1]))) == "input 'name' is not a valid tensor name"
    assert _error(_body(_inp("", data=[1]))) == "input 'name' must be a non-empty string"
    assert _error(_body({"datatype": "INT32", "shape": [1], "data": [1]})) == (
        "input 'name' must be a non-empty string"
    )
    assert _error(_body(_inp(5, data=[1]))) == "input 'name' must be a non-empty string"  # type: ignore[arg-type]


def test_output_names_follow_the_same_rule() -> None:
    def outputs(*specs: Any) -> str:
        return _error(_body(_inp(data=[1]), outputs=list(specs)))

    ok = decode_infer_request(_body(_inp(data=[1]), outputs=[{"name": "o" * 255}]))
    assert ok.outputs == [RequestedOutput("o" * 255, None)]
    assert outputs({"name": "o" * 256}) == "output 'name' is not a valid tensor name"
    assert outputs({"name": "o\x00"}) == "output 'name' is not a valid tensor name"
    assert outputs({"name": ""}) == "output 'name' must be a non-empty string"
    assert outputs({"name": 1}) == "output 'name' must be a non-empty string"


# --- shapes and element limits ------------------------------------------------------------------


def test_shape_of_32_dimensions_is_the_limit() -> None:
    array = _one(_inp(shape=[1] * 32, data=[7]))
    assert array.shape == (1,) * 32 and array.dtype == np.int32
    message = "input 'A': 'shape' must be a list of at most 32 integers"
    assert _error(_body(_inp(shape=[1] * 33, data=[7]))) == message
    assert _error(_body(_inp(shape="1", data=[7]))) == message
    assert _error(_body(_inp(shape={"a": 1}, data=[7]))) == message
    assert _error(_body({"name": "A", "datatype": "INT32", "data": [7]})) == message


@pytest.mark.parametrize(
    ("shape", "shown"),
    [([-1], "[-1]"), ([2, -3], "[2, -3]"), ([1.5], "[1.5]"), ([True], "[True]"), (["2"], "['2']")],
)
def test_dimensions_are_non_negative_integers(shape: list[Any], shown: str) -> None:
    assert _error(_body(_inp(shape=shape, data=[1]))) == (
        f"input 'A': shape {shown} must hold non-negative integers"
    )


@pytest.mark.parametrize(
    ("datatype", "dtype"),
    [("INT32", np.int32), ("BOOL", np.bool_), ("FP32", np.float32), ("BYTES", np.object_)],
)
def test_a_dimension_of_zero_holds_no_elements(datatype: str, dtype: type) -> None:
    array = _one(_inp(datatype=datatype, shape=[2, 0], data=[]))
    assert array.shape == (2, 0) and array.dtype == dtype
    spec, data = _bin("A", datatype, [0, 3], b"")
    body, length = _binary_body((spec, data))
    array = decode_infer_request(body, length).inputs["A"]
    assert array.shape == (0, 3) and array.dtype == dtype


def test_element_limit_is_inclusive_and_checked_per_dimension() -> None:
    """The shape is judged before any data: exactly the limit passes the shape check (and then
    fails for want of data), one more element does not."""
    neither = "input 'A' has neither 'data' nor 'binary_data_size'"
    assert _error(_body(_inp(shape=[LIMIT]))) == neither
    assert _error(_body(_inp(shape=[1 << 14, 1 << 14]))) == neither
    assert _error(_body(_inp(shape=[LIMIT + 1]))) == (
        f"input 'A': shape [{LIMIT + 1}] is too large (limit {LIMIT})"
    )
    assert _error(_body(_inp(shape=[1 << 14, (1 << 14) + 1]))) == (
        f"input 'A': shape [16384, 16385] is too large ({LIMIT + (1 << 14)} elements)"
    )
    huge = 2**64 - 1
    assert _error(_body(_inp(shape=[1, 0, huge], data=[]))) == (
        f"input 'A': shape [1, 0, {huge}] is too large (limit {LIMIT})"
    )


def test_element_limit_from_the_caller() -> None:
    body = _body(_inp(shape=[2, 3], data=list(range(6))))
    assert decode_infer_request(body, None, 6).inputs["A"].shape == (2, 3)
    assert _error(_body(_inp(shape=[3, 3], data=[0] * 9)), None, 8) == (
        "input 'A': shape [3, 3] is too large (9 elements)"
    )
    assert _error(_body(_inp(shape=[9], data=[0] * 9)), None, 8) == (
        "input 'A': shape [9] is too large (limit 8)"
    )


def test_check_shape_takes_tuples_from_grpc() -> None:
    assert tensors.check_shape((2, 3), "A") == (2, 3)
    assert tensors.check_shape([], "A") == ()


# --- request fields -----------------------------------------------------------------------------


def test_request_fields_and_their_defaults() -> None:
    plain = decode_infer_request(_body(_inp(data=[1])))
    assert plain.id is None and plain.outputs is None and plain.parameters == {}
    assert plain.binary_output is False and plain.timeout_us is None
    full = decode_infer_request(
        _body(
            _inp(data=[1]),
            id="r-7",
            outputs=[{"name": "Y", "parameters": {"binary_data": True}}, {"name": "Z"}],
            parameters={"binary_data_output": True, "timeout": 0, "x": "y"},
        )
    )
    assert full.id == "r-7" and full.binary_output is True
    assert full.outputs == [RequestedOutput("Y", True), RequestedOutput("Z", None)]
    assert full.parameters == {"binary_data_output": True, "timeout": 0, "x": "y"}
    off = decode_infer_request(
        _body(
            _inp(data=[1]),
            outputs=[{"name": "Y", "parameters": {"binary_data": False}}],
            parameters={"binary_data_output": False, "timeout": 5000},
        )
    )
    assert off.outputs == [RequestedOutput("Y", False)] and off.binary_output is False
    assert off.timeout_us == 5000
    assert decode_infer_request(_body(_inp(data=[1]), outputs=[])).outputs == []


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"id": 5}, "'id' must be a string"),
        ({"parameters": [1]}, "request: 'parameters' must be an object"),
        ({"parameters": {"binary_data_output": 1}}, "'binary_data_output' must be true or false"),
        (
            {"parameters": {"binary_data_output": "true"}},
            "'binary_data_output' must be true or false",
        ),
        ({"outputs": {"name": "Y"}}, "'outputs' must be a list"),
        ({"outputs": ["Y"]}, "each entry of 'outputs' must be an object"),
        ({"outputs": [{"name": "Y"}, {"name": "Y"}]}, "output 'Y' requested twice"),
        (
            {"outputs": [{"name": "Y", "parameters": 1}]},
            "output 'Y': 'parameters' must be an object",
        ),
        (
            {"outputs": [{"name": "Y", "parameters": {"binary_data": 1}}]},
            "output 'Y': 'binary_data' must be true or false",
        ),
    ],
)
def test_request_field_errors(top: dict[str, Any], message: str) -> None:
    assert _error(_body(_inp(data=[1]), **top)) == message


@pytest.mark.parametrize("timeout", [-1, "5", True, 1.5, [1]])
def test_timeout_parameter_must_be_whole_microseconds(timeout: object) -> None:
    assert _error(_body(_inp(data=[1]), parameters={"timeout": timeout})) == (
        "parameter 'timeout' must be a non-negative integer (microseconds)"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1]", "request body must be a JSON object"),
        (b"{}", "'inputs' must be a non-empty list"),
        (b'{"inputs": []}', "'inputs' must be a non-empty list"),
        (b'{"inputs": "abc"}', "'inputs' must be a non-empty list"),
        (b'{"inputs": {"name": "A"}}', "'inputs' must be a non-empty list"),
        (b'{"inputs": [5]}', "each entry of 'inputs' must be an object"),
        (_body(_inp(data=[1]), _inp(data=[2])), "input 'A' already exists in request"),
        (_body(_inp(datatype=5, data=[1])), "input 'A': 'datatype' must be a string"),
        (_body({"name": "A", "shape": [1], "data": [1]}), "input 'A': 'datatype' must be a string"),
        (_body(_inp(parameters=[1], data=[1])), "input 'A': 'parameters' must be an object"),
        (_body(_inp()), "input 'A' has neither 'data' nor 'binary_data_size'"),
    ],
)
def test_input_entry_errors(body: bytes, message: str) -> None:
    assert _error(body) == message


def test_unknown_datatype_names_the_known_ones() -> None:
    assert _error(_body(_inp(datatype="int32", data=[1]))).startswith(
        "unknown datatype 'int32'; expected one of BOOL, UINT8,"
    )


# --- JSON data ----------------------------------------------------------------------------------


def test_scalar_data_is_one_element() -> None:
    np.testing.assert_array_equal(_one(_inp(data=5)), [5])
    assert list(_one(_inp(datatype="BYTES", data="abc"))) == [b"abc"]


def test_bytes_as_json_strings_in_nested_lists() -> None:
    """Strings are UTF-8 encoded and taken in order, however deep the lists nest."""
    array = _one(_inp("S", "BYTES", [2, 3], data=[["a", ["b", "c"]], [[["dé"]], "", "f"]]))
    assert array.shape == (2, 3) and array.dtype == np.object_
    assert array.tolist() == [[b"a", b"b", b"c"], [b"d\xc3\xa9", b"", b"f"]]


@pytest.mark.parametrize(
    ("data", "shape", "message"),
    [
        (["a", "b"], [3], f"input 'S': {UNPARSED} (got 2 elements, shape [3] needs 3)"),
        # refused at the first string past the shape: a huge list costs no more than that
        (["a", "b"], [1], "input 'S': BYTES data holds more than the 1 elements"),
        (["a", 5, {}], [1], "input 'S': BYTES data holds more than the 1 elements"),
        ([["a"], ["b"], ["c"]], [1, 1], "input 'S': BYTES data holds more than the 1 elements"),
        (["a"], [0], "input 'S': BYTES data holds more than the 0 elements"),
        ([1], [1], "input 'S': BYTES data must be strings, got int"),
        (["a", [None]], [2], "input 'S': BYTES data must be strings, got NoneType"),
        ([{"a": 1}], [1], "input 'S': BYTES data must be strings, got dict"),
    ],
)
def test_bytes_json_errors(data: Any, shape: list[int], message: str) -> None:
    assert _error(_body(_inp("S", "BYTES", shape, data=data))) == message


def test_numbers_fill_the_shape_in_order() -> None:
    array = _one(_inp(shape=[3, 2], data=[[1, 2, 3], [4, 5, 6]]))
    assert array.tolist() == [[1, 2], [3, 4], [5, 6]] and array.dtype == np.int32
    assert _error(_body(_inp(shape=[3], data=[1, 2]))) == (
        f"input 'A': {UNPARSED} (got 2 elements, shape [3] needs 3)"
    )
    assert _error(_body(_inp(shape=[1], data=[1, 2]))) == (
        f"input 'A': {UNPARSED} (got 2 elements, shape [1] needs 1)"
    )
    assert _error(_body(_inp(shape=[2, 2], data=[[1, 2], [3]]))).startswith(
        "input 'A': data is ragged or not numeric ("
    )


def test_bool_data_is_true_and_false_only() -> None:
    array = _one(_inp(datatype="BOOL", shape=[3], data=[True, False, True]))
    assert array.tolist() == [True, False, True] and array.dtype == np.bool_
    assert _error(_body(_inp(datatype="BOOL", data=[1]))) == (
        "input 'A': BOOL data must be true/false"
    )
    assert _error(_body(_inp(datatype="BOOL", data=[1.0]))) == (
        "input 'A': BOOL data must be true/false"
    )


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("INT32", [1.0, -2.0, 0.0], [1, -2, 0]),  # whole-number floats are integers
        ("INT8", [-128, 127], [-128, 127]),
        ("INT8", [-128.0, 127.0], [-128, 127]),
        ("UINT8", [0, 255], [0, 255]),
        ("UINT8", [255.0], [255]),
        ("INT16", [-32768, 32767], [-32768, 32767]),
        ("UINT32", [4294967295], [4294967295]),
        ("INT64", [-(2**63), 2**63 - 1], [-(2**63), 2**63 - 1]),
        ("UINT64", [2**64 - 1], [2**64 - 1]),
        ("UINT64", [2**63], [2**63]),
        ("FP32", [1, 2.5], [1.0, 2.5]),
        ("FP64", [1e300, -1], [1e300, -1.0]),
        ("FP16", [65504, 1], [65504.0, 1.0]),
    ],
)
def test_numbers_within_the_exact_limits(
    datatype: str, data: list[Any], expected: list[Any]
) -> None:
    array = _one(_inp(datatype=datatype, shape=[len(data)], data=data))
    assert array.dtype == codec.numpy_dtype(datatype)
    assert array.tolist() == expected


@pytest.mark.filterwarnings("error")  # an overflowing cast must not warn either
@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("INT8", [128], "value out of range for INT8"),
        ("INT8", [-129], "value out of range for INT8"),
        ("INT8", [128.0], "value out of range for INT8"),
        ("INT8", [-129.0, 0], "value out of range for INT8"),
        ("UINT8", [-1], "value out of range for UINT8"),
        ("UINT8", [256], "value out of range for UINT8"),
        ("UINT32", [-1.0], "value out of range for UINT32"),
        ("INT64", [2**63], "value out of range for INT64"),
        ("UINT64", [-1, 2**63], "value out of range for UINT64"),
        ("INT8", [1.5], "INT8 data must be integers"),
        ("INT32", [2, 0.5], "INT32 data must be integers"),
        ("INT32", [True], "INT32 data must be integers, not booleans"),
        ("UINT8", [False], "UINT8 data must be integers, not booleans"),
        ("FP32", [True], "FP32 data must be numbers, not booleans"),
        ("FP32", ["x"], "FP32 data must be numbers"),
        ("INT32", ["1"], "INT32 data must be numbers"),
        ("FP16", [1e10], "value out of range for FP16"),
        ("FP16", [65520], "value out of range for FP16"),
        ("FP32", [1e39], "value out of range for FP32"),
    ],
)
def test_numbers_outside_the_limits(datatype: str, data: list[Any], message: str) -> None:
    assert _error(_body(_inp(datatype=datatype, shape=[len(data)], data=data))) == (
        f"input 'A': {message}"
    )


# --- binary data --------------------------------------------------------------------------------


def test_binary_tensors_fill_the_body_exactly() -> None:
    a = np.array([[1, -2, 3]], np.int32)
    b = np.array([0.5, -1e300], np.float64)
    body, length = _binary_body(
        _bin("A", "INT32", [1, 3], a.tobytes()),
        _bin("B", "FP64", [2], b.tobytes()),
        _bin("C", "BOOL", [2], b"\x01\x00"),
        _bin("S", "BYTES", [2, 2], _prefixed(b"ab", b"", b"\xff", b"")),
    )
    inputs = decode_infer_request(body, length).inputs
    assert inputs["A"].dtype == np.int32 and inputs["A"].tolist() == [[1, -2, 3]]
    assert inputs["B"].dtype == np.float64 and inputs["B"].tolist() == [0.5, -1e300]
    assert inputs["C"].dtype == np.bool_ and inputs["C"].tolist() == [True, False]
    assert inputs["S"].tolist() == [[b"ab", b""], [b"\xff", b""]]


def test_header_length_bounds() -> None:
    body = _body(_inp(data=[3]))
    assert decode_infer_request(body, len(body)).inputs["A"].tolist() == [3]
    assert (
        _error(body, -1)
        == f"Inference-Header-Content-Length -1 is outside the body ({len(body)} bytes)"
    )
    assert _error(body, len(body) + 1) == (
        f"Inference-Header-Content-Length {len(body) + 1} is outside the body ({len(body)} bytes)"
    )
    assert _error(body, 0).startswith("request body is not valid JSON: ")
    assert _error(b"{", None).startswith("request body is not valid JSON: ")


@pytest.mark.parametrize("size", ["12", True, -1, 12.0, None])
def test_binary_data_size_is_a_non_negative_integer(size: object) -> None:
    spec = _inp(shape=[3], parameters={"binary_data_size": size})
    if size is None:
        assert _error(_body(spec)) == "input 'A' has neither 'data' nor 'binary_data_size'"
        return
    header = _body(spec)
    assert _error(header + bytes(12), len(header)) == (
        "input 'A': 'binary_data_size' must be a non-negative integer"
    )


def test_binary_size_errors() -> None:
    header = _body(_inp(shape=[3], parameters={"binary_data_size": 12}, data=[1, 2, 3]))
    assert _error(header + bytes(12), len(header)) == (
        "input 'A': has both 'data' and 'binary_data_size'"
    )
    header = _body(_inp(shape=[3], parameters={"binary_data_size": 12}))
    assert _error(header + bytes(11), len(header)) == (
        "input 'A': binary_data_size 12 overruns the body (11 bytes left)"
    )
    assert _error(header + bytes(16), len(header)) == (
        "binary data sizes add up to 12 bytes but the body carries 16"
    )
    header = _body(_inp(shape=[3], parameters={"binary_data_size": 8}))
    assert _error(header + bytes(8), len(header)) == (
        "input 'A': binary_data_size 8 does not match shape [3] of INT32 (12 bytes)"
    )
    header = _body(
        _inp(shape=[1], parameters={"binary_data_size": 4}),
        _inp("B", shape=[1], data=[1]),
    )
    assert _error(header + bytes(8), len(header)) == (
        "binary data sizes add up to 4 bytes but the body carries 8"
    )


def test_binary_bool_bytes_are_zero_or_one() -> None:
    body, length = _binary_body(_bin("B", "BOOL", [3], b"\x00\x01\x02"))
    assert _error(body, length) == "input 'B': BOOL data must be bytes 0 or 1"
    body, length = _binary_body(_bin("B", "BOOL", [2], b"\x01\x01"))
    assert decode_infer_request(body, length).inputs["B"].tolist() == [True, True]
    body, length = _binary_body(_bin("U", "UINT8", [2], b"\x07\xff"))
    assert decode_infer_request(body, length).inputs["U"].tolist() == [7, 255]


@pytest.mark.parametrize(
    ("shape", "data", "message"),
    [
        ([2], _prefixed(b"a") + b"\0\0\0", "input 'S': truncated BYTES length prefix"),
        (
            [1],
            struct.pack("<I", 99) + b"ab",
            "input 'S': BYTES element length 99 overruns the data",
        ),
        ([1], struct.pack("<I", 3) + b"ab", "input 'S': BYTES element length 3 overruns the data"),
        ([3], _prefixed(b"ab", b"cd"), "input 'S': got 2 BYTES elements, its shape needs 3"),
        (
            [3],
            _prefixed(b"", b"") + bytes(2),
            "input 'S': 10 bytes cannot hold the 3 BYTES elements of its shape",
        ),
        (
            [1],
            _prefixed(b"", b""),
            "input 'S': BYTES data holds more than the 1 elements of its shape",
        ),
        ([0], bytes(4), "input 'S': BYTES data holds more than the 0 elements of its shape"),
    ],
)
def test_binary_bytes_errors(shape: list[int], data: bytes, message: str) -> None:
    body, length = _binary_body(_bin("S", "BYTES", shape, data))
    assert _error(body, length) == message


def test_split_and_join_bytes_are_inverse() -> None:
    """The one framing of BYTES elements: 4-byte little-endian length, then the bytes."""
    array = np.empty(3, dtype=object)
    array[:] = [b"ab", "c\u00e9", b""]
    joined = tensors.join_bytes(array.reshape(3, 1))
    assert joined == b"\x02\0\0\0ab\x03\0\0\0c\xc3\xa9\x00\0\0\0"
    assert tensors.split_bytes(joined, 3, "S").tolist() == [b"ab", b"c\xc3\xa9", b""]
    assert tensors.join_bytes(np.array([7, 8])) == b"\x01\0\0\x007\x01\0\0\x008"


# --- the request header cache -------------------------------------------------------------------


def _cached_pair(**top: Any) -> tuple[bytes, bytes, int]:
    first, length = _binary_body(
        _bin("A", "INT32", [2], np.array([1, 2], np.int32).tobytes()), **top
    )
    second = first[:length] + np.array([3, 4], np.int32).tobytes()
    return first, second, length


def test_repeated_header_is_parsed_once_with_its_defaults(decodes: list[int]) -> None:
    first, second, length = _cached_pair()
    one = decode_infer_request(first, length)
    two = decode_infer_request(second, length)
    assert len(decodes) == 1
    assert two.inputs["A"].tolist() == [3, 4] and two.inputs["A"].dtype == np.int32
    assert one.outputs is None and two.outputs is None
    assert one.binary_output is False and two.binary_output is False
    assert two.id is None and two.parameters == {}


def test_repeated_header_keeps_outputs_and_binary_output(decodes: list[int]) -> None:
    first, second, length = _cached_pair(
        outputs=[{"name": "Y", "parameters": {"binary_data": False}}],
        parameters={"binary_data_output": True, "timeout": 7},
    )
    one = decode_infer_request(first, length)
    two = decode_infer_request(second, length)
    assert len(decodes) == 1
    assert one.binary_output is True and two.binary_output is True
    assert two.outputs == [RequestedOutput("Y", False)] and two.timeout_us == 7


def test_repeated_header_still_checks_bool_bytes(decodes: list[int]) -> None:
    first, length = _binary_body(_bin("B", "BOOL", [2], b"\x01\x00"))
    assert decode_infer_request(first, length).inputs["B"].tolist() == [True, False]
    assert (
        _error(first[:length] + b"\x00\x05", length) == "input 'B': BOOL data must be bytes 0 or 1"
    )
    assert len(decodes) == 1


def test_cache_key_includes_the_element_limit(decodes: list[int]) -> None:
    body, length = _binary_body(_bin("A", "INT32", [1, 4], bytes(16)))
    decode_infer_request(body, length)
    assert _error(body, length, 3) == "input 'A': shape [1, 4] is too large (limit 3)"
    assert len(decodes) == 2


def _header_of_length(target: int) -> bytes:
    spec = {"name": "A", "datatype": "INT32", "shape": [1], "parameters": {"binary_data_size": 4}}
    header = json.dumps({"inputs": [spec], "parameters": {"pad": ""}}).encode()
    pad = target - len(header)
    header = json.dumps({"inputs": [spec], "parameters": {"pad": "p" * pad}}).encode()
    assert len(header) == target
    return header


@pytest.mark.parametrize(("header_bytes", "cached"), [(4096, True), (4097, False), (200, True)])
def test_only_headers_up_to_4096_bytes_are_cached(
    decodes: list[int], header_bytes: int, cached: bool
) -> None:
    header = _header_of_length(header_bytes)
    for value in (5, 6):
        request = decode_infer_request(header + struct.pack("<i", value), len(header))
        assert request.inputs["A"].tolist() == [value]
    assert len(decodes) == (1 if cached else 2)
    assert len(codec._TEMPLATES) == (1 if cached else 0)


def test_what_is_never_cached(decodes: list[int]) -> None:
    """Bodies without binary data after the header, BYTES (split per request), ids, JSON data
    and bodies that are not ``bytes``: each decode parses the header again."""
    empty = _body(_inp(shape=[0], parameters={"binary_data_size": 0}))
    strings, slength = _binary_body(_bin("S", "BYTES", [2], _prefixed(b"x", b"yz")))
    with_id, ilength = _binary_body(_bin("A", "INT32", [1], bytes(4)), id="r")
    first, _, length = _cached_pair()
    for _ in range(2):
        assert decode_infer_request(empty, len(empty)).inputs["A"].shape == (0,)
        assert decode_infer_request(strings, slength).inputs["S"].tolist() == [b"x", b"yz"]
        assert decode_infer_request(with_id, ilength).id == "r"
        assert decode_infer_request(bytearray(first), length).inputs["A"].tolist() == [1, 2]
    assert len(decodes) == 8 and codec._TEMPLATES == {}


def test_request_cache_starts_over_when_full(decodes: list[int]) -> None:
    for width in range(1, codec._TEMPLATES_MAX + 1):
        body, length = _binary_body(_bin("A", "INT8", [width], bytes(width)))
        decode_infer_request(body, length)
    assert len(codec._TEMPLATES) == codec._TEMPLATES_MAX
    body, length = _binary_body(_bin("B", "INT8", [1], b"\x01"))
    decode_infer_request(body, length)
    assert len(codec._TEMPLATES) == 1


# --- encoding responses -------------------------------------------------------------------------


def _split(body: bytes, length: int | None) -> tuple[dict[str, Any], bytes]:
    if length is None:
        return json.loads(body), b""
    return json.loads(body[:length]), body[length:]


def test_json_is_the_default_for_responses() -> None:
    out = np.array([[1, 2], [3, 4]], np.uint16)
    body, length = encode_infer_response(InferResponse("m", "2", {"Y": out}))
    assert length is None
    assert json.loads(body) == {
        "model_name": "m",
        "model_version": "2",
        "outputs": [{"name": "Y", "datatype": "UINT16", "shape": [2, 2], "data": [1, 2, 3, 4]}],
    }


def test_json_values_of_every_kind() -> None:
    strings = np.empty(3, dtype=object)
    strings[:] = [b"ok", b"\xffx", "str"]
    outputs = {
        "obj": strings,
        "uni": np.array([["a", "b\u00e9"]]),
        "raw": np.array([b"s", b"t"]),
        "flags": np.array([True, False]),
        "f32": np.array([0.5, -2.0], np.float32),
        "u64": np.array([2**64 - 1], np.uint64),
        "scalar": np.array(3, np.int8),
    }
    body, length = encode_infer_response(
        InferResponse("m", "1", outputs, id="q", parameters={"p": 1})
    )
    header, rest = _split(body, length)
    assert rest == b"" and header["id"] == "q" and header["parameters"] == {"p": 1}
    got = {o["name"]: (o["datatype"], o["shape"], o["data"]) for o in header["outputs"]}
    assert got == {
        "obj": ("BYTES", [3], ["ok", "\ufffdx", "str"]),
        "uni": ("BYTES", [1, 2], ["a", "b\u00e9"]),
        "raw": ("BYTES", [2], ["s", "t"]),
        "flags": ("BOOL", [2], [True, False]),
        "f32": ("FP32", [2], [0.5, -2.0]),
        "u64": ("UINT64", [1], [2**64 - 1]),
        "scalar": ("INT8", [], [3]),
    }


def test_binary_bytes_outputs_are_length_prefixed() -> None:
    """BYTES never take the cached all-binary path: each element is framed, in both encoders."""
    strings = np.empty((2, 1), dtype=object)
    strings[:, 0] = [b"ab", "c\u00e9"]
    framed = _prefixed(b"ab", b"c\xc3\xa9")
    for parameters in ({}, {"x": 1}):
        body, length = encode_infer_response(
            InferResponse("m", "1", {"S": strings}, parameters=parameters), None, True
        )
        header, rest = _split(body, length)
        assert header["outputs"] == [
            {
                "name": "S",
                "datatype": "BYTES",
                "shape": [2, 1],
                "parameters": {"binary_data_size": len(framed)},
            }
        ]
        assert rest == framed


def test_requested_binary_overrides_the_default_per_output() -> None:
    a = np.array([1.5], np.float32)
    b = np.array([2, 3], np.int64)
    response = InferResponse("m", "1", {"A": a, "B": b})
    for default in (False, True):
        requested = [RequestedOutput("A", True), RequestedOutput("B", False)]
        body, length = encode_infer_response(response, requested, default)
        header, rest = _split(body, length)
        assert header["outputs"] == [
            {"name": "A", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}},
            {"name": "B", "datatype": "INT64", "shape": [2], "data": [2, 3]},
        ]
        assert "id" not in header and rest == a.tobytes()
    for default in (False, True):  # a listed output without binary_data is JSON (Triton)
        body, length = encode_infer_response(response, [RequestedOutput("A", None)], default)
        assert length is None and json.loads(body)["outputs"][0]["data"] == [1.5]
    body, length = encode_infer_response(response, None, True)  # none listed: the default
    header, rest = _split(body, length)
    assert rest == a.tobytes() + b.tobytes()


@pytest.fixture
def heads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Records each output header the encoder builds (a cached one is not built again)."""
    built: list[str] = []
    real: Callable[[np.ndarray[Any, Any]], str] = codec.datatype_of

    def recording(array: np.ndarray[Any, Any]) -> str:
        built.append(real(array))
        return built[-1]

    monkeypatch.setattr(codec, "datatype_of", recording)
    codec._HEADS.clear()
    yield built
    codec._HEADS.clear()


def test_all_binary_response_headers_are_built_once(heads: list[str]) -> None:
    out = np.zeros((2, 2), np.float32)
    for requested, default in (
        (None, True),
        ([RequestedOutput("Y", True)], False),
        ([RequestedOutput("Y", True)], True),
        (None, True),
    ):
        body, length = encode_infer_response(
            InferResponse("m", "1", {"Y": out}), requested, default
        )
        header, rest = _split(body, length)
        assert header["outputs"][0]["parameters"] == {"binary_data_size": 16}
        assert rest == out.tobytes()
    assert heads == ["FP32"] and len(codec._HEADS) == 1


def test_a_cached_header_matches_model_version_dtype_and_shape(heads: list[str]) -> None:
    """Responses that differ in any of these get their own header, never another's."""
    cases = [
        ("m", "1", np.zeros((2, 3), np.float32)),
        ("m", "1", np.zeros((3, 2), np.float32)),
        ("m", "1", np.zeros((2, 3), np.int32)),
        ("m", "2", np.zeros((2, 3), np.float32)),
        ("n", "1", np.zeros((2, 3), np.float32)),
    ]
    for _ in range(2):
        for model, version, array in cases:
            body, length = encode_infer_response(
                InferResponse(model, version, {"Y": array}), None, True
            )
            header, rest = _split(body, length)
            assert header == {
                "model_name": model,
                "model_version": version,
                "outputs": [
                    {
                        "name": "Y",
                        "datatype": datatype_of(array),
                        "shape": list(array.shape),
                        "parameters": {"binary_data_size": array.nbytes},
                    }
                ],
            }
            assert rest == array.tobytes()
    assert len(heads) == len(cases) == len(codec._HEADS)


def test_response_parameters_or_a_json_output_skip_the_cache(heads: list[str]) -> None:
    out = np.ones(2, np.int8)
    encode_infer_response(InferResponse("m", "1", {"Y": out}, parameters={"x": 1}), None, True)
    encode_infer_response(
        InferResponse("m", "1", {"Y": out, "Z": out}), [RequestedOutput("Z", False)], True
    )
    encode_infer_response(InferResponse("m", "1", {"Y": out}), None, False)
    assert codec._HEADS == {}


def test_response_header_cache_starts_over_when_full(heads: list[str]) -> None:
    for width in range(codec._TEMPLATES_MAX):
        encode_infer_response(InferResponse("m", "1", {"Y": np.zeros(width, np.int8)}), None, True)
    assert len(codec._HEADS) == codec._TEMPLATES_MAX
    encode_infer_response(InferResponse("m", "1", {"Y": np.zeros(1, np.int16)}), None, True)
    assert len(codec._HEADS) == 1


def test_a_decoded_request_round_trips_through_the_encoder() -> None:
    """What the codec writes as a binary response reads back as a binary request."""
    strings = np.empty(2, dtype=object)
    strings[:] = [b"", b"xyz"]
    outputs = {"S": strings, "F": np.array([[1.25, -3.5]], np.float16)}
    body, length = encode_infer_response(InferResponse("m", "1", outputs), None, True)
    assert length is not None
    header = json.loads(body[:length])
    request_header = json.dumps(
        {
            "inputs": [
                {k: o[k] for k in ("name", "datatype", "shape", "parameters")}
                for o in header["outputs"]
            ]
        }
    ).encode()
    request: InferRequest = decode_infer_request(
        request_header + body[length:], len(request_header)
    )
    assert request.inputs["S"].tolist() == [b"", b"xyz"]
    assert request.inputs["F"].dtype == np.float16
    assert request.inputs["F"].tolist() == [[1.25, -3.5]]


# -- integers numpy would round, and numpy string outputs (found while pinning) -------------------


@pytest.mark.parametrize(
    ("data", "datatype", "expected"),
    [
        ([0, 18446744073709551615], "UINT64", [0, 18446744073709551615]),
        ([1, 2**63 + 1], "UINT64", [1, 2**63 + 1]),
        ([0.0, 9223372036854775807], "INT64", [0, 9223372036854775807]),
        ([1.0, 2.0], "INT32", [1, 2]),
    ],
)
def test_integers_beyond_float_precision_are_exact(
    data: list[Any], datatype: str, expected: list[int]
) -> None:
    body = {"inputs": [{"name": "x", "datatype": datatype, "shape": [len(data)], "data": data}]}
    assert decode_infer_request(json.dumps(body).encode()).inputs["x"].tolist() == expected


@pytest.mark.parametrize(
    ("text", "datatype"),
    [
        ("[9223372036854775808.0]", "INT64"),  # 2**63: rounded in float64 it wrapped to -2**63
        ("[18446744073709551616]", "UINT64"),  # 2**64: orjson reads it as a float; wrapped to 0
        ("[-1, 18446744073709551615]", "UINT64"),
    ],
)
def test_integers_out_of_range_are_refused_exactly(text: str, datatype: str) -> None:
    body = b'{"inputs": [{"name": "x", "datatype": "%s", "shape": [%d], "data": %s}]}' % (
        datatype.encode(),
        text.count(",") + 1,
        text.encode(),
    )
    with pytest.raises(InvalidInput, match=f"value out of range for {datatype}"):
        decode_infer_request(body)


def test_numpy_string_outputs_are_length_prefixed_when_binary() -> None:
    response = InferResponse("m", "1", {"T": np.array(["ab", "c"])})
    body, length = encode_infer_response(response, binary_default=True)
    assert length is not None
    header = json.loads(body[:length])
    assert header["outputs"][0]["datatype"] == "BYTES"
    assert body[length:] == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([True, 2.0], "INT32 data must be integers, not booleans"),
        ([2.0, False], "INT32 data must be integers, not booleans"),
        ([1.0, 2.5], "INT32 data must be integers"),
        ([[1.0], [2**31 + 0.0]], "value out of range for INT32"),
        ([-(2**31) - 1.0, 0.0], "value out of range for INT32"),
    ],
)
def test_floats_for_integers_are_checked_one_by_one(data: list[Any], message: str) -> None:
    body = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [2], "data": data}]}
    with pytest.raises(InvalidInput) as caught:
        decode_infer_request(json.dumps(body).encode())
    assert str(caught.value) == f"input 'x': {message}"


def test_floats_at_the_integer_limits_are_exact() -> None:
    body = {
        "inputs": [
            {"name": "x", "datatype": "INT32", "shape": [2], "data": [-(2**31) + 0.0, 2**31 - 1.0]}
        ]
    }
    array = decode_infer_request(json.dumps(body).encode()).inputs["x"]
    assert array.dtype == np.int32 and array.tolist() == [-(2**31), 2**31 - 1]
    empty = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [0], "data": []}]}
    assert decode_infer_request(json.dumps(empty).encode()).inputs["x"].dtype == np.int32


def test_nested_floats_for_integers_keep_their_order() -> None:
    data = [[1.0, 2.0], [3.0, 4.0]]
    body = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [2, 2], "data": data}]}
    assert decode_infer_request(json.dumps(body).encode()).inputs["x"].tolist() == [[1, 2], [3, 4]]


def _shm(name: str, region: str, size: int, **params: Any) -> dict[str, Any]:
    ref = {"shared_memory_region": region, "shared_memory_byte_size": size, **params}
    return _inp(name, shape=[1, 4], parameters=ref)


def test_a_repeated_shared_memory_body_is_parsed_once(decodes: list[int]) -> None:
    """perf_analyzer and tritonclient send the same JSON body, naming the same regions, with
    every shared-memory request: it is checked once, and each decode gets its own request."""
    out = {"name": "Y", "parameters": {"shared_memory_region": "o", "shared_memory_byte_size": 16}}
    body = _body(_shm("A", "i", 16), _shm("B", "i", 16, shared_memory_offset=16), outputs=[out])
    one = decode_infer_request(body)
    two = decode_infer_request(body, len(body))  # a header length of the whole body: the same
    assert len(decodes) == 1
    for request in (one, two):
        assert request.inputs == {}
        assert request.shared_inputs == {
            "A": SharedInput("INT32", (1, 4), SharedMemoryRef("i", 16)),
            "B": SharedInput("INT32", (1, 4), SharedMemoryRef("i", 16, 16)),
        }
        assert request.outputs == [RequestedOutput("Y", None, SharedMemoryRef("o", 16))]
    assert one.shared_inputs is not two.shared_inputs and one.outputs is not two.outputs
    one.inputs["A"] = np.zeros(4)  # what the data plane does on resolving: not seen by the next
    assert decode_infer_request(body).inputs == {} and len(decodes) == 1


def test_what_shared_memory_bodies_are_never_cached(decodes: list[int]) -> None:
    """An id, an input with JSON data beside one in shared memory, a body over 4096 bytes: each
    parsed again; a header length past a cached body's end is still refused."""
    with_id = _body(_shm("A", "i", 16), id="r")
    mixed = _body(_shm("A", "i", 16), _inp("B", data=[1]))
    big = _body(_shm("A", "i" * 4100, 16))
    for _ in range(2):
        assert decode_infer_request(with_id).id == "r"
        assert decode_infer_request(mixed).inputs["B"].tolist() == [1]
        assert list(decode_infer_request(big).shared_inputs) == ["A"]
    assert len(decodes) == 6 and codec._TEMPLATES == {}
    body = _body(_shm("A", "i", 16))
    decode_infer_request(body)
    assert len(codec._TEMPLATES) == 1
    assert _error(body, len(body) + 1) == (
        f"Inference-Header-Content-Length {len(body) + 1} is outside the body ({len(body)} bytes)"
    )
    assert _error(body, 0).startswith("request body is not valid JSON")


def _with_id(id_json: bytes, header: bytes) -> bytes:
    """``header`` (a JSON object) with ``"id":<id_json>`` as its first member, compact as
    perf_analyzer writes it."""
    assert header.startswith(b"{")
    return b'{"id":' + id_json + b"," + header[1:]


def test_a_leading_id_is_left_out_of_the_cache_key(decodes: list[int]) -> None:
    """perf_analyzer sends ``{"id":"",...`` with every request, binary or in shared memory, and
    tritonclient ``{"id": "7", ...`` when given an id: the rest of the header is parsed once,
    and each request keeps its own id."""
    first, length = _binary_body(_bin("A", "INT32", [2], np.array([1, 2], np.int32).tobytes()))
    header = first[:length]
    for n, rid in enumerate(["", "", "r-1", "é"]):
        head = _with_id(json.dumps(rid, ensure_ascii=False).encode(), header)  # é: raw UTF-8
        request = decode_infer_request(head + np.array([n, 9], np.int32).tobytes(), len(head))
        assert request.id == rid and request.inputs["A"].tolist() == [n, 9]
    for rid in ("7", "8"):  # JSON's whitespace around the id (a key of its own: ", " after)
        spaced = b'{ "id" :\t"' + rid.encode() + b'", ' + header[1:]
        assert decode_infer_request(spaced + bytes(8), len(spaced)).id == rid
    shm = _body(_shm("A", "i", 16))
    for rid in ("", "x"):
        request = decode_infer_request(_with_id(f'"{rid}"'.encode(), shm))
        assert request.id == rid and list(request.shared_inputs) == ["A"]
    assert len(decodes) == 3  # two binary headers, one shared-memory body
    assert decode_infer_request(first, length).id is None and len(decodes) == 4  # its own key


def test_ids_the_cache_never_takes(decodes: list[int]) -> None:
    """An id with escapes, not a string, not first, or named twice: parsed every time, with the
    answers of a full parse; a body the parser refuses is refused even when the rest of its
    header is cached."""
    header = _body(_shm("A", "i", 16))
    decode_infer_request(_with_id(b'"warm"', header))
    assert len(decodes) == 1
    assert decode_infer_request(_with_id(b'"a\\"b"', header)).id == 'a"b'
    assert decode_infer_request(_with_id(b'"\\u0041"', header)).id == "A"
    assert _error(_with_id(b"5", header)) == "'id' must be a string"
    twice = header[:-1] + b', "id": "last"}'
    assert decode_infer_request(_with_id(b'"first"', twice)).id == "last"
    assert decode_infer_request(_with_id(b'"other"', twice)).id == "last"
    assert decode_infer_request(_with_id(b'"last"', twice)).id == "last"  # the same id twice
    assert decode_infer_request(_with_id(b'"other"', twice)).id == "last"
    assert decode_infer_request(header[:-1] + b', "id": "z"}').id == "z"
    assert len(decodes) == 9
    for refused in (
        _with_id(b'"\xff"', header),  # not UTF-8
        _with_id(b'"a\x01"', header),  # a control character inside a string
        b'{\x0c"id":"a",' + header[1:],  # not JSON whitespace
    ):
        assert _error(refused).startswith("request body is not valid JSON")
    assert len(decodes) == 12
