"""``gateway.grpc.wire``: ModelInfer's raw tensors read as views into the received bytes and
written with one copy, checked against protobuf's own reading and writing of the same bytes.
(The gRPC front end serving through them end to end: ``tests/test_grpc.py``.)"""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from gateway.grpc.codec import decode_infer_request, encode_infer_response
from gateway.grpc.wire import (
    WIRE_MIN_BYTES,
    RawRequest,
    RawResponse,
    encode_raw_response,
    parse_infer_request,
    serialize_infer_response,
)
from gateway.protocol.types import InferResponse


def _request(*arrays: np.ndarray) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m", model_version="1", id="r1")
    message.parameters["timeout"].int64_param = 5
    for i, array in enumerate(arrays):
        message.inputs.add(name=f"IN{i}", datatype="FP32", shape=array.shape)
        message.raw_input_contents.append(array.tobytes())
    message.outputs.add(name="OUT")
    return message


def test_raw_inputs_are_read_only_views_into_the_received_bytes() -> None:
    a = np.arange(150_528, dtype=np.float32).reshape(1, 3, 224, 224)
    b = -np.arange(16, dtype=np.float32).reshape(1, 16)
    wire = _request(a, b).SerializeToString()
    parsed = parse_infer_request(wire)
    assert isinstance(parsed, RawRequest)
    # Everything but the raw data, as protobuf reads it.
    assert (parsed.model_name, parsed.model_version, parsed.id) == ("m", "1", "r1")
    assert [t.name for t in parsed.inputs] == ["IN0", "IN1"]
    request = decode_infer_request(parsed)
    assert request.parameters == {"timeout": 5} and request.outputs is not None
    wire_array = np.frombuffer(wire, dtype=np.uint8)
    for name, want in (("IN0", a), ("IN1", b)):
        got = request.inputs[name]
        np.testing.assert_array_equal(got, want)
        assert np.shares_memory(got, wire_array)  # no copy of the tensor's bytes
        assert not got.flags.writeable  # ORT reads it; nothing may write into the message


def test_fields_in_any_order_and_messages_without_raw_data_read_as_protobuf_reads_them() -> None:
    a = np.ones((1, 20_000), dtype=np.float32)  # 80 KB: past WIRE_MIN_BYTES
    message = _request(a)
    # raw_input_contents (field 7) first, then the other fields: protobuf merges either way.
    raw_first = (
        b"\x3a\x80\xf1\x04"
        + a.tobytes()
        + pb.ModelInferRequest(model_name="m", inputs=message.inputs).SerializeToString()
    )
    parsed = parse_infer_request(raw_first)
    assert isinstance(parsed, RawRequest)
    assert parsed.model_name == "m" and bytes(parsed.raw_input_contents[0]) == a.tobytes()
    plain = pb.ModelInferRequest(model_name="m", id="x" * WIRE_MIN_BYTES)
    plain.inputs.add(name="X", datatype="INT32", shape=[1]).contents.int_contents.append(7)
    assert parse_infer_request(plain.SerializeToString()) == plain
    small = _request(np.ones((1, 4), dtype=np.float32))  # protobuf's path, as before
    assert parse_infer_request(small.SerializeToString()) == small


_PAD = b"\x1a\x80\x80\x04" + b"x" * 65536  # field 3 (id), 64 KiB: past WIRE_MIN_BYTES


@pytest.mark.parametrize(
    "wire",
    [
        _PAD + b"\x3a\xff\xff\xff\xff\x0f",  # a raw entry longer than the message
        _PAD + b"\x3a\x05ab",  # truncated
        _PAD + b"\x0b",  # a group start: not in these messages
        _PAD + b"\x08" + b"\xff" * 11,  # a varint that never ends
    ],
)
def test_malformed_bytes_are_protobufs_to_refuse(wire: bytes) -> None:
    with pytest.raises(DecodeError):
        parse_infer_request(wire)


def _response() -> InferResponse:
    return InferResponse(
        model_name="m",
        model_version="1",
        id="r1",
        parameters={"sequence_end": True},
        outputs={
            "PROBS": np.linspace(0, 1, 20_000, dtype=np.float32).reshape(2, 10_000),
            "HALF": np.arange(6, dtype=np.float16).reshape(2, 3),
            "FLAGS": np.array([[True], [False]]),
            "T": np.arange(6, dtype=np.int64).reshape(3, 2).T,  # not contiguous
        },
    )


def test_a_raw_response_serializes_to_what_protobuf_would_send() -> None:
    response = _response()
    raw = encode_raw_response(response)
    assert isinstance(raw, RawResponse)
    assert np.shares_memory(np.frombuffer(raw.blobs[0], np.uint8), response.outputs["PROBS"])
    wire = serialize_infer_response(raw)
    assert pb.ModelInferResponse.FromString(wire) == encode_infer_response(response)
    assert raw.to_message() == encode_infer_response(response)


def test_bytes_small_outputs_and_plain_messages_keep_protobufs_path() -> None:
    words = np.array([b"ab" * 40_000, b"c"], dtype=object)
    for outputs in ({"W": words}, {"Y": np.ones((1, 10), dtype=np.float32)}):
        response = InferResponse(model_name="m", model_version="1", outputs=outputs)
        message = encode_raw_response(response)
        assert not isinstance(message, RawResponse)
        assert message == encode_infer_response(response)
        assert serialize_infer_response(message) == message.SerializeToString()


def test_outputs_in_shared_memory_keep_the_codecs_empty_entries() -> None:
    response = _response()
    response.shared = {"PROBS"}  # written into the client's region: an empty raw entry
    message = encode_raw_response(response)
    assert not isinstance(message, RawResponse)
    assert message == encode_infer_response(response)
    assert message.raw_output_contents[0] == b""
