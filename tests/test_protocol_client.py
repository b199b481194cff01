"""The v2 client codec (``gateway.protocol.client``) as pure functions: what the gateway sends
to other v2 hosts and how it reads their answers. A host's answer is checked as strictly as a
client's request: anything malformed is ``Unavailable`` naming the host, never another error,
and nothing is allocated that the body's size does not allow."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.errors import Unavailable
from gateway.protocol import InferResponse, RequestedOutput, decode_infer_request
from gateway.protocol import encode_infer_response as server_encode
from gateway.protocol.client import decode_response, encode_request, error_message

HOST = "h1"


def answer(outputs: list[dict[str, Any]], *blobs: bytes) -> tuple[bytes, int]:
    head = json.dumps({"model_name": "m", "outputs": outputs}).encode()
    return head + b"".join(blobs), len(head)


def binary(name: str, datatype: str, shape: list[int], size: int) -> dict[str, Any]:
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape,
        "parameters": {"binary_data_size": size},
    }


def test_request_is_what_the_server_codec_reads() -> None:
    """The two codecs agree: the gateway's request to a host is the request a gateway decodes."""
    inputs = {
        "A": np.arange(6, dtype=np.float32).reshape(2, 3),
        "S": np.array([b"hi", "h\u00e9", b""], dtype=object),
        "B": np.array([True, False]),
    }
    body, length = encode_request(inputs, ["Y", "Z"], timeout_s=0.25)
    request = decode_infer_request(body, length)
    np.testing.assert_array_equal(request.inputs["A"], inputs["A"])
    assert list(request.inputs["S"]) == [b"hi", "h\u00e9".encode(), b""]
    np.testing.assert_array_equal(request.inputs["B"], inputs["B"])
    assert request.outputs == [RequestedOutput("Y", True), RequestedOutput("Z", True)]
    assert request.timeout_us == 250_000


def test_a_tiny_timeout_still_travels() -> None:
    body, length = encode_request({"A": np.zeros(1, np.int8)}, [], timeout_s=1e-9)
    assert decode_infer_request(body, length).timeout_us == 1
    body, length = encode_request({"A": np.zeros(1, np.int8)}, [])
    assert "parameters" not in json.loads(body[:length])


dtypes = st.sampled_from(
    [np.int8, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_]
)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)), st.booleans())
def test_server_answers_decode_to_the_same_tensors(array: np.ndarray, as_binary: bool) -> None:
    """Whatever a gateway host encodes, JSON or binary, decodes to the same tensor here."""
    if array.dtype.kind == "f":
        array = np.nan_to_num(array, posinf=1, neginf=-1)
    body, length = server_encode(
        InferResponse("m", "1", {"T": array}), [RequestedOutput("T", as_binary)]
    )
    out = decode_response(body, None if length is None else str(length), HOST)
    np.testing.assert_array_equal(out["T"], array)
    assert out["T"].dtype == array.dtype and out["T"].shape == array.shape


def test_bytes_outputs_both_ways_and_binary_arrays_are_writable_copies() -> None:
    strings = np.array([[b"a", b""], [b"\xff\x00", b"xyz"]], dtype=object)
    for as_binary in (True, False):
        body, length = server_encode(
            InferResponse("m", "1", {"S": strings, "F": np.ones((2, 2), np.float32)}),
            binary_default=as_binary,
        )
        out = decode_response(body, length, HOST)
        assert out["S"].shape == (2, 2)
        if as_binary:
            assert out["S"].tolist() == strings.tolist()
            out["F"][0, 0] = 5  # a copy: writable, and the body is untouched
            assert out["F"][0, 0] == 5


MALFORMED: list[tuple[str, bytes, str | int | None, str]] = [
    ("not json", b"<html>502</html>", None, "not JSON"),
    ("not an object", b"[1, 2]", None, "no 'outputs' list"),
    ("no outputs", b'{"model_name": "m"}', None, "no 'outputs' list"),
    ("outputs not a list", b'{"outputs": {"Y": 1}}', None, "no 'outputs' list"),
    ("entry not an object", b'{"outputs": [1]}', None, "not an object"),
    ("no name", b'{"outputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}', None, "name"),
    (
        "twice",
        b'{"outputs": [{"name": "Y", "datatype": "FP32", "shape": [1], "data": [1]},'
        b' {"name": "Y", "datatype": "FP32", "shape": [1], "data": [2]}]}',
        None,
        "output 'Y' given twice",
    ),
    (
        "unknown datatype",
        b'{"outputs": [{"name": "Y", "datatype": "FP8", "shape": [1], "data": [1]}]}',
        None,
        "output 'Y': unknown datatype",
    ),
    (
        "datatype not a string",
        b'{"outputs": [{"name": "Y", "datatype": 3, "shape": [1], "data": [1]}]}',
        None,
        "output 'Y': 'datatype'",
    ),
    (
        "negative dim",
        b'{"outputs": [{"name": "Y", "datatype": "FP32", "shape": [-1], "data": [1]}]}',
        None,
        "output 'Y': shape [-1]",
    ),
    (
        "float dim",
        b'{"outputs": [{"name": "Y", "datatype": "FP32", "shape": [1.0], "data": [1]}]}',
        None,
        "output 'Y': shape",
    ),
    (
        "huge shape over json",
        b'{"outputs": [{"name": "Y", "datatype": "FP32", "shape": [1099511627776], "data": [1]}]}',
        None,
        "too large",
    ),
    (
        "json count",
        b'{"outputs": [{"name": "Y", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}',
        None,
        "output 'Y': Unable to parse 'data': Shape does not match",
    ),
    (
        "json range",
        b'{"outputs": [{"name": "Y", "datatype": "INT8", "shape": [1], "data": [300]}]}',
        None,
        "out of range",
    ),
    (
        "json bytes not strings",
        b'{"outputs": [{"name": "Y", "datatype": "BYTES", "shape": [1], "data": [{}]}]}',
        None,
        "must be strings",
    ),
    (
        "neither",
        b'{"outputs": [{"name": "Y", "datatype": "FP32", "shape": [1]}]}',
        None,
        "neither 'data' nor 'binary_data_size'",
    ),
    (
        "parameters not an object",
        b'{"outputs": [{"name": "Y", "datatype": "FP32", "shape": [1], "parameters": [1]}]}',
        None,
        "'parameters' must be an object",
    ),
]


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [pytest.param(b, h, m, id=i) for i, b, h, m in MALFORMED],
)
def test_malformed_json_answers(body: bytes, header_length: str | None, message: str) -> None:
    with pytest.raises(Unavailable) as caught:
        decode_response(body, header_length, HOST)
    assert caught.value.message.startswith(f"host {HOST} sent a malformed response: ")
    assert message in caught.value.message
    assert caught.value.retry_after_s == 1.0


