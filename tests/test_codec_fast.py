"""The JSON decoder's short cuts for the usual request (flat lists of numbers, no parameters)
give the same tensors and the same errors as the long way: long lists, nested lists and short
flat lists are checked alike, whichever side of each cut a value falls."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest

from gateway.errors import InvalidInput, Unavailable
from gateway.pending import validate
from gateway.protocol import InferRequest, codec, decode_infer_request
from gateway.protocol import client as client_codec
from gateway.protocol.client import decode_response
from gateway.repository.config import ModelConfig, TensorConfig


def _decode(datatype: str, shape: list[int], data: Any, **extra: Any) -> np.ndarray[Any, Any]:
    spec = {"name": "x", "datatype": datatype, "shape": shape, "data": data, **extra}
    return decode_infer_request(json.dumps({"inputs": [spec]}).encode()).inputs["x"]


def _error(datatype: str, shape: list[int], data: Any, **extra: Any) -> str:
    with pytest.raises(InvalidInput) as info:
        _decode(datatype, shape, data, **extra)
    return str(info.value)


def _layouts(values: list[Any]) -> list[tuple[list[int], Any]]:
    """The same values as a flat list and as rows of ten (a nested list)."""
    rows = [values[i : i + 10] for i in range(0, len(values), 10)]
    return [([len(values)], values), ([len(rows), 10], rows)]


# Each side of the cut between Python's and numpy's min/max (LONG: whole rows of ten).
SHORT, LONG = 10, (codec._SMALL // 10 + 2) * 10


@pytest.mark.parametrize("size", [SHORT, LONG])
@pytest.mark.parametrize("where", [0, 5, -1])
@pytest.mark.parametrize(
    ("datatype", "bad"),
    [
        ("INT8", 128),
        ("INT8", -129),
        ("UINT8", -1),
        ("UINT16", 65536),
        ("INT32", 2**31),
        ("INT32", -(2**31) - 1),
        ("UINT32", 2**32),
        ("INT64", 2**63),
        ("UINT64", -1),
    ],
)
def test_integers_out_of_range_anywhere_in_any_list(
    size: int, where: int, datatype: str, bad: int
) -> None:
    values: list[Any] = [1] * size
    values[where] = bad
    for shape, data in _layouts(values):
        assert _error(datatype, shape, data) == f"input 'x': value out of range for {datatype}"


@pytest.mark.parametrize("size", [SHORT, LONG])
@pytest.mark.parametrize(
    ("datatype", "low", "high"),
    [
        ("INT8", -128, 127),
        ("UINT8", 0, 255),
        ("INT16", -(2**15), 2**15 - 1),
        ("UINT16", 0, 2**16 - 1),
        ("INT32", -(2**31), 2**31 - 1),
        ("UINT32", 0, 2**32 - 1),
        ("INT64", -(2**63), 2**63 - 1),
        ("UINT64", 0, 2**64 - 1),
    ],
)
def test_integers_at_the_limits_in_any_list(size: int, datatype: str, low: int, high: int) -> None:
    values = [low, high, *range(size - 2)]
    for shape, data in _layouts(values):
        array = _decode(datatype, shape, data)
        assert array.dtype == codec.numpy_dtype(datatype)
        assert array.reshape(-1).tolist() == values


@pytest.mark.parametrize("size", [SHORT, LONG])
@pytest.mark.parametrize("bad", [1e39, -1e39, 3.41e38, -3.41e38])
def test_fp32_overflow_anywhere_in_any_list(size: int, bad: float) -> None:
    for where in (0, -1):
        values: list[Any] = [0.5] * size
        values[where] = bad
        for shape, data in _layouts(values):
            assert _error("FP32", shape, data) == "input 'x': value out of range for FP32"


@pytest.mark.parametrize("size", [SHORT, LONG])
def test_fp32_near_its_largest_value_is_kept(size: int) -> None:
    largest = float(np.finfo(np.float32).max)
    values = [largest, -largest, 3.4e38, -3.4e38] + [0.25] * (size - 4)
    for shape, data in _layouts(values):
        array = _decode("FP32", shape, data)
        assert array.dtype == np.float32
        assert array.reshape(-1).tolist() == np.array(values, np.float32).tolist()


@pytest.mark.filterwarnings("error")  # a cast that overflows must not warn
@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("FP32", [2**63 - 1, -(2**63)], [2.0**63, -(2.0**63)]),  # integers: FP32 holds them all
        ("FP64", [2**64 - 1, 0], [2.0**64, 0.0]),
        ("FP32", [1, 2], [1.0, 2.0]),
    ],
)
def test_integers_for_floats(datatype: str, data: list[int], expected: list[float]) -> None:
    array = _decode(datatype, [len(data)], data)
    assert array.dtype == codec.numpy_dtype(datatype) and array.tolist() == expected


@pytest.mark.filterwarnings("error")
def test_integers_for_fp16_are_checked() -> None:
    assert _decode("FP16", [2], [65504, -65504]).tolist() == [65504.0, -65504.0]
    assert _error("FP16", [2], [1, 65520]) == "input 'x': value out of range for FP16"


def test_integer_tensor_of_its_own_type_is_the_parsed_array() -> None:
    array = _decode("INT64", [1, 3], [5, -6, 7])
    assert array.dtype == np.int64 and array.tolist() == [[5, -6, 7]]


def test_null_parameters_are_refused_as_before() -> None:
    """``"parameters": null`` is not the same as no parameters."""
    assert _error("INT32", [1], [1], parameters=None) == (
        "input 'x': 'parameters' must be an object"
    )
    assert _decode("INT32", [1], [1], parameters={}).tolist() == [1]


def test_request_parameters_and_outputs_null_or_absent() -> None:
    """Absent, ``{}`` and ``null`` are three cases: only ``null`` parameters are refused."""
    body = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1]}]}
    plain = decode_infer_request(json.dumps(body).encode())
    assert plain.parameters == {} and plain.binary_output is False and plain.outputs is None
    empty = decode_infer_request(json.dumps({**body, "parameters": {}, "outputs": None}).encode())
    assert empty.parameters == {} and empty.outputs is None
    with pytest.raises(InvalidInput, match=r"^request: 'parameters' must be an object$"):
        decode_infer_request(json.dumps({**body, "parameters": None}).encode())
    with pytest.raises(InvalidInput, match=r"^'binary_data_output' must be true or false$"):
        decode_infer_request(json.dumps({**body, "parameters": {"binary_data_output": 1}}).encode())
    with pytest.raises(InvalidInput, match=r"^'outputs' must be a list$"):
        decode_infer_request(json.dumps({**body, "outputs": {}}).encode())


# --- a request against its model's config -----------------------------------------------------


def _config() -> ModelConfig:
    return ModelConfig(
        name="m",
        max_batch_size=4,
        inputs=(
            TensorConfig("A", "INT32", (2,)),
            TensorConfig("B", "INT32", (2,)),
            TensorConfig("C", "INT32", (2,), optional=True),
        ),
        outputs=(TensorConfig("Y", "INT32", (2,)),),
    )


def _request(*names: str) -> InferRequest:
    return InferRequest({name: np.zeros((1, 2), np.int32) for name in names})


def test_every_input_given_or_only_optional_ones_left_out() -> None:
    for names in (("A", "B", "C"), ("C", "B", "A"), ("A", "B"), ("B", "A")):
        prepared, rows = validate(_config(), _request(*names))
        assert list(prepared) == list(names) and rows == 1


@pytest.mark.parametrize(
    ("names", "missing"), [(("A", "C"), "['B']"), (("C",), "['A','B']"), (("B",), "['A']")]
)
def test_a_required_input_left_out_is_named(names: tuple[str, ...], missing: str) -> None:
    """Also when as many inputs came as the config has required ones (``A`` and ``C``)."""
    with pytest.raises(InvalidInput) as info:
        validate(_config(), _request(*names))
    given = "[" + ",".join(f"'{n}'" for n in names) + "]"
    assert str(info.value) == (
        f"expected 3 inputs but got {len(names)} inputs for model 'm'. Got input(s) {given}, "
        f"but missing required input(s) {missing}. Please provide all required input(s)."
    )


# --- answers of other v2 hosts ----------------------------------------------------------------


def _answer(outputs: dict[str, np.ndarray[Any, Any]], **extra: Any) -> tuple[bytes, str]:
    entries = [
        {
            "name": name,
            "datatype": codec.datatype_of(array),
            "shape": list(array.shape),
            "parameters": {"binary_data_size": array.nbytes},
        }
        for name, array in outputs.items()
    ]
    head = json.dumps({"model_name": "m", "model_version": "1", "outputs": entries, **extra})
    data = b"".join(np.ascontiguousarray(a).tobytes() for a in outputs.values())
    return head.encode() + data, str(len(head))


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Counts full reads of an answer's header (a cached one skips them); empty cache."""
    calls: list[int] = []
    real = client_codec.orjson.loads

    def counting(data: Any) -> Any:
        calls.append(1)
        return real(data)

    monkeypatch.setattr(client_codec.orjson, "loads", counting)
    client_codec._TEMPLATES.clear()
    yield calls
    client_codec._TEMPLATES.clear()


