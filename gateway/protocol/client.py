"""The v2 client codec: the requests this gateway sends to other v2 hosts, and their answers.

Pure functions over bytes (``gateway.backends.remote.V2Host`` does the HTTP). Requests go with
every tensor in the binary-tensor extension and ask for binary outputs. An answer comes from
another machine, so it is checked as strictly as a client's request is (``codec``), with the
same helpers: a malformed or hostile answer raises :class:`~gateway.errors.Unavailable` naming
the host (it counts against that host, and the router may retry elsewhere), never a crash, and
nothing is allocated beyond the size the body it came in (which the caller bounds) allows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from gateway.errors import InvalidInput, Unavailable
from gateway.protocol.codec import _json_data
from gateway.protocol.tensors import (
    MAX_ELEMENTS,
    check_name,
    check_shape,
    join_bytes,
    split_bytes,
    tensor_from_buffer,
)
from gateway.protocol.types import datatype_of, numpy_dtype

__all__ = ["HEADER_LENGTH", "decode_response", "encode_request", "error_message", "malformed"]

HEADER_LENGTH = "Inference-Header-Content-Length"


def malformed(host: str, detail: str) -> Unavailable:
    """The error for an answer that is not a v2 answer; ``retry_after_s`` as for a lost host."""
    return Unavailable(f"host {host} sent a malformed response: {detail}", retry_after_s=1.0)


def encode_request(
    inputs: Mapping[str, np.ndarray[Any, Any]],
    outputs: Sequence[str],
    timeout_s: float | None = None,
) -> tuple[bytes, int]:
    """A binary-tensor request body and its JSON header length; ``timeout_s`` travels as
    Triton's ``timeout`` parameter (microseconds, at least 1)."""
    blobs: list[bytes | memoryview] = []
    entries = []
    for name, array in inputs.items():
        datatype = datatype_of(array)
        if datatype == "BYTES":
            blob: bytes | memoryview = join_bytes(array)
            size = len(blob)
        else:  # a view of the array's bytes: copied once, into the body
            blob, size = np.ascontiguousarray(array).data, array.nbytes
        blobs.append(blob)
        entries.append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype,
                "parameters": {"binary_data_size": size},
            }
        )
    header: dict[str, Any] = {
        "inputs": entries,
        "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in outputs],
    }
    if timeout_s is not None:
        header["parameters"] = {"timeout": max(1, int(timeout_s * 1e6))}
    head = orjson.dumps(header)
    return b"".join([head, *blobs]), len(head)


def _header_length(value: str | int | None, body_size: int, host: str) -> int:
    if value is None:
        return body_size
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            raise malformed(host, f"{HEADER_LENGTH} {value[:32]!r} is not a byte count")
        value = int(value)
    if not 0 < value <= body_size:
        raise malformed(host, f"{HEADER_LENGTH} {value} is outside the body ({body_size} bytes)")
    return value


def decode_response(
    body: bytes,
    header_length: str | int | None,
    host: str,
    max_elements: int = MAX_ELEMENTS,
) -> dict[str, np.ndarray[Any, Any]]:
    """The outputs of a v2 answer (JSON, or a JSON header and binary tensors).

    ``header_length`` is the ``Inference-Header-Content-Length`` header's value as received
    (None: a JSON-only body). Binary arrays are copies, writable and independent of ``body``.
    """
    size = len(body)
    length = _header_length(header_length, size, host)
    view = memoryview(body)
    key = None
    if length < size and length <= _TEMPLATE_HEADER_MAX and isinstance(body, bytes):
        key = (body[:length], max_elements)  # binary tensors follow: the header may repeat
        template = _TEMPLATES.get(key)
        if template is not None and template[0] == size - length:
            try:
                return _from_template(template[1], view, length)
            except InvalidInput as exc:  # BOOL bytes other than 0 and 1
                raise malformed(host, _as_output(exc.message)) from None
    try:
        header = orjson.loads(view[:length])
    except orjson.JSONDecodeError as exc:
        raise malformed(host, f"not JSON ({exc})") from None
    entries = header.get("outputs") if isinstance(header, dict) else None
    if not isinstance(entries, list):
        raise malformed(host, "no 'outputs' list")
    out: dict[str, np.ndarray[Any, Any]] = {}
    offset = length
    for entry in entries:
        if not isinstance(entry, dict):
            raise malformed(host, "an entry of 'outputs' is not an object")
        try:
            name = check_name(entry.get("name"), "output 'name'")
            if name in out:
                raise InvalidInput(f"output '{name}' given twice")
            array, offset = _output(entry, name, view, offset, max_elements)
        except InvalidInput as exc:
            raise malformed(host, _as_output(exc.message)) from None
        out[name] = array
    if offset != size:
        raise malformed(
            host,
            f"binary data sizes add up to {offset - length} bytes but the body carries "
            f"{size - length}",
        )
    if key is not None and all(a.dtype.kind != "O" for a in out.values()):
        if len(_TEMPLATES) >= _TEMPLATES_MAX:
            _TEMPLATES.clear()
        _TEMPLATES[key] = (
            size - length,
            tuple((n, a.dtype, a.shape, a.nbytes) for n, a in out.items()),
        )
    return out


