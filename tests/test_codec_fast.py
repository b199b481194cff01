"""The JSON decoder's short cuts for the usual request (flat lists of numbers, no parameters)
give the same tensors and the same errors as the long way: long lists, nested lists and short
flat lists are checked alike, whichever side of each cut a value falls."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from gateway.errors import InvalidInput
from gateway.pending import validate
from gateway.protocol import InferRequest, codec, decode_infer_request
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