def _binary_cases() -> list[Any]:
    four = np.arange(4, dtype=np.int32).tobytes()
    cases: list[tuple[str, tuple[bytes, int], str]] = [
        ("size lie", answer([binary("Y", "INT32", [4], 64)], four), "overruns the body"),
        ("size vs shape", answer([binary("Y", "INT32", [2], 16)], four), "does not match shape"),
        ("trailing bytes", answer([binary("Y", "INT32", [4], 16)], four, b"x"), "add up to 16"),
        ("negative size", answer([binary("Y", "INT32", [4], -16)], four), "non-negative"),
        ("bool size", answer([binary("Y", "INT32", [4], True)], four), "non-negative"),
        # a shape of 2**27 floats over a 16-byte body: refused before anything is allocated
        ("huge shape", answer([binary("Y", "FP32", [1 << 27], 16)], four), "does not match"),
        ("huge dims", answer([binary("Y", "FP32", [1 << 40, 0], 0)]), "too large"),
        ("bool byte", answer([binary("Y", "BOOL", [2], 2)], b"\x01\x02"), "bytes 0 or 1"),
        (
            "bytes count",
            answer([binary("Y", "BYTES", [1 << 26], 8)], bytes(8)),
            "cannot hold the 67108864 BYTES elements",
        ),
        (
            "bytes element overrun",
            answer([binary("Y", "BYTES", [1], 6)], struct.pack("<I", 1 << 30) + b"ab"),
            "output 'Y': BYTES element length 1073741824 overruns",
        ),
        (
            "bytes extra element",
            answer([binary("Y", "BYTES", [1], 10)], (struct.pack("<I", 1) + b"a") * 2),
            "more than the 1 elements",
        ),
    ]
    return [pytest.param(body, length, message, id=name) for name, (body, length), message in cases]


@pytest.mark.parametrize(("body", "header_length", "message"), _binary_cases())
def test_malformed_binary_answers(body: bytes, header_length: int, message: str) -> None:
    with pytest.raises(Unavailable, match=f"^host {HOST} sent a malformed response: .*{message}"):
        decode_response(body, str(header_length), HOST)


@pytest.mark.parametrize("value", ["", "12a", "-1", " 5", "+5", "1_0", "\u0661", "0", "999999"])
def test_header_length_must_be_a_byte_count_inside_the_body(value: str) -> None:
    body, _ = answer([{"name": "Y", "datatype": "FP32", "shape": [1], "data": [1]}])
    with pytest.raises(Unavailable, match="Inference-Header-Content-Length"):
        decode_response(body, value, HOST)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(-5, 400).map(str), st.text()))
def test_garbage_is_only_ever_unavailable(body: bytes, header_length: str | None) -> None:
    try:
        decode_response(body, header_length, HOST)
    except Unavailable as exc:
        assert exc.message.startswith(f"host {HOST} ")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corrupted_answers_are_only_ever_unavailable(data: st.DataObject) -> None:
    """A valid binary answer with bytes changed (sizes, shapes, lengths): an error or a decode
    that stays within the body, never another exception."""
    strings = np.array([b"ab", b"", b"c"], dtype=object)
    body, length = server_encode(
        InferResponse("m", "1", {"S": strings, "F": np.ones((2, 3), np.float32)}),
        binary_default=True,
    )
    assert length is not None
    edited = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(edited) - 1))
        edited[at] = data.draw(st.sampled_from(b'0129[]{}",:-e\xff\x00'))
    try:
        out = decode_response(bytes(edited), length, HOST)
    except Unavailable:
        return
    assert sum(a.size for a in out.values()) <= len(body)


def test_error_message() -> None:
    assert error_message(b'{"error": "model not found"}') == "model not found"
    assert error_message(b'{"detail": 1}') == "{'detail': 1}"
    assert error_message(b"<html>" + b"x" * 500) == ("<html>" + "x" * 500)[:200]
    assert len(error_message(json.dumps({"error": "e" * 5000}).encode())) == 1024