# A host answers every batch of one shape with the same JSON header (its binary data differs),
# so a header read and checked once is kept: what the next answer with the same header bytes
# needs besides its data. Only answers whose outputs are all binary and fixed-size (a JSON or
# BYTES output is read each time). Bounded: past the limit it starts over.
_Outputs = tuple[tuple[str, np.dtype[Any], tuple[int, ...], int], ...]
_TEMPLATES: dict[tuple[bytes, int], tuple[int, _Outputs]] = {}
_TEMPLATES_MAX = 512
_TEMPLATE_HEADER_MAX = 4096


def _from_template(
    outputs: _Outputs, view: memoryview, offset: int
) -> dict[str, np.ndarray[Any, Any]]:
    out: dict[str, np.ndarray[Any, Any]] = {}
    for name, dtype, shape, nbytes in outputs:
        chunk = view[offset : offset + nbytes]
        out[name] = tensor_from_buffer(chunk, dtype, shape, name).copy()
        offset += nbytes
    return out


def _output(
    entry: dict[str, Any], name: str, view: memoryview, offset: int, max_elements: int
) -> tuple[np.ndarray[Any, Any], int]:
    """One output entry as an array, and the offset of the binary data after it."""
    datatype = entry.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInput(f"output '{name}': 'datatype' must be a string")
    try:
        dtype = numpy_dtype(datatype)
    except InvalidInput as exc:
        raise InvalidInput(f"output '{name}': {exc.message}") from None
    shape = check_shape(entry.get("shape"), name, max_elements)
    count = math.prod(shape)
    params = entry.get("parameters")
    if params is None:
        params = {}
    elif not isinstance(params, dict):
        raise InvalidInput(f"output '{name}': 'parameters' must be an object")
    data_size = params.get("binary_data_size")
    if data_size is None:
        if "data" not in entry:
            raise InvalidInput(f"output '{name}' has neither 'data' nor 'binary_data_size'")
        return _json_data(entry["data"], datatype, dtype, shape, count, name), offset
    if not isinstance(data_size, int) or isinstance(data_size, bool) or data_size < 0:
        raise InvalidInput(f"output '{name}': 'binary_data_size' must be a non-negative integer")
    if offset + data_size > len(view):
        raise InvalidInput(
            f"output '{name}': binary_data_size {data_size} overruns the body "
            f"({len(view) - offset} bytes left)"
        )
    chunk = view[offset : offset + data_size]
    if dtype.kind == "O":
        return split_bytes(chunk, count, name).reshape(shape), offset + data_size
    if data_size != count * dtype.itemsize:
        raise InvalidInput(
            f"output '{name}': binary_data_size {data_size} does not match shape "
            f"{list(shape)} of {datatype} ({count * dtype.itemsize} bytes)"
        )
    return tensor_from_buffer(chunk, dtype, shape, name).copy(), offset + data_size


def _as_output(message: str) -> str:
    """The server codec's checks name the tensor as the request's input; here it is an output."""
    if message.startswith("input '"):
        return "output '" + message.removeprefix("input '")
    return message


def error_message(body: bytes, limit_chars: int = 1024) -> str:
    """The ``error`` of a host's error answer (its first ``limit_chars``), or the start of its
    body when it is not JSON."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode(errors="replace")
    text = str(data.get("error", data)) if isinstance(data, dict) else str(data)
    return text[:limit_chars]
