"""``gateway.grpc.wire``: ModelInfer's raw tensors read as views into the received bytes and
written with one copy, checked against protobuf's own reading and writing of the same bytes.
(The gRPC front end serving through them end to end: ``tests/test_grpc.py``.)"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from gateway.errors import InvalidInput
from gateway.grpc import wire as wire_module
from gateway.grpc.codec import decode_infer_request, encode_infer_response
from gateway.grpc.wire import (
    TEMPLATES,
    WIRE_MIN_BYTES,
    KnownRequest,
    RawRequest,
    RawResponse,
    decode_request,
    encode_raw_response,
    parse_infer_request,
    serialize_infer_response,
    serialize_stream_response,
)
from gateway.protocol.types import InferRequest, InferResponse


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
    small = _request(np.ones((1, 4), dtype=np.float32))
    parsed = parse_infer_request(small.SerializeToString())
    assert (parsed.model_name, parsed.id, list(parsed.inputs)) == ("m", "r1", list(small.inputs))
    assert [bytes(raw) for raw in parsed.raw_input_contents] == list(small.raw_input_contents)


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


def test_bytes_outputs_and_small_answers_with_parameters_keep_protobufs_path() -> None:
    words = np.array([b"ab" * 40_000, b"c"], dtype=object)
    small = {"Y": np.ones((1, 10), dtype=np.float32)}
    for outputs, parameters in (({"W": words}, {}), (small, {"sequence_end": True})):
        response = InferResponse(
            model_name="m", model_version="1", outputs=outputs, parameters=parameters
        )
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


# -- templates: a request's fixed part decoded once, an answer's metadata serialized once ----


def _varied(raw_a: np.ndarray, raw_b: np.ndarray, ident: str) -> pb.ModelInferRequest:
    """The same fixed part every time (model, inputs, outputs, parameters); id and data vary."""
    message = pb.ModelInferRequest(model_name="tpl", model_version="2", id=ident)
    message.parameters["priority"].int64_param = 1
    message.inputs.add(name="A", datatype="INT32", shape=raw_a.shape)
    message.inputs.add(name="B", datatype="BOOL", shape=raw_b.shape)
    message.raw_input_contents.extend([raw_a.tobytes(), raw_b.tobytes()])
    out = message.outputs.add(name="O")
    out.parameters["classification"].int64_param = 2
    return message


def _same(got: InferRequest, want: InferRequest) -> None:
    assert (got.id, got.outputs, got.parameters) == (want.id, want.outputs, want.parameters)
    assert list(got.inputs) == list(want.inputs)
    for name, array in want.inputs.items():
        assert got.inputs[name].dtype == array.dtype
        np.testing.assert_array_equal(got.inputs[name], array)


def test_a_request_with_a_known_fixed_part_decodes_as_protobufs_reading_does() -> None:
    b = np.array([[True, False]])
    first = _varied(np.arange(4, dtype=np.int32).reshape(1, 4), b, "first").SerializeToString()
    parsed = parse_infer_request(first)
    assert isinstance(parsed, RawRequest)  # the first: protobuf parses its fixed part
    assert parsed.ByteSize() == len(first)
    _same(decode_request(parsed), decode_infer_request(pb.ModelInferRequest.FromString(first)))
    for ident in ("second", ""):
        wire = _varied(np.full((1, 4), 7, dtype=np.int32), b, ident).SerializeToString()
        known = parse_infer_request(wire)
        assert isinstance(known, KnownRequest)  # no protobuf parse
        assert (known.model_name, known.model_version, known.id) == ("tpl", "2", ident)
        assert known.ByteSize() == len(wire)
        assert list(known.inputs) == list(pb.ModelInferRequest.FromString(wire).inputs)
        decoded = decode_request(known)
        _same(decoded, decode_infer_request(pb.ModelInferRequest.FromString(wire)))
        decoded.parameters["priority"] = 9  # a request's own: the template is not changed
        decoded.outputs.clear()  # type: ignore[union-attr]
    again = decode_request(parse_infer_request(first))
    assert again.parameters == {"priority": 1} and again.outputs


def _error(decode: Any) -> str:
    with pytest.raises(InvalidInput) as failed:
        decode()
    return failed.value.message


def test_a_known_fixed_part_checks_the_data_as_before() -> None:
    b = np.array([[True, False]])
    first = _varied(np.zeros((1, 4), np.int32), b, "")
    decode_request(parse_infer_request(first.SerializeToString()))
    short = _varied(np.zeros((1, 4), np.int32), b, "")
    short.raw_input_contents[0] = b"\0" * 12  # 3 of 4 elements
    bad_bool = _varied(np.zeros((1, 4), np.int32), b, "")
    bad_bool.raw_input_contents[1] = b"\x00\x07"
    missing = _varied(np.zeros((1, 4), np.int32), b, "")
    del missing.raw_input_contents[1]  # one raw entry for two inputs
    for message in (short, bad_bool, missing):
        wire = message.SerializeToString()
        parsed = parse_infer_request(wire)
        assert isinstance(parsed, KnownRequest) == (message is not missing)
        protobufs = pb.ModelInferRequest.FromString(wire)
        assert _error(lambda: decode_request(parsed)) == _error(  # noqa: B023
            lambda: decode_infer_request(protobufs)  # noqa: B023
        )


def test_templates_are_bounded_and_bad_ids_are_protobufs_to_refuse() -> None:
    for i in range(TEMPLATES + 20):
        message = _request(np.ones((1, 2), dtype=np.float32))
        message.model_name = f"model{i}"
        decode_request(parse_infer_request(message.SerializeToString()))
    assert len(wire_module._templates) <= TEMPLATES
    message = _request(np.ones((1, 2), np.float32)).SerializeToString()
    for bad_id in (message + b"\x1a\x02\xff\xfe", b"\x1a\x02\xff\xfe" + message):
        with pytest.raises(DecodeError):
            parse_infer_request(bad_id)
    twice = parse_infer_request(message + b"\x1a\x02r2")  # protobuf's reading: the last
    assert twice.id == "r2" and bytes(twice.raw_input_contents[0]) == np.ones(2, "f4").tobytes()


@pytest.mark.parametrize("ident", ["", "r-1", "é" * 100])
def test_small_answers_serialize_to_protobufs_bytes(ident: str) -> None:
    outputs = {
        "OUTPUT0": np.arange(16, dtype=np.int32).reshape(1, 16),
        "T": np.arange(6, dtype=np.int64).reshape(3, 2).T,  # not contiguous
        "H": np.ones((2, 0), dtype=np.float16),
    }
    for _ in range(2):  # made, then from the kept metadata
        response = InferResponse(model_name="m", model_version="3", outputs=outputs, id=ident)
        raw = encode_raw_response(response)
        assert isinstance(raw, RawResponse)
        want = encode_infer_response(response)
        assert serialize_infer_response(raw) == want.SerializeToString()
        assert raw.to_message() == want


def test_a_stream_answer_serializes_to_protobufs_bytes() -> None:
    for outputs in (
        {"Y": np.arange(10, dtype=np.float32).reshape(1, 10)},
        _response().outputs,  # past WIRE_MIN_BYTES
    ):
        response = InferResponse(model_name="m", model_version="1", outputs=outputs, id="s1")
        raw = encode_raw_response(response)
        assert isinstance(raw, RawResponse)
        want = pb.ModelStreamInferResponse(infer_response=encode_infer_response(response))
        assert serialize_stream_response(raw) == want.SerializeToString()
    failed = pb.ModelStreamInferResponse(error_message="no")
    assert serialize_stream_response(failed) == failed.SerializeToString()


def test_a_request_in_the_last_ones_layout_is_read_without_walking_its_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The next request from a client has the last one's layout (the same other fields' bytes,
    id and raw data in the same places): read by comparing those bytes, not field by field.
    Anything else (no id, other data sizes, a field more, an id twice, a cut message) is
    walked as before, and every reading is protobuf's."""
    b = np.array([[True, False]])
    decode_request(
        parse_infer_request(_varied(np.zeros((1, 4), np.int32), b, "r").SerializeToString())
    )
    walked = []
    split = wire_module._split
    monkeypatch.setattr(wire_module, "_split", lambda data: walked.append(1) or split(data))
    same_layout = [
        _varied(np.full((1, 4), 7, np.int32), b, "r2"),
        _varied(np.full((1, 4), -1, np.int32), np.array([[False, True]]), "é"),
        _varied(np.full((1, 4), 3, np.int32), b, "x" * 200),  # a longer id: the same layout
    ]
    for message in same_layout:
        wire = message.SerializeToString()
        known = parse_infer_request(wire)
        assert isinstance(known, KnownRequest) and not walked
        _same(decode_request(known), decode_infer_request(pb.ModelInferRequest.FromString(wire)))
    no_id = _varied(np.full((1, 4), 3, np.int32), b, "").SerializeToString()
    bigger = _varied(np.full((1, 8), 3, np.int32), b, "r3").SerializeToString()
    twice = _varied(np.full((1, 4), 3, np.int32), b, "r4").SerializeToString() + b"\x1a\x02r5"
    other = _varied(np.full((1, 4), 3, np.int32), b, "r6")
    other.model_version = "3"
    cut = same_layout[0].SerializeToString()[:-1]
    for wire in (no_id, bigger, twice, other.SerializeToString(), cut):
        walked.clear()
        try:
            got = decode_request(parse_infer_request(wire))
        except (InvalidInput, DecodeError) as exc:
            with pytest.raises(type(exc)):
                decode_infer_request(pb.ModelInferRequest.FromString(wire))
        else:
            _same(got, decode_infer_request(pb.ModelInferRequest.FromString(wire)))
        assert walked  # not the last layout: walked
