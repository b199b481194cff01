"""The ``ModelInfer`` messages on the wire: raw tensors without copies, fixed parts decoded once.

(Over 450 lines on purpose: one wire format, read and written by the same field walker; the
request side and the response side share its varint and field helpers.)

protobuf copies every ``bytes`` field twice on the way in (into its arena while parsing, then
into a new Python ``bytes`` on each access of ``raw_input_contents[i]``) and three times on the
way out (``tobytes``, appending to ``raw_output_contents``, serializing). For a 602 KB image
that is most of what a request costs besides the model. So ``ModelInfer`` messages are read
and written here at the level of the wire format, for those fields only:

- ``parse_infer_request`` walks the top-level fields of the received bytes; each
  ``raw_input_contents`` entry (field 7) becomes a read-only ``memoryview`` into those bytes
  (which it keeps alive), and only the other fields, a few hundred bytes, go to protobuf;
- ``RawResponse`` is a ``ModelInferResponse``'s bytes without its raw outputs plus the output
  arrays' buffers; ``serialize_infer_response`` appends each as field 6 after them (in field
  order, so the bytes are protobuf's own), one copy in all.

For small messages (most calls: a few tensors of a few KB) the per-call Python costs more than
the bytes, so both directions keep what they made of a message's fixed part:

- Requests: a client sends the same fields for every call but ``id`` and the raw data (model,
  inputs' names, types and shapes, outputs, parameters). The bytes of those fields (the key)
  map to a template of what ``decode_infer_request`` made of them, kept once a request with
  those bytes decoded (:func:`decode_request`); the next request with the same key is decoded
  from the template (the raw data's sizes checked against it, views made) without protobuf
  parsing it. Only requests whose inputs are all raw and none in shared memory leave a
  template; at most ``TEMPLATES`` are kept (the oldest dropped), for keys up to
  ``TEMPLATE_KEY_BYTES``.
- Responses without parameters or BYTES outputs: the serialized model name and version and
  the output metadata are kept per (model, version, outputs' names, types, shapes); each answer
  is those bytes with its ``id`` and raw outputs in between and after.

Anything this reader does not understand goes to protobuf whole, which then answers as before.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from gateway.grpc.codec import (
    decode_infer_request,
    encode_infer_response,
    parameters_to_proto,
    tensor_from_raw,
)
from gateway.protocol.types import InferRequest, InferResponse, datatype_of, numpy_dtype

__all__ = [
    "TEMPLATES",
    "WIRE_MIN_BYTES",
    "KnownRequest",
    "RawRequest",
    "RawResponse",
    "decode_request",
    "encode_raw_response",
    "parse_infer_request",
    "serialize_infer_response",
    "serialize_stream_response",
]

WIRE_MIN_BYTES = 64 * 1024  # responses from here on: raw outputs whatever their metadata
TEMPLATES = 256  # request templates and response heads kept, each
TEMPLATE_KEY_BYTES = 4096
_ID = 3  # ModelInferRequest.id (and ModelInferResponse.id)
_RAW_INPUTS = 7  # ModelInferRequest.raw_input_contents
_ID_KEY = _ID << 3 | 2
_ID_TAG = bytes([_ID_KEY])
_RAW_OUTPUTS_TAG = bytes([6 << 3 | 2])  # ModelInferResponse.raw_output_contents, length-delimited


_BYTE = [bytes((i,)) for i in range(0x80)]


class _Malformed(Exception):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    if value < 0x80:
        return _BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


Layout = list[bytes | int]  # a message's other fields' bytes, and fields 3 and 7's tags, in order


def _split(
    data: bytes,
) -> tuple[list[memoryview], memoryview | None, list[memoryview], Layout]:
    """The message's top-level fields: (the pieces of ``data`` that are neither field 3 nor
    field 7, field 3's bytes or None, field 7's entries, all views into ``data``; and the
    message's layout: those pieces' bytes with where fields 3 and 7 came between them)."""
    view = memoryview(data)
    raw: list[memoryview] = []
    kept: list[memoryview] = []
    layout: Layout = []
    ident: memoryview | None = None
    n = len(data)
    pos, run = 0, 0  # run: where the current stretch of other fields began
    while pos < n:
        start = pos
        key = data[pos]
        if key < 0x80:  # one-byte varints (every tag here) without the call
            pos += 1
        else:
            key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 2:
            if pos < n and data[pos] < 0x80:
                length, pos = data[pos], pos + 1
            else:
                length, pos = _varint(data, pos)
            field = key >> 3
            if field == _RAW_INPUTS or field == _ID:
                if pos + length > n:
                    raise _Malformed
                if start > run:
                    kept.append(view[run:start])
                    layout.append(data[run:start])
                layout.append(key)
                if field == _ID:
                    if ident is not None:
                        raise _Malformed  # repeated: protobuf's to read (and check each)
                    ident = view[pos : pos + length]
                else:
                    raw.append(view[pos : pos + length].toreadonly())
                run = pos + length
            pos += length
        elif wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise _Malformed  # groups: not in these messages
        if pos > n:
            raise _Malformed
    if run < n:
        kept.append(view[run:])
        layout.append(data[run:])
    return kept, ident, raw, layout


def _match(layout: Layout, data: bytes) -> tuple[memoryview | None, list[memoryview]] | None:
    """Field 3 and field 7's entries of ``data`` when it has ``layout`` (the same other fields'
    bytes, fields 3 and 7 in the same places, nothing else), else None. A client sends one
    layout call after call: this is a few comparisons made in C, where ``_split`` walks
    every field."""
    view = memoryview(data)
    n = len(data)
    pos = 0
    ident: memoryview | None = None
    raw: list[memoryview] = []
    for item in layout:
        if isinstance(item, bytes):
            if not data.startswith(item, pos):
                return None
            pos += len(item)
            continue
        if pos + 1 >= n or data[pos] != item:
            return None
        if data[pos + 1] < 0x80:
            length, pos = data[pos + 1], pos + 2
        else:
            try:
                length, pos = _varint(data, pos + 1)
            except _Malformed:
                return None
        if pos + length > n:
            return None
        if item == _ID_KEY:
            ident = view[pos : pos + length]
        else:
            raw.append(view[pos : pos + length].toreadonly())
        pos += length
    return (ident, raw) if pos == n else None


class _Template:
    """What ``decode_infer_request`` made of one request's fields but ``id`` and raw data."""

    __slots__ = ("inputs", "layout", "model_name", "model_version", "outputs", "parameters")

    def __init__(self, message: Any, request: InferRequest, layout: Layout) -> None:
        self.layout = layout  # of the last message read with this template's key
        self.model_name: str = message.model_name
        self.model_version: str = message.model_version
        # (name, datatype, shape, and for fixed-size types other than BOOL: dtype and bytes)
        self.inputs = [_input_of(t.name, t.datatype, tuple(t.shape)) for t in message.inputs]
        self.outputs = request.outputs
        self.parameters = request.parameters


