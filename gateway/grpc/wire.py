"""The raw tensor fields of ``ModelInfer`` on the wire, without copies of the tensor bytes.

protobuf copies every ``bytes`` field twice on the way in (into its arena while parsing, then
into a new Python ``bytes`` on each access of ``raw_input_contents[i]``) and three times on the
way out (``tobytes``, appending to ``raw_output_contents``, serializing). For a 602 KB image
that is most of what a request costs besides the model. So ``ModelInfer`` messages are read
and written here at the level of the wire format, for those fields only:

- ``parse_infer_request`` walks the top-level fields of the received bytes; each
  ``raw_input_contents`` entry (field 7) becomes a read-only ``memoryview`` into those bytes
  (which it keeps alive), and only the other fields, a few hundred bytes, go to protobuf;
- ``RawResponse`` is a ``ModelInferResponse`` without its raw outputs plus the output arrays'
  buffers; ``serialize_infer_response`` appends each as field 6 after the message's own bytes
  (protobuf merges a repeated field's entries wherever they appear), one copy in all.

Messages under ``WIRE_MIN_BYTES`` keep protobuf's path: copying a few KB costs less than
walking the fields in Python. Anything this reader does not understand goes to protobuf whole,
which then answers as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from gateway.grpc.codec import encode_infer_response, parameters_to_proto
from gateway.protocol.types import InferResponse, datatype_of

__all__ = [
    "WIRE_MIN_BYTES",
    "RawRequest",
    "RawResponse",
    "encode_raw_response",
    "parse_infer_request",
    "serialize_infer_response",
]

WIRE_MIN_BYTES = 64 * 1024
_RAW_INPUTS = 7  # ModelInferRequest.raw_input_contents
_RAW_OUTPUTS_TAG = bytes([6 << 3 | 2])  # ModelInferResponse.raw_output_contents, length-delimited


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
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _split(data: bytes) -> tuple[bytes, list[memoryview]]:
    """(the message's bytes without field 7, field 7's entries as views into ``data``)."""
    view = memoryview(data)
    raw: list[memoryview] = []
    kept: list[memoryview] = []
    pos, run = 0, 0  # run: where the current stretch of other fields began
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            if key >> 3 == _RAW_INPUTS:
                if pos + length > len(data):
                    raise _Malformed
                if start > run:
                    kept.append(view[run:start])
                raw.append(view[pos : pos + length].toreadonly())
                run = pos + length
            pos += length
        else:
            raise _Malformed  # groups: not in these messages
        if pos > len(data):
            raise _Malformed
    if not raw:
        return data, raw
    if run < len(data):
        kept.append(view[run:])
    return b"".join(kept), raw


class RawRequest:
    """A ``ModelInferRequest`` whose ``raw_input_contents`` are views into the received bytes;
    every other attribute is the parsed message's."""

    __slots__ = ("message", "raw_input_contents")

    def __init__(self, message: Any, raw_input_contents: list[memoryview]) -> None:
        self.message = message
        self.raw_input_contents = raw_input_contents

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


def parse_infer_request(data: bytes) -> Any:
    """gRPC's request deserializer for ``ModelInfer`` / ``ModelStreamInfer``."""
    if len(data) < WIRE_MIN_BYTES:
        return pb.ModelInferRequest.FromString(data)
    try:
        header, raw = _split(data)
    except _Malformed:
        return pb.ModelInferRequest.FromString(data)  # protobuf's own error, as before
    message = pb.ModelInferRequest.FromString(header)
    return RawRequest(message, raw) if raw else message


class RawResponse:
    """A ``ModelInferResponse`` (``message``, raw outputs left out) and the output buffers."""

    __slots__ = ("blobs", "message")

    def __init__(self, message: Any, blobs: list[memoryview]) -> None:
        self.message = message
        self.blobs = blobs

    def to_message(self) -> Any:
        """The whole message, for where protobuf must hold it (a stream's response)."""
        message = pb.ModelInferResponse()
        message.CopyFrom(self.message)
        message.raw_output_contents.extend(bytes(blob) for blob in self.blobs)
        return message


def encode_raw_response(response: InferResponse) -> Any:
    """The answer to a raw request: a ``RawResponse`` when no output is BYTES (whose elements
    are framed, not raw) or in shared memory and they hold ``WIRE_MIN_BYTES`` or more, else the
    codec's message."""
    arrays = list(response.outputs.items())
    if (
        response.shared  # outputs written into shared memory: empty entries, as the codec's
        or any(array.dtype.kind in "OSU" for _, array in arrays)
        or sum(array.nbytes for _, array in arrays) < WIRE_MIN_BYTES
    ):
        return encode_infer_response(response)
    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id or "",
    )
    parameters_to_proto(response.parameters, message.parameters)
    blobs = []
    for name, array in arrays:
        message.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        blobs.append(np.ascontiguousarray(array).reshape(-1).data.cast("B"))
    return RawResponse(message, blobs)


def serialize_infer_response(response: Any) -> bytes:
    """gRPC's response serializer for ``ModelInfer``: one copy of each output's bytes."""
    if not isinstance(response, RawResponse):
        return bytes(response.SerializeToString())
    parts: list[bytes | memoryview] = [response.message.SerializeToString()]
    for blob in response.blobs:
        parts += (_RAW_OUTPUTS_TAG, _encode_varint(blob.nbytes), blob)
    return b"".join(parts)