def test_a_repeated_answer_header_is_read_once(parses: list[int]) -> None:
    for i in range(3):
        a, b = np.full((3, 4), i, np.int32), np.arange(6, dtype=np.float16) * i
        body, length = _answer({"A": a, "B": b})
        out = decode_response(body, length, "h")
        assert list(out) == ["A", "B"]
        np.testing.assert_array_equal(out["A"], a)
        np.testing.assert_array_equal(out["B"], b)
        assert out["A"].dtype == np.int32 and out["B"].dtype == np.float16
        out["A"][0, 0] = 7  # a writable copy, not a view of the body
    assert len(parses) == 1


def test_a_cached_answer_header_still_checks_its_data(parses: list[int]) -> None:
    body, length = _answer({"Y": np.array([True, False])})
    assert decode_response(body, length, "h")["Y"].tolist() == [True, False]
    bad = body[:-1] + b"\x02"
    with pytest.raises(Unavailable) as info:
        decode_response(bad, length, "h")
    assert str(info.value) == (
        "host h sent a malformed response: output 'Y': BOOL data must be bytes 0 or 1"
    )
    with pytest.raises(Unavailable, match="binary data sizes add up to 2 bytes but the body"):
        decode_response(body + b"\x00", length, "h")  # same header, a byte more: read in full
    assert len(parses) == 2