def _input_of(name: str, datatype: str, shape: tuple[int, ...]) -> tuple[Any, ...]:
    if datatype in ("BYTES", "BOOL"):  # framed, or values to check: tensor_from_raw's
        return name, datatype, shape, None, 0
    dtype = numpy_dtype(datatype)
    return name, datatype, shape, dtype, math.prod(shape) * dtype.itemsize


_templates: dict[bytes, _Template] = {}
# The template the last request was read with: the next, from the same client, has its layout.
_last: list[_Template | None] = [None]


def _remember(key: bytes, template: _Template) -> None:
    if len(_templates) >= TEMPLATES:
        _templates.pop(next(iter(_templates)), None)  # the oldest
    _templates[key] = template


class RawRequest:
    """A ``ModelInferRequest`` whose ``raw_input_contents`` are views into the received bytes;
    every other attribute is the parsed message's. ``key``: its fixed part's bytes, for a
    template, or None."""

    __slots__ = ("key", "layout", "message", "raw_input_contents", "size")

    def __init__(
        self,
        message: Any,
        raw_input_contents: list[memoryview],
        key: bytes | None = None,
        size: int = 0,
        layout: Layout | None = None,
    ) -> None:
        self.message = message
        self.raw_input_contents = raw_input_contents
        self.key = key
        self.size = size  # of the whole message as received
        self.layout = layout

    def ByteSize(self) -> int:  # protobuf's name: a traced request's size
        return self.size or int(self.message.ByteSize())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


