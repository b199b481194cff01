"""JSON and binary-tensor codec for v2 inference requests and responses.

Pure functions over bytes: the REST server hands in the body and the value of the
``Inference-Header-Content-Length`` header, and gets back a body and that header's value.
Everything a client can get wrong raises :class:`~gateway.errors.InvalidInput` with a message
that names the tensor and the field, before any large allocation happens.

The rules every codec applies to one tensor (names, shapes, BYTES framing) are in
``gateway.protocol.tensors``.

Why one module of this size: decoding and encoding are the two halves of one wire format (the
JSON header, binary sections and their lengths, ``binary_data`` flags), and each half checks what
the other writes. What splits next, if it grows: the response encoder into ``encode.py``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from gateway.errors import InvalidInput
from gateway.protocol.tensors import (
    MAX_DIMS,
    MAX_ELEMENTS,
    check_classification,
    check_name,
    check_parameters,
    check_shape,
    join_bytes,
    shared_memory_ref,
    split_bytes,
    tensor_from_buffer,
)
from gateway.protocol.types import (
    DATATYPE_NAMES,
    DATATYPES,
    InferRequest,
    InferResponse,
    RequestedOutput,
    SharedInput,
    datatype_of,
    numpy_dtype,
)


def _fail(message: str) -> InvalidInput:
    return InvalidInput(message)


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise _fail(f"{where}: 'parameters' must be an object")
    return params


def _deep(name: str) -> InvalidInput:
    """Data nested deeper than any tensor's rank can be (Triton's HTTP server recurses once
    per level, without a bound, and a deep enough body brings it down)."""
    return _fail(f"input '{name}': 'data' is nested deeper than {MAX_DIMS} levels")


def _flatten_strings(data: list[Any], name: str, count: int) -> list[bytes]:
    """The strings of nested JSON lists, in order; refused at the first one past ``count``."""
    out: list[bytes] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) >= MAX_DIMS:
                    raise _deep(name)
                stack.append(iter(item))
                break
            if len(out) == count:
                raise _fail(f"input '{name}': BYTES data holds more than the {count} elements")
            if isinstance(item, str):
                out.append(item.encode())
            elif isinstance(item, bytes):
                out.append(item)
            else:
                raise _fail(
                    f"input '{name}': BYTES data must be strings, got {type(item).__name__}"
                )
        else:
            stack.pop()
    return out


def _json_data(
    data: object, datatype: str, dtype: np.dtype[Any], shape: tuple[int, ...], count: int, name: str
) -> np.ndarray[Any, Any]:
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        flat = _flatten_strings(data, name, count)
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
    else:
        try:
            raw = np.array(data)
        except (ValueError, TypeError) as exc:
            raise _fail(f"input '{name}': data is ragged or not numeric ({exc})") from None
        if raw.ndim > MAX_DIMS:
            raise _deep(name)
        if dtype.kind in "iu" and raw.dtype.kind == "f" and raw.size:
            array = _exact_integers(data, dtype, datatype, name)
        elif raw.ndim == 1:  # the usual case, a flat list: its values are ``raw``'s, in order
            array = _convert(raw, dtype, datatype, name, data)
        else:
            array = _convert(raw.reshape(-1), dtype, datatype, name)
    if array.size != count:
        raise _fail(  # which input, Triton's words, then how far off
            f"input '{name}': Unable to parse 'data': Shape does not match true shape of 'data' "
            f"field (got {array.size} elements, shape {list(shape)} needs {count})"
        )
    return array.reshape(shape)


# The bounds of each integer datatype as Python ints, read once (``np.iinfo`` per tensor cost
# about as much as the cast itself).
_INT_BOUNDS: dict[np.dtype[Any], tuple[int, int]] = {
    dtype: (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    for dtype in DATATYPES.values()
    if dtype.kind in "iu"
}
# Up to this many values in a flat list, Python's ``min``/``max`` over the list are cheaper than
# numpy's reductions over the array (a call into numpy costs a few microseconds of its own).
_SMALL = 64
# Floats strictly inside this bound cast to FP32 without overflow (its largest is 3.4028e38).
_FP32_SAFE = 3.4e38


def _extremes(raw: np.ndarray[Any, Any], flat: list[Any] | None) -> tuple[Any, Any]:
    """The smallest and largest of the values (non-empty): from the JSON list when it is flat
    and short, else from the array."""
    if flat is not None and len(flat) <= _SMALL:
        return min(flat), max(flat)
    return np.minimum.reduce(raw, axis=None), np.maximum.reduce(raw, axis=None)


def _exact_integers(
    data: list[Any], dtype: np.dtype[Any], datatype: str, name: str
) -> np.ndarray[Any, Any]:
    """Integers for an integer tensor from JSON that numpy read as floats: whole-number floats,
    or integers beyond int64 mixed with others (numpy then rounds them all to float64, so
    2**64 - 1 became 2**64 and wrapped to 0). Checked exactly, on the values as parsed."""
    exact: list[int] = []
    for value in np.array(data, dtype=object).reshape(-1):
        if isinstance(value, bool):
            raise _fail(f"input '{name}': {datatype} data must be integers, not booleans")
        if isinstance(value, float) and not value.is_integer():  # JSON has no inf or nan
            raise _fail(f"input '{name}': {datatype} data must be integers")
        exact.append(int(value))  # orjson reads integers past 2**64 as floats
    low, high = _INT_BOUNDS[dtype]
    if min(exact) < low or max(exact) > high:
        raise _fail(f"input '{name}': value out of range for {datatype}")
    return np.array(exact, dtype=dtype)


def _convert(
    raw: np.ndarray[Any, Any],
    dtype: np.dtype[Any],
    datatype: str,
    name: str,
    flat: list[Any] | None = None,
) -> np.ndarray[Any, Any]:
    """Cast JSON numbers to the declared dtype, refusing values it cannot hold. ``flat``: the
    JSON list ``raw`` was made of, when it is flat (its values are then ``raw``'s)."""
    kind = raw.dtype.kind
    if raw.size == 0:
        return raw.astype(dtype)
    if datatype == "BOOL":
        if kind != "b":
            raise _fail(f"input '{name}': BOOL data must be true/false")
        return raw
    if kind not in "biuf":
        raise _fail(f"input '{name}': {datatype} data must be numbers")
    if dtype.kind in "iu":  # floats for integers went to _exact_integers
        if kind == "b":
            raise _fail(f"input '{name}': {datatype} data must be integers, not booleans")
        if raw.dtype == dtype:  # numpy read them as this very type: they fit
            return raw
        low, high = _INT_BOUNDS[dtype]
        smallest, largest = _extremes(raw, flat)
        if int(smallest) < low or int(largest) > high:
            raise _fail(f"input '{name}': value out of range for {datatype}")
        return raw.astype(dtype)
    if kind == "b":
        raise _fail(f"input '{name}': {datatype} data must be numbers, not booleans")
    if dtype == raw.dtype:
        return raw
    if dtype.itemsize >= 4 and (kind in "iu" or _inside_fp32(raw, flat)):
        return raw.astype(dtype)  # no value can overflow: no check, nothing to silence
    with np.errstate(over="ignore"):
        out = raw.astype(dtype)
    if not np.isfinite(out).all():
        raise _fail(f"input '{name}': value out of range for {datatype}")
    return out


def _inside_fp32(raw: np.ndarray[Any, Any], flat: list[Any] | None) -> bool:
    """Whether every float is strictly inside FP32's range, asked only of short flat lists
    (else the cast is checked after the fact)."""
    if flat is None or len(flat) > _SMALL:
        return False
    smallest, largest = _extremes(raw, flat)
    return bool(-_FP32_SAFE < smallest and largest < _FP32_SAFE)


def _decode_outputs(header: dict[str, Any]) -> list[RequestedOutput] | None:
    outputs = header.get("outputs")
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise _fail("'outputs' must be a list")
    seen: set[str] = set()
    result: list[RequestedOutput] = []
    for spec in outputs:
        if not isinstance(spec, dict):
            raise _fail("each entry of 'outputs' must be an object")
        name = check_name(spec.get("name"), "output 'name'")
        if name in seen:
            raise _fail(f"output '{name}' requested twice")
        seen.add(name)
        params = _parameters(spec, f"output '{name}'")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise _fail(f"output '{name}': 'binary_data' must be true or false")
        shared = shared_memory_ref(params, f"output '{name}'")
        classes = check_classification(params, name)
        result.append(RequestedOutput(name, binary, shared, classification=classes))
    return result


@dataclass(frozen=True, slots=True)
class _Template:
    """A decoded and validated JSON header whose tensors are all binary: what the next body
    with the same header bytes needs besides its own tensor data."""

    inputs: tuple[tuple[str, np.dtype[Any], tuple[int, ...], int], ...]
    shared_inputs: tuple[tuple[str, SharedInput], ...]  # checked against regions per request
    data_size: int
    outputs: tuple[RequestedOutput, ...] | None
    binary_output: bool
    parameters: dict[str, Any]


# Clients send the same header with every request of a kind (same model, inputs and shapes;
# only the binary data differs), so it is parsed and checked once. Bounded: past the limit the
# cache starts over, so a client that varies its header costs a parse, never memory.
_TEMPLATES: dict[tuple[bytes, int], _Template] = {}
_TEMPLATES_MAX = 512
_TEMPLATE_HEADER_MAX = 4096
# Only a body naming a shared-memory region is looked up whole (a JSON body with data never
# repeats; this keeps it from paying the lookup).
_SHARED_MARK = b"shared_memory_region"


def _from_template(
    template: _Template, view: memoryview, offset: int, request_id: str | None
) -> InferRequest:
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for name, dtype, shape, size in template.inputs:
        inputs[name] = tensor_from_buffer(view[offset : offset + size], dtype, shape, name)
        offset += size
    return InferRequest(
        inputs=inputs,
        id=request_id,
        outputs=None if template.outputs is None else list(template.outputs),
        binary_output=template.binary_output,
        parameters=dict(template.parameters),
        shared_inputs=dict(template.shared_inputs),
    )


# A header that opens with its id, a plain JSON string (no escape, quote or control character):
# perf_analyzer sends ``{"id":"",...`` with every request, tritonclient ``{"id": "7", ...`` when
# given one. Only JSON's own whitespace is allowed around it: what is cut off here is not part
# of the cache key, so it must be exactly what the full parse would have accepted.
_LEADING_ID = re.compile(rb'\{[ \t\n\r]*"id"[ \t\n\r]*:[ \t\n\r]*"([^"\\\x00-\x1f]*)"')


def _split_id(body: bytes, end: int) -> tuple[str | None, bytes]:
    """(the leading id, the header without it) for a header ``body[:end]`` that opens with a
    plain id, else (None, the whole header). The rest then starts with ``,`` or ``}``, never
    ``{``: it cannot be taken for the key of a header without an id."""
    found = _LEADING_ID.match(body, 0, end)
    if found is not None:
        try:
            return found[1].decode(), body[found.end() : end]
        except UnicodeDecodeError:  # not UTF-8: the full parse refuses it
            pass
    return None, body[:end]


def _remember(
    key: tuple[bytes, int],
    request: InferRequest,
    header_length: int,
    body_length: int,
    request_id: str | None,
) -> None:
    if not (request.inputs or request.shared_inputs):
        return
    if any(a.dtype.kind == "O" for a in request.inputs.values()):
        return  # BYTES tensors are split per request
    if request.id != request_id:
        return  # an id not at the front (or a second one after it): would never be seen again
    if request_id is not None and (b'"id"' in key[0] or b"\\" in key[0]):
        return  # the rest might name the id again (a JSON object's last "id" is the one kept)
    if len(_TEMPLATES) >= _TEMPLATES_MAX:
        _TEMPLATES.clear()
    _TEMPLATES[key] = _Template(
        inputs=tuple((n, a.dtype, a.shape, a.nbytes) for n, a in request.inputs.items()),
        shared_inputs=tuple(request.shared_inputs.items()),
        data_size=body_length - header_length,
        outputs=None if request.outputs is None else tuple(request.outputs),
        binary_output=request.binary_output,
        parameters=dict(request.parameters),
    )


def decode_infer_request(
    body: bytes, header_length: int | None = None, max_elements: int = MAX_ELEMENTS
) -> InferRequest:
    """Decode a v2 inference request body (JSON, optionally followed by binary tensors)."""
    key = None
    end = 0  # where the JSON header ends, when it may be cached
    request_id = None
    if isinstance(body, bytes):
        if header_length is not None and 0 < header_length < len(body):
            if header_length <= _TEMPLATE_HEADER_MAX:  # binary tensors follow: the header repeats
                end = header_length
        elif (
            header_length in (None, len(body))
            and 0 < len(body) <= _TEMPLATE_HEADER_MAX
            and _SHARED_MARK in body
        ):
            end = len(body)  # tensors in shared memory: the whole body repeats
        if end:
            # The key leaves out a leading id: clients that send one send it with every request.
            request_id, rest = _split_id(body, end)
            key = (rest, max_elements)
            template = _TEMPLATES.get(key)
            if template is not None and template.data_size == len(body) - end:
                return _from_template(template, memoryview(body), end, request_id)
    request, no_json_data = _decode(body, header_length, max_elements)
    if key is not None and no_json_data:
        _remember(key, request, end, len(body), request_id)
    return request


def _decode(body: bytes, header_length: int | None, max_elements: int) -> tuple[InferRequest, bool]:
    """The request, and whether every input came as binary data or in shared memory."""
    all_binary = True
    if header_length is None:
        header_length = len(body)
    elif header_length < 0 or header_length > len(body):
        raise _fail(
            f"Inference-Header-Content-Length {header_length} is outside the body "
            f"({len(body)} bytes)"
        )
    try:
        header = orjson.loads(memoryview(body)[:header_length])
    except orjson.JSONDecodeError as exc:
        raise _fail(f"request body is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _fail("request body must be a JSON object")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _fail("'id' must be a string")
    params: dict[str, Any] = {}
    binary_output = False
    if "parameters" in header:
        params = check_parameters(_parameters(header, "request"))
        binary_output = params.get("binary_data_output", False)
        if not isinstance(binary_output, bool):
            raise _fail("'binary_data_output' must be true or false")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _fail("'inputs' must be a non-empty list")

    view = memoryview(body)
    offset = header_length
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    shared_inputs: dict[str, SharedInput] = {}
    for spec in raw_inputs:
        if not isinstance(spec, dict):
            raise _fail("each entry of 'inputs' must be an object")
        name = check_name(spec.get("name"), "input 'name'")
        if name in inputs or name in shared_inputs:
            raise _fail(f"input '{name}' already exists in request")  # Triton's words
        datatype = spec.get("datatype")
        dtype = numpy_dtype(datatype) if isinstance(datatype, str) else None
        if dtype is None or not isinstance(datatype, str):
            raise _fail(f"input '{name}': 'datatype' must be a string")
        shape = check_shape(spec.get("shape"), name, max_elements)
        count = math.prod(shape)
        size = None  # without parameters: neither shared memory nor binary data
        if "parameters" in spec:
            shared = _shared_input(spec, name, datatype, shape)
            if shared is not None:  # resolved by the data plane (gateway/shared_memory.py)
                shared_inputs[name] = shared
                continue
            size = _parameters(spec, f"input '{name}'").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise _fail(f"input '{name}': 'binary_data_size' must be a non-negative integer")
            if "data" in spec:
                raise _fail(f"input '{name}': has both 'data' and 'binary_data_size'")
            if offset + size > len(body):
                raise _fail(
                    f"input '{name}': binary_data_size {size} overruns the body "
                    f"({len(body) - offset} bytes left)"
                )
            chunk = view[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                inputs[name] = split_bytes(chunk, count, name).reshape(shape)
            else:
                if size != count * dtype.itemsize:
                    raise _fail(
                        f"input '{name}': binary_data_size {size} does not match shape "
                        f"{list(shape)} of {datatype} ({count * dtype.itemsize} bytes)"
                    )
                inputs[name] = tensor_from_buffer(chunk, dtype, shape, name)
        elif "data" in spec:
            inputs[name] = _json_data(spec["data"], datatype, dtype, shape, count, name)
            all_binary = False
        else:
            raise _fail(f"input '{name}' has neither 'data' nor 'binary_data_size'")
    if offset != len(body):
        raise _fail(
            f"binary data sizes add up to {offset - header_length} bytes but the body carries "
            f"{len(body) - header_length}"
        )
    request = InferRequest(
        inputs=inputs,
        id=request_id,
        outputs=_decode_outputs(header) if "outputs" in header else None,
        binary_output=binary_output,
        parameters=params,
        shared_inputs=shared_inputs,
    )
    return request, all_binary


def _shared_input(
    spec: dict[str, Any], name: str, datatype: str, shape: tuple[int, ...]
) -> SharedInput | None:
    """An input given by Triton's shared-memory parameters, which then carries no data."""
    params = _parameters(spec, f"input '{name}'")
    ref = shared_memory_ref(params, f"input '{name}'")
    if ref is None:
        return None
    if "data" in spec or "binary_data_size" in params:
        raise _fail(f"input '{name}': has shared memory parameters and data; send one")
    return SharedInput(datatype, shape, ref)


def _json_values(array: np.ndarray[Any, Any]) -> Any:
    if array.dtype.kind in ("O", "S", "U"):
        return [
            item.decode(errors="replace") if isinstance(item, bytes) else str(item)
            for item in array.reshape(-1)
        ]
    return np.ascontiguousarray(array).reshape(-1)


# JSON headers of all-binary responses, without the id and the closing brace: the same for every
# response of a model version with the same output shapes. Bounded like _TEMPLATES.
_HEADS: dict[tuple[Any, ...], bytes] = {}


def _encode_all_binary(
    response: InferResponse, binary_of: dict[str, bool | None], binary_default: bool
) -> tuple[bytes, int] | None:
    """The common case (every output binary, none BYTES) from a cached header; None if not."""
    shapes = []
    for name, array in response.outputs.items():
        binary = binary_of.get(name)
        if not (binary if binary is not None else binary_default) or array.dtype.kind in "OSU":
            return None  # BYTES (object or numpy strings) are length-prefixed, not raw
        shapes.append((name, array.dtype.str, array.shape))
    key = (response.model_name, response.model_version, *shapes)
    head = _HEADS.get(key)
    if head is None:
        outputs = [
            {
                "name": name,
                "datatype": datatype_of(array),
                "shape": list(array.shape),
                "parameters": {"binary_data_size": array.nbytes},
            }
            for name, array in response.outputs.items()
        ]
        header = {
            "model_name": response.model_name,
            "model_version": response.model_version,
            "outputs": outputs,
        }
        if len(_HEADS) >= _TEMPLATES_MAX:
            _HEADS.clear()
        head = _HEADS[key] = orjson.dumps(header)[:-1]
    tail = b',"id":' + orjson.dumps(response.id) + b"}" if response.id is not None else b"}"
    json_bytes = head + tail
    # Joined straight from the arrays' buffers: one copy of each output, not two.
    blobs = [np.ascontiguousarray(a).data for a in response.outputs.values()]
    return b"".join([json_bytes, *blobs]), len(json_bytes)


def encode_infer_response(
    response: InferResponse,
    requested: list[RequestedOutput] | None = None,
    binary_default: bool = False,
) -> tuple[bytes, int | None]:
    """Encode a response; returns the body and the JSON header length when binary is used.

    ``binary_default`` (the request's ``binary_data_output``) covers the outputs of a request
    that lists none; a listed output is binary only if it says so (Triton does the same)."""
    binary_of = {r.name: r.binary for r in requested} if requested else {}
    if requested:
        binary_default = False
    if not response.parameters and not response.shared:
        fast = _encode_all_binary(response, binary_of, binary_default)
        if fast is not None:
            return fast
    outputs_json: list[dict[str, Any]] = []
    blobs: list[bytes | memoryview] = []
    for name, array in response.outputs.items():
        datatype = DATATYPE_NAMES.get(array.dtype) or datatype_of(array)  # (strings: not there)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        binary = binary_of.get(name)
        if name in response.shared:
            pass  # written into the client's shared memory: no data here, as Triton
        elif binary if binary is not None else binary_default:
            blob: bytes | memoryview = (
                join_bytes(array) if datatype == "BYTES" else np.ascontiguousarray(array).data
            )
            entry["parameters"] = {"binary_data_size": memoryview(blob).nbytes}
            blobs.append(blob)
        else:
            entry["data"] = _json_values(array)
        outputs_json.append(entry)
    header: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs_json,
    }
    if response.id is not None:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = response.parameters
    json_bytes = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return json_bytes, None
    return b"".join([json_bytes, *blobs]), len(json_bytes)