def test_answers_that_are_never_cached(parses: list[int]) -> None:
    strings = np.array([b"ab", b""], dtype=object)
    json_answer = json.dumps(
        {"outputs": [{"name": "Y", "datatype": "INT32", "shape": [1], "data": [1]}]}
    ).encode()
    prefixed = b"".join(struct.pack("<I", len(s)) + s for s in strings)
    head = json.dumps(
        {
            "outputs": [
                {
                    "name": "S",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": len(prefixed)},
                }
            ]
        }
    ).encode()
    for _ in range(2):
        assert decode_response(json_answer, None, "h")["Y"].tolist() == [1]
        assert decode_response(head + prefixed, str(len(head)), "h")["S"].tolist() == [b"ab", b""]
    assert len(parses) == 4 and client_codec._TEMPLATES == {}


def test_the_answer_cache_keys_on_the_element_limit_and_starts_over_when_full(
    parses: list[int],
) -> None:
    body, length = _answer({"Y": np.zeros(8, np.int8)})
    decode_response(body, length, "h")
    with pytest.raises(Unavailable, match="too large"):
        decode_response(body, length, "h", max_elements=4)
    client_codec._TEMPLATES.clear()
    for width in range(1, client_codec._TEMPLATES_MAX + 1):  # 0 bytes of data: nothing to cache
        decode_response(*_answer({"Y": np.zeros(width, np.int8)}), "h")
    assert len(client_codec._TEMPLATES) == client_codec._TEMPLATES_MAX
    decode_response(*_answer({"Y": np.zeros(1, np.int16)}), "h")
    assert len(client_codec._TEMPLATES) == 1


def test_requests_to_hosts_carry_each_tensor_once() -> None:
    a = np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2]  # not contiguous
    b = np.array([[1.5]], np.float64)
    body, length = client_codec.encode_request({"A": a, "B": b}, ["Y"])
    header = json.loads(body[:length])
    assert [e["parameters"]["binary_data_size"] for e in header["inputs"]] == [24, 8]
    assert body[length:] == a.tobytes() + b.tobytes()