class KnownRequest:
    """A ``ModelInferRequest`` whose fixed part has a template: ``model_name``,
    ``model_version`` and ``id`` without protobuf; any other attribute from the whole message,
    parsed on first use."""

    __slots__ = ("_data", "_message", "id", "raw_input_contents", "template")

    def __init__(self, data: bytes, template: _Template, ident: str, raw: list[memoryview]) -> None:
        self._data = data
        self._message: Any = None
        self.template = template
        self.id = ident
        self.raw_input_contents = raw

    @property
    def model_name(self) -> str:
        return self.template.model_name

    @property
    def model_version(self) -> str:
        return self.template.model_version

    def ByteSize(self) -> int:  # protobuf's name: a traced request's size
        return len(self._data)

    def decode(self) -> InferRequest:
        """What ``decode_infer_request`` makes of the whole message: the same checks of the
        raw data, the same errors."""
        template = self.template
        inputs: dict[str, Any] = {}
        for (name, datatype, shape, dtype, size), raw in zip(
            template.inputs, self.raw_input_contents, strict=True
        ):
            if dtype is not None and len(raw) == size:
                inputs[name] = np.ndarray(shape, dtype, raw)  # a view, as frombuffer's
            else:  # tensor_from_raw checks and says what is wrong
                inputs[name] = tensor_from_raw(raw, datatype, shape, name)
        outputs = template.outputs
        return InferRequest(
            inputs=inputs,
            id=self.id or None,
            outputs=None if outputs is None else list(outputs),
            parameters=dict(template.parameters),
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if self._message is None:
            self._message = pb.ModelInferRequest.FromString(self._data)
        return getattr(self._message, name)


def decode_request(request: Any) -> InferRequest:
    """``decode_infer_request`` of what ``parse_infer_request`` returned; a request that
    decodes leaves its template for the next with the same fixed part."""
    if type(request) is KnownRequest:
        return request.decode()
    decoded = decode_infer_request(request)
    if type(request) is RawRequest and request.key is not None:
        raw = request.raw_input_contents
        if (
            not decoded.shared_inputs
            and len(raw) == len(request.message.inputs)
            and all(out.shared is None for out in decoded.outputs or ())
        ):
            template = _Template(request.message, decoded, request.layout or [])
            _remember(request.key, template)
            _last[0] = template
    return decoded


def parse_infer_request(data: bytes) -> Any:
    """gRPC's request deserializer for ``ModelInfer`` / ``ModelStreamInfer``."""
    template = _last[0]
    matched = _match(template.layout, data) if template is not None else None
    if matched is not None:
        assert template is not None
        ident, raw = matched
    else:
        try:
            kept, ident, raw, layout = _split(data)
        except _Malformed:
            return pb.ModelInferRequest.FromString(data)  # protobuf's own error, as before
        if not raw:
            return pb.ModelInferRequest.FromString(data)
        key = b"".join(kept)
        template = _templates.get(key)
        if template is None or len(raw) != len(template.inputs):
            return _raw_request(data, key, ident, raw, layout)
        template.layout = layout
        _last[0] = template
    text = ""
    if ident is not None:
        try:
            text = str(ident, "utf-8")
        except UnicodeDecodeError:
            return pb.ModelInferRequest.FromString(data)  # protobuf's own error
    return KnownRequest(data, template, text, raw)


def _raw_request(
    data: bytes, key: bytes, ident: memoryview | None, raw: list[memoryview], layout: Layout
) -> Any:
    text = ""
    if ident is not None:
        try:
            text = str(ident, "utf-8")
        except UnicodeDecodeError:
            return pb.ModelInferRequest.FromString(data)  # protobuf's own error
    message = pb.ModelInferRequest.FromString(key)
    if text:
        message.id = text
    if len(key) > TEMPLATE_KEY_BYTES:
        return RawRequest(message, raw, None, len(data))
    return RawRequest(message, raw, key, len(data), layout)


class RawResponse:
    """A ``ModelInferResponse``: its serialized fields but the raw outputs (``head``), and the
    output buffers."""

    __slots__ = ("blobs", "head")

    def __init__(self, head: bytes, blobs: list[memoryview]) -> None:
        self.head = head
        self.blobs = blobs

    def to_message(self) -> Any:
        """The whole message, for where protobuf must hold it (a stream's response)."""
        return pb.ModelInferResponse.FromString(serialize_infer_response(self))


_heads: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}


