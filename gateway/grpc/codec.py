"""Tensors between gRPC messages and :mod:`gateway.protocol.types`: pure functions.

A ``ModelInferRequest`` carries its data either in each input's typed ``contents`` or, for all
inputs at once, in ``raw_input_contents`` (little-endian bytes; BYTES elements as a 4-byte
little-endian length then the bytes, the binary-tensor layout). Responses always carry their
data in ``raw_output_contents``, whatever the request used, as Triton's do: clients (tritonclient's
``as_numpy``, perf_analyzer) index it. Everything a client can get wrong raises
:class:`~gateway.errors.InvalidInput` naming the tensor.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from gateway.errors import InvalidInput
from gateway.protocol.tensors import (
    check_classification,
    check_parameters,
    check_shape,
    join_bytes,
    shared_memory_ref,
    split_bytes,
    tensor_from_buffer,
)
from gateway.protocol.types import (
    InferRequest,
    InferResponse,
    RequestedOutput,
    SharedInput,
    datatype_of,
    numpy_dtype,
)

# v2 datatype -> the InferTensorContents field holding it, and the range its values must fit.
_CONTENTS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_NARROW = {"INT8", "INT16", "UINT8", "UINT16"}


def _parameter_value(param: Any) -> Any:
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def parameters_from_proto(params: Any) -> dict[str, Any]:
    """A ``map<string, InferParameter>`` as plain Python values (unset entries dropped)."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        value = _parameter_value(param)
        if value is not None:
            out[key] = value
    return out


def parameters_to_proto(values: dict[str, Any], target: Any) -> None:
    """Fill a ``map<string, InferParameter>``; values of other types are sent as strings."""
    for key, value in values.items():
        param = target[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = str(value)


def tensor_from_raw(
    raw: bytes | memoryview, datatype: str, shape: tuple[int, ...], name: str
) -> Any:
    """One input's ``raw_input_contents`` entry as its array (a view: no copy), size checked."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return split_bytes(raw, count, name).reshape(shape)
    dtype = numpy_dtype(datatype)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"input '{name}': got {len(raw)} bytes of raw data, but shape {list(shape)} of "
            f"{datatype} needs {expected}"
        )
    return tensor_from_buffer(raw, dtype, shape, name)


def _from_contents(contents: Any, datatype: str, shape: tuple[int, ...], name: str) -> Any:
    dtype = numpy_dtype(datatype)
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InvalidInput(
            f"input '{name}': {datatype} data cannot be sent in 'contents'; use raw_input_contents"
        )
    for other in set(_CONTENTS.values()) - {field}:
        if len(getattr(contents, other)):
            raise InvalidInput(
                f"input '{name}': {datatype} data must be in '{field}', not '{other}'"
            )
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input '{name}': got {len(values)} elements in '{field}', but shape "
            f"{list(shape)} needs {count}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
    elif datatype in _NARROW:
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if count and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidInput(f"input '{name}': values out of range for {datatype}")
        array = wide.astype(dtype)
    else:
        array = np.array(values, dtype=dtype)
    return array.reshape(shape)


def decode_infer_request(message: Any) -> InferRequest:
    """A ``ModelInferRequest`` as an :class:`InferRequest`."""
    raw = message.raw_input_contents
    shared_inputs = _shared_inputs(message)
    if raw and len(raw) != len(message.inputs) - len(shared_inputs):
        raise InvalidInput(
            f"got {len(raw)} raw_input_contents for "
            f"{len(message.inputs) - len(shared_inputs)} inputs not in shared memory; "
            "raw data must be given for every input or none (but those in shared memory)"
        )
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    index = 0  # into raw_input_contents: inputs in shared memory have no entry there
    given: set[str] = set()
    for tensor in message.inputs:
        name = tensor.name
        if not name:
            raise InvalidInput("every input needs a name")
        if name in given:
            raise InvalidInput(f"input '{name}' already exists in request")  # Triton's words
        given.add(name)
        if name in shared_inputs:
            continue
        shape = check_shape(list(tensor.shape), tensor.name)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input '{name}' has both 'contents' and raw_input_contents; send one"
                )
            inputs[name] = tensor_from_raw(raw[index], tensor.datatype, shape, name)
            index += 1
        else:
            inputs[name] = _from_contents(tensor.contents, tensor.datatype, shape, name)
    outputs: list[RequestedOutput] | None = None
    if message.outputs:
        outputs = []
        seen: set[str] = set()
        for out in message.outputs:
            if out.name in seen:
                raise InvalidInput(f"output '{out.name}' requested twice")
            seen.add(out.name)
            params = parameters_from_proto(out.parameters)  # class_count: "classification"
            what = f"output '{out.name}'"
            shared = shared_memory_ref(params, what)
            classes = check_classification(params, out.name)
            outputs.append(RequestedOutput(out.name, shared=shared, classification=classes))
    return InferRequest(
        inputs=inputs,
        id=message.id or None,
        outputs=outputs,
        parameters=check_parameters(parameters_from_proto(message.parameters)),
        shared_inputs=shared_inputs,
    )


def _shared_inputs(message: Any) -> dict[str, SharedInput]:
    """Inputs given by Triton's shared-memory parameters (no contents, no raw entry);
    resolved by the data plane (gateway/shared_memory.py)."""
    shared: dict[str, SharedInput] = {}
    for tensor in message.inputs:
        if not tensor.parameters:
            continue
        what = f"input '{tensor.name}'"
        ref = shared_memory_ref(parameters_from_proto(tensor.parameters), what)
        if ref is None:
            continue
        if tensor.HasField("contents"):
            raise InvalidInput(f"{what}: has shared memory parameters and 'contents'; send one")
        if tensor.name in shared:
            raise InvalidInput(f"input '{tensor.name}' already exists in request")
        shape = check_shape(list(tensor.shape), tensor.name)
        shared[tensor.name] = SharedInput(tensor.datatype, shape, ref)
    return shared


def encode_infer_response(response: InferResponse) -> Any:
    """An :class:`InferResponse` as a ``ModelInferResponse``, every output's data in
    ``raw_output_contents`` (Triton answers so even to requests with typed ``contents``);
    an output written into the client's shared memory has an empty entry there."""
    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id or "",
    )
    parameters_to_proto(response.parameters, message.parameters)
    for name, array in response.outputs.items():
        datatype = datatype_of(array)
        message.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if name in response.shared:  # written into the client's shared memory, as Triton:
            message.raw_output_contents.append(b"")  # keeps the entries aligned with outputs
        else:
            message.raw_output_contents.append(
                join_bytes(array) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes()
            )
    return message