def _head(response: InferResponse, arrays: list[tuple[str, np.ndarray[Any, Any]]]) -> bytes:
    """``response``'s fields but the raw outputs, serialized in field order as protobuf does:
    name and version (1, 2), id (3), parameters (4), output metadata (5). Without parameters
    the bytes of 1-2 and 5 come from ``_heads``, made once per model, version and outputs."""
    if response.parameters:
        message = pb.ModelInferResponse(
            model_name=response.model_name,
            model_version=response.model_version,
            id=response.id or "",
        )
        parameters_to_proto(response.parameters, message.parameters)
        for name, array in arrays:
            message.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        return bytes(message.SerializeToString())
    key = (
        response.model_name,
        response.model_version,
        *[(name, array.dtype, array.shape) for name, array in arrays],
    )
    parts = _heads.get(key)
    if parts is None:
        first = pb.ModelInferResponse(
            model_name=response.model_name, model_version=response.model_version
        )
        outputs = pb.ModelInferResponse()
        for name, array in arrays:
            outputs.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        parts = (first.SerializeToString(), outputs.SerializeToString())
        if len(_heads) >= TEMPLATES:
            _heads.pop(next(iter(_heads)), None)
        _heads[key] = parts
    if not response.id:
        return parts[0] + parts[1]
    ident = response.id.encode()
    return b"".join((parts[0], _ID_TAG, _encode_varint(len(ident)), ident, parts[1]))


def encode_raw_response(response: InferResponse) -> Any:
    """The answer to a raw request: a ``RawResponse`` when no output is BYTES (whose elements
    are framed, not raw) or in shared memory, and they hold ``WIRE_MIN_BYTES`` or more or the
    answer has no parameters (``_head``'s bytes are kept); else the codec's message."""
    arrays = list(response.outputs.items())
    if (
        response.shared  # outputs written into shared memory: empty entries, as the codec's
        or any(array.dtype.kind in "OSU" for _, array in arrays)
        or (response.parameters and sum(array.nbytes for _, array in arrays) < WIRE_MIN_BYTES)
    ):
        return encode_infer_response(response)
    blobs = [
        memoryview(array.tobytes())  # small: one copy costs less than numpy's view making
        if array.nbytes < 4096
        else np.ascontiguousarray(array).reshape(-1).data.cast("B")
        for _, array in arrays
    ]
    return RawResponse(_head(response, arrays), blobs)


def serialize_infer_response(response: Any) -> bytes:
    """gRPC's response serializer for ``ModelInfer``: one copy of each output's bytes."""
    if not isinstance(response, RawResponse):
        return bytes(response.SerializeToString())
    parts: list[bytes | memoryview] = [response.head]
    for blob in response.blobs:
        parts += (_RAW_OUTPUTS_TAG, _encode_varint(blob.nbytes), blob)
    return b"".join(parts)


_STREAM_ANSWER_TAG = bytes([2 << 3 | 2])  # ModelStreamInferResponse.infer_response


def serialize_stream_response(response: Any) -> bytes:
    """gRPC's response serializer for ``ModelStreamInfer``: a ``ModelStreamInferResponse``, or a
    ``RawResponse`` answer, which is that message's ``infer_response`` alone (the bytes
    protobuf would send for it, without making the message)."""
    if not isinstance(response, RawResponse):
        return bytes(response.SerializeToString())
    inner = serialize_infer_response(response)
    return b"".join((_STREAM_ANSWER_TAG, _encode_varint(len(inner)), inner))
