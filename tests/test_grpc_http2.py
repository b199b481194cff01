"""The gRPC front end's own HTTP/2 (``grpc_transport = "asyncio"``) at the protocol's edges.

A real gateway subprocess, driven by real clients (``tritonclient.grpc``, ``grpc.aio``) and by
a raw HTTP/2 client written here (frames by hand, ``hpack`` for header blocks) for what no
well-behaved client sends: a bad preface, frames that break the protocol, a header block in
CONTINUATION frames, a reset stream, several calls in one write. After every connection error
the gateway must go on serving. The HPACK block cache is tested directly at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import os
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import hpack
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.batching import clients
from gateway.grpc import http2
from gateway.grpc.calls import grpc_timeout_s, percent_encode
from gateway.grpc.http2 import HeaderDecoder, _changes_table
from gateway.settings import Settings, SettingsError, load_settings
from tests import models
from tests.helpers import GatewayProcess, free_port, get, rss_bytes, start_gateway

MAX_MESSAGE_BYTES = 2 * 1024 * 1024
IMAGE_FLOATS = 3 * 224 * 224  # a 602 KB FP32 image

IDENTITY_CONFIG = """
name: "identity"
max_batch_size: 0
input { name: "X" data_type: TYPE_FP32 dims: [ -1 ] }
output { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] }
"""

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0, 1, 3, 4, 6, 7, 8, 9)  # fmt: skip
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
PROTOCOL_ERROR, FRAME_SIZE_ERROR, COMPRESSION_ERROR = 1, 6, 9
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
SERVICE = "/inference.GRPCInferenceService"


def _identity_onnx() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        "identity",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None])],
    )
    return models.graph_bytes(graph)


GROW_CONFIG = """
name: "grow"
max_batch_size: 0
input { name: "X" data_type: TYPE_FP32 dims: [ -1 ] }
output { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] }
"""


def _grow_onnx() -> bytes:
    """FP32 [n] -> [4n] (the input tiled): an answer four times its request."""
    graph = helper.make_graph(
        [helper.make_node("Tile", ["X", "repeats"], ["Y"])],
        "grow",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None])],
        [helper.make_tensor("repeats", TensorProto.INT64, [1], [4])],
    )
    return models.graph_bytes(graph)


def _start(tmp: Path, *args: str, env: dict[str, str] | None = None) -> tuple[GatewayProcess, str]:
    repo = tmp / "repo"
    if not repo.exists():
        models.add_sub(repo)
        (repo / "identity" / "1").mkdir(parents=True)
        (repo / "identity" / "1" / "model.onnx").write_bytes(_identity_onnx())
        (repo / "identity" / "config.pbtxt").write_text(IDENTITY_CONFIG)
        (repo / "grow" / "1").mkdir(parents=True)
        (repo / "grow" / "1" / "model.onnx").write_bytes(_grow_onnx())
        (repo / "grow" / "config.pbtxt").write_text(GROW_CONFIG)
    grpc_port = free_port()
    gw = start_gateway(
        repo, tmp, "--grpc-port", str(grpc_port), "--grpc-transport", "asyncio",
        "--grpc-max-message-bytes", str(MAX_MESSAGE_BYTES), "--execution-provider", "cpu",
        *args, env=env,
    )  # fmt: skip
    return gw, f"127.0.0.1:{grpc_port}"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str]]:
    gw, address = _start(tmp_path_factory.mktemp("h2"))
    try:
        yield gw, address
    finally:
        gw.stop()


# -- a raw HTTP/2 client --------------------------------------------------------------------


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">BHBBI", n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def message(data: bytes, compressed: bool = False) -> bytes:
    return bytes([1 if compressed else 0]) + struct.pack(">I", len(data)) + data


def simple_request(request_id: str = "") -> bytes:
    request = pb.ModelInferRequest(model_name="simple", id=request_id)
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        request.raw_input_contents.append(np.arange(16, dtype=np.int32).tobytes())
    return request.SerializeToString()


class Raw:
    """One HTTP/2 connection, frames written and read by hand."""

    def __init__(self, address: str, handshake: bool = True) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buffer = b""
        if handshake:
            self.send(PREFACE + frame(SETTINGS, 0, 0))

    def close(self) -> None:
        self.sock.close()

    def send(self, *data: bytes) -> None:
        self.sock.sendall(b"".join(data))

    def headers(self, path: str, *extra: tuple[str, str]) -> bytes:
        return self.encoder.encode([
            (":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", "gateway"), ("content-type", "application/grpc"), ("te", "trailers"),
            *extra,
        ])  # fmt: skip

    def call(self, stream_id: int, path: str, body: bytes, *extra: tuple[str, str]) -> bytes:
        """The frames of one whole call (HEADERS, DATA frames of at most 16 KiB, the last
        with END_STREAM)."""
        data = message(body)
        chunks = [data[i : i + 16384] for i in range(0, len(data), 16384)]
        frames = [frame(DATA, 0, stream_id, chunk) for chunk in chunks[:-1]]
        frames.append(frame(DATA, END_STREAM, stream_id, chunks[-1]))
        return frame(HEADERS, END_HEADERS, stream_id, self.headers(path, *extra)) + b"".join(frames)

    def read_frame(self) -> tuple[int, int, int, bytes] | None:
        """The next frame, or None when the server closed the connection."""
        while True:
            if len(self.buffer) >= 9:
                length = int.from_bytes(self.buffer[:3], "big")
                if len(self.buffer) >= 9 + length:
                    kind, flags = self.buffer[3], self.buffer[4]
                    stream_id = int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
                    payload = self.buffer[9 : 9 + length]
                    self.buffer = self.buffer[9 + length :]
                    return kind, flags, stream_id, payload
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buffer += chunk

    def frames_until_closed(self) -> list[tuple[int, int, int, bytes]]:
        got = []
        while (f := self.read_frame()) is not None:
            got.append(f)
        return got

    def responses(self, count: int) -> dict[int, dict[str, Any]]:
        """Read until ``count`` streams have ended: each one's headers, body and trailers."""
        out: dict[int, dict[str, Any]] = {}
        ended = 0
        while ended < count:
            got = self.read_frame()
            assert got is not None, f"connection closed with {count - ended} answers missing"
            kind, flags, stream_id, payload = got
            if kind == PING and not flags & ACK:
                self.send(frame(PING, ACK, 0, payload))
            if kind == SETTINGS and not flags & ACK:
                self.send(frame(SETTINGS, ACK, 0))
            if kind == GOAWAY:
                raise AssertionError(f"GOAWAY {payload!r}")
            if stream_id == 0:
                continue
            entry = out.setdefault(stream_id, {"headers": {}, "data": b"", "reset": None})
            if kind == HEADERS:
                entry["headers"].update(dict(self.decoder.decode(payload, raw=True)))
            elif kind == DATA:
                entry["data"] += payload
                if payload:  # keep the server's windows open for big answers
                    n = struct.pack(">I", len(payload))
                    self.send(frame(WINDOW_UPDATE, 0, 0, n), frame(WINDOW_UPDATE, 0, stream_id, n))
            elif kind == RST_STREAM:
                entry["reset"] = int.from_bytes(payload, "big")
            if (flags & END_STREAM and kind in (HEADERS, DATA)) or kind == RST_STREAM:
                ended += 1
        return out


def _goaway_code(frames: list[tuple[int, int, int, bytes]]) -> int | None:
    for kind, _, _, payload in frames:
        if kind == GOAWAY:
            return int(struct.unpack(">II", payload[:8])[1])
    return None


def _infer_ok(address: str) -> None:
    client = grpcclient.InferenceServerClient(address)
    try:
        tensors = []
        for name in ("INPUT0", "INPUT1"):
            t = grpcclient.InferInput(name, [1, 16], "INT32")
            t.set_data_from_numpy(np.ones((1, 16), np.int32))
            tensors.append(t)
        result = client.infer("simple", tensors)
        assert result.as_numpy("OUTPUT0").tolist() == [[2] * 16]
    finally:
        client.close()


def _stats(address: str) -> tuple[int, int]:
    client = grpcclient.InferenceServerClient(address)
    try:
        stats = client.get_inference_statistics("simple").model_stats[0]
        return int(stats.execution_count), int(stats.inference_count)
    finally:
        client.close()


# -- connection errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "code"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", PROTOCOL_ERROR, id="http1-preface"),
        pytest.param(PREFACE + frame(PING, 0, 0, b"12345678"), PROTOCOL_ERROR,
                     id="no-settings-first"),
        pytest.param(PREFACE + frame(SETTINGS, 0, 0) + frame(DATA, 0, 0, b"x"), PROTOCOL_ERROR,
                     id="data-on-stream-0"),
        pytest.param(PREFACE + frame(SETTINGS, 0, 0) + frame(DATA, 0, 1, b"x"), PROTOCOL_ERROR,
                     id="data-on-idle-stream"),
        pytest.param(PREFACE + frame(SETTINGS, 0, 0) + frame(PING, 0, 0, b"x" * 20000),
                     6, id="frame-over-max-size"),
        pytest.param(PREFACE + frame(SETTINGS, 0, 0) + frame(PING, 0, 0, b"short"),
                     FRAME_SIZE_ERROR, id="ping-wrong-size"),
        pytest.param(PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 1, b"\xff"),
                     COMPRESSION_ERROR, id="bad-hpack"),
        pytest.param(PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, 0, 1, b"\x83")
                     + frame(PING, 0, 0, b"12345678"), PROTOCOL_ERROR, id="continuation-missing"),
        pytest.param(PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 2, b"\x83"),
                     PROTOCOL_ERROR, id="even-stream-id"),
        pytest.param(PREFACE + frame(SETTINGS, 0, 0) + frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\0"),
                     PROTOCOL_ERROR, id="window-update-of-0"),
    ],
)  # fmt: skip
def test_protocol_error_closes_the_connection_and_the_server_serves_on(
    gateway: tuple[GatewayProcess, str], sent: bytes, code: int
) -> None:
    gw, address = gateway
    raw = Raw(address, handshake=False)
    try:
        raw.send(sent)
        frames = raw.frames_until_closed()  # the server closes the connection
    finally:
        raw.close()
    assert _goaway_code(frames) == code
    _infer_ok(address)
    assert gw.process.poll() is None


def test_settings_ping_and_continuation(gateway: tuple[GatewayProcess, str]) -> None:
    """SETTINGS and PING are acknowledged; a header block split across HEADERS and two
    CONTINUATION frames makes one call."""
    _, address = gateway
    raw = Raw(address)
    try:
        raw.send(frame(PING, 0, 0, b"pingpong"))
        seen: list[tuple[int, int, bytes]] = []
        while not any(k == PING for k, _, _ in seen) or not any(
            k == SETTINGS and f & ACK for k, f, _ in seen
        ):
            got = raw.read_frame()
            assert got is not None
            seen.append((got[0], got[1], got[3]))
        assert (PING, ACK, b"pingpong") in seen
        block = raw.headers(INFER)
        a, b = len(block) // 3, 2 * len(block) // 3
        raw.send(
            frame(HEADERS, 0, 1, block[:a]),
            frame(CONTINUATION, 0, 1, block[a:b]),
            frame(CONTINUATION, END_HEADERS, 1, block[b:]),
            frame(DATA, END_STREAM, 1, message(simple_request("split"))),
        )
        answer = raw.responses(1)[1]
    finally:
        raw.close()
    assert answer["headers"][b"grpc-status"] == b"0"
    reply = pb.ModelInferResponse.FromString(answer["data"][5:])
    assert reply.id == "split" and len(reply.raw_output_contents) == 2


def test_calls_in_one_read_reach_the_batcher_together(
    gateway: tuple[GatewayProcess, str],
) -> None:
    """Four ModelInfer calls in one write are one batch of four: they are all submitted while
    the read is handled, before the batcher runs (grpc.aio's one call per poll made them
    four batches of one)."""
    _, address = gateway
    _infer_ok(address)  # the model has run once: no first-run effects below
    executions, inferences = _stats(address)
    raw = Raw(address)
    try:
        raw.send(b"".join(raw.call(i, INFER, simple_request(str(i))) for i in (1, 3, 5, 7)))
        answers = raw.responses(4)
    finally:
        raw.close()
    assert sorted(answers) == [1, 3, 5, 7]
    for stream_id, answer in answers.items():
        assert answer["headers"][b"grpc-status"] == b"0"
        assert pb.ModelInferResponse.FromString(answer["data"][5:]).id == str(stream_id)
    after = _stats(address)
    assert (after[0] - executions, after[1] - inferences) == (1, 4)


def test_stream_requests_in_one_read_reach_the_batcher_together(
    gateway: tuple[GatewayProcess, str],
) -> None:
    """Four requests in one DATA frame of a ModelStreamInfer stream are one batch of four,
    answered on the stream by id, then OK trailers when the client ends it."""
    _, address = gateway
    _infer_ok(address)
    executions, inferences = _stats(address)
    raw = Raw(address)
    try:
        body = b"".join(message(simple_request(f"s{i}")) for i in range(4))
        raw.send(frame(HEADERS, END_HEADERS, 1, raw.headers(STREAM)),
                 frame(DATA, END_STREAM, 1, body))  # fmt: skip
        answer = raw.responses(1)[1]
    finally:
        raw.close()
    assert answer["headers"][b"grpc-status"] == b"0"
    data, ids = answer["data"], []
    while data:
        length = int.from_bytes(data[1:5], "big")
        reply = pb.ModelStreamInferResponse.FromString(data[5 : 5 + length])
        assert not reply.error_message
        ids.append(reply.infer_response.id)
        data = data[5 + length :]
    assert sorted(ids) == ["s0", "s1", "s2", "s3"]
    after = _stats(address)
    assert (after[0] - executions, after[1] - inferences) == (1, 4)


def test_a_reset_stream_is_dropped_and_the_connection_goes_on(
    gateway: tuple[GatewayProcess, str],
) -> None:
    """The client cancels a stream (RST_STREAM CANCEL) mid-call; the connection's next call
    is answered."""
    _, address = gateway
    raw = Raw(address)
    try:
        raw.send(frame(HEADERS, END_HEADERS, 1, raw.headers(STREAM)),
                 frame(DATA, 0, 1, message(simple_request("before"))))  # fmt: skip
        raw.send(frame(RST_STREAM, 0, 1, struct.pack(">I", 8)))
        raw.send(raw.call(3, INFER, simple_request("after")))
        answers = raw.responses(1)  # stream 1, reset by us, never ends from the server
    finally:
        raw.close()
    assert list(answers) in ([3], [1, 3])
    assert answers[3]["headers"][b"grpc-status"] == b"0"


def test_grpc_timeout_ends_the_call_with_deadline_exceeded(
    gateway: tuple[GatewayProcess, str],
) -> None:
    """A stream that sends nothing outlives its ``grpc-timeout`` (the server's own deadline,
    not the client's)."""
    _, address = gateway
    raw = Raw(address)
    try:
        started = time.monotonic()
        raw.send(frame(HEADERS, END_HEADERS, 1, raw.headers(STREAM, ("grpc-timeout", "300m"))))
        answer = raw.responses(1)[1]
        elapsed = time.monotonic() - started
    finally:
        raw.close()
    deadline_exceeded = str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0]).encode()
    assert answer["headers"][b"grpc-status"] == deadline_exceeded
    assert 0.25 < elapsed < 5


@pytest.mark.parametrize(
    ("path", "extra", "code"),
    [
        (INFER.replace("ModelInfer", "NoSuchMethod"), (), grpc.StatusCode.UNIMPLEMENTED),
        ("/other.Service/ModelInfer", (), grpc.StatusCode.UNIMPLEMENTED),
        (INFER, (("grpc-encoding", "snappy"),), grpc.StatusCode.UNIMPLEMENTED),
    ],
    ids=["unknown-method", "unknown-service", "unknown-encoding"],
)
def test_refused_calls(
    gateway: tuple[GatewayProcess, str], path: str, extra: tuple[tuple[str, str], ...], code: Any
) -> None:
    _, address = gateway
    raw = Raw(address)
    try:
        raw.send(raw.call(1, path, simple_request(), *extra))
        answer = raw.responses(1)[1]
    finally:
        raw.close()
    assert answer["headers"][b"grpc-status"] == str(code.value[0]).encode()


def test_gzip_request_is_inflated(gateway: tuple[GatewayProcess, str]) -> None:
    _, address = gateway
    raw = Raw(address)
    try:
        body = gzip.compress(simple_request("zipped"))
        raw.send(frame(HEADERS, END_HEADERS, 1, raw.headers(INFER, ("grpc-encoding", "gzip"))),
                 frame(DATA, END_STREAM, 1, message(body, compressed=True)))  # fmt: skip
        answer = raw.responses(1)[1]
    finally:
        raw.close()
    assert answer["headers"][b"grpc-status"] == b"0"
    assert pb.ModelInferResponse.FromString(answer["data"][5:]).id == "zipped"
    # and through a real client that compresses
    client = grpcclient.InferenceServerClient(address)
    try:
        t = grpcclient.InferInput("X", [4], "FP32")
        t.set_data_from_numpy(np.full(4, 2.5, np.float32))
        result = client.infer("identity", [t], compression_algorithm="gzip")
        assert result.as_numpy("Y").tolist() == [2.5] * 4
    finally:
        client.close()


def test_grpc_message_is_percent_encoded(gateway: tuple[GatewayProcess, str]) -> None:
    _, address = gateway
    client = grpcclient.InferenceServerClient(address)
    try:
        t = grpcclient.InferInput("X", [1], "FP32")
        t.set_data_from_numpy(np.ones(1, np.float32))
        with pytest.raises(InferenceServerException) as info:
            client.infer("modèle 100%", [t])
    finally:
        client.close()
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"  # not a model name
    assert "modèle 100%" in info.value.message(), info.value.message()


# -- big messages, many streams -------------------------------------------------------------


def test_big_request_and_response_cross_the_flow_control_windows(
    gateway: tuple[GatewayProcess, str],
) -> None:
    """A 602 KB image each way (windows: 64 KB the client's, 4 MiB the server's stream), and
    a message over ``grpc_max_message_bytes`` either way is RESOURCE_EXHAUSTED; the server
    serves on."""
    _, address = gateway
    client = grpcclient.InferenceServerClient(address)
    try:
        image = np.random.default_rng(0).standard_normal(IMAGE_FLOATS).astype(np.float32)
        t = grpcclient.InferInput("X", [IMAGE_FLOATS], "FP32")
        t.set_data_from_numpy(image)
        for _ in range(3):
            np.testing.assert_array_equal(client.infer("identity", [t]).as_numpy("Y"), image)
        big = np.zeros(MAX_MESSAGE_BYTES // 4 + 1, np.float32)
        t = grpcclient.InferInput("X", [big.size], "FP32")
        t.set_data_from_numpy(big)
        channel = grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES)]
        )
        request = pb.ModelInferRequest(model_name="identity")
        request.inputs.add(name="X", datatype="FP32", shape=[big.size])
        request.raw_input_contents.append(big.tobytes())
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        channel.close()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # an answer over the limit (a 602 KB request, a 2.4 MB answer) is refused too
        t = grpcclient.InferInput("X", [IMAGE_FLOATS], "FP32")
        t.set_data_from_numpy(image)
        with pytest.raises(InferenceServerException) as refused:
            client.infer("grow", [t])
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "Sent message larger than max" in str(refused.value.message())
    finally:
        client.close()
    _infer_ok(address)


def test_answers_respect_the_clients_windows(gateway: tuple[GatewayProcess, str]) -> None:
    """A client that allows 1000 bytes per stream gets a 64 KiB answer in DATA frames that
    never overrun what it granted (it grants each frame's size back as it reads)."""
    _, address = gateway
    values = np.arange(16384, dtype=np.float32)
    request = pb.ModelInferRequest(model_name="identity", id="windowed")
    request.inputs.add(name="X", datatype="FP32", shape=[values.size])
    request.raw_input_contents.append(values.tobytes())
    raw = Raw(address, handshake=False)
    sizes: list[int] = []
    try:
        raw.send(PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 1000)))
        raw.send(raw.call(1, INFER, request.SerializeToString()))
        granted = 1000
        body = b""
        while True:
            got = raw.read_frame()
            assert got is not None
            kind, flags, stream_id, payload = got
            if kind == DATA and stream_id == 1:
                assert len(payload) <= granted, "the server overran the stream window"
                sizes.append(len(payload))
                body += payload
                if payload:
                    n = struct.pack(">I", len(payload))
                    raw.send(frame(WINDOW_UPDATE, 0, 0, n), frame(WINDOW_UPDATE, 0, 1, n))
            if kind == HEADERS and stream_id == 1 and flags & END_STREAM:
                status = dict(raw.decoder.decode(payload, raw=True)).get(b"grpc-status")
                break
            if kind == HEADERS and stream_id == 1:
                raw.decoder.decode(payload, raw=True)
    finally:
        raw.close()
    assert status == b"0" and len(sizes) > 60  # in pieces of what was granted
    reply = pb.ModelInferResponse.FromString(body[5:])
    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32), values)


async def test_many_concurrent_calls_and_streams_on_one_channel(
    gateway: tuple[GatewayProcess, str],
) -> None:
    """300 unary calls (more than the 256 streams a connection may hold at once) and 8
    streams of 20 requests each, all at once on one channel; then a cancelled stream."""
    _, address = gateway
    async with grpc.aio.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest.FromString(simple_request())

        async def unary(i: int) -> str:
            request_i = pb.ModelInferRequest()
            request_i.CopyFrom(request)
            request_i.id = str(i)
            return str((await stub.ModelInfer(request_i, timeout=30)).id)

        async def stream(s: int) -> list[str]:
            call = stub.ModelStreamInfer(timeout=30)
            for i in range(20):
                request_i = pb.ModelInferRequest()
                request_i.CopyFrom(request)
                request_i.id = f"{s}-{i}"
                await call.write(request_i)
            await call.done_writing()
            ids = []
            async for answer in call:
                assert not answer.error_message
                ids.append(answer.infer_response.id)
            return ids

        results = await asyncio.gather(
            *(unary(i) for i in range(300)), *(stream(s) for s in range(8))
        )
        assert results[:300] == [str(i) for i in range(300)]
        for s, ids in enumerate(results[300:]):
            assert sorted(ids) == sorted(f"{s}-{i}" for i in range(20))
        call = stub.ModelStreamInfer(timeout=30)
        await call.write(request)
        call.cancel()
        assert (await stub.ModelInfer(request, timeout=10)).model_name == "simple"


# -- shutdown -------------------------------------------------------------------------------


def test_shutdown_sends_goaway_and_lets_running_calls_finish(tmp_path: Path) -> None:
    """SIGTERM: the open connection gets GOAWAY(NO_ERROR, last stream 1); a new stream is
    refused (REFUSED_STREAM: safe to retry elsewhere), the running one is still served to its
    end (OK trailers), then the connection closes and the process exits."""
    gw, address = _start(tmp_path)
    raw = Raw(address)

    def next_on(kinds: tuple[int, ...]) -> tuple[int, int, int, bytes]:
        while True:
            got = raw.read_frame()
            assert got is not None, f"closed while waiting for frame types {kinds}"
            if got[0] in kinds:
                return got

    try:
        raw.send(frame(HEADERS, END_HEADERS, 1, raw.headers(STREAM)),
                 frame(DATA, 0, 1, message(simple_request("early"))))  # fmt: skip
        _, _, stream_id, payload = next_on((DATA,))
        assert stream_id == 1
        assert pb.ModelStreamInferResponse.FromString(payload[5:]).infer_response.id == "early"
        os.kill(gw.process.pid, signal.SIGTERM)
        goaway = next_on((GOAWAY,))
        assert struct.unpack(">II", goaway[3][:8]) == (1, 0)
        raw.send(frame(HEADERS, END_HEADERS, 3, raw.headers(STREAM)))
        assert next_on((RST_STREAM,))[2:] == (3, struct.pack(">I", 7))
        raw.send(frame(DATA, END_STREAM, 1))
        trailers = next_on((HEADERS,))
        assert trailers[1] & END_STREAM and trailers[2] == 1
        assert dict(raw.decoder.decode(trailers[3], raw=True))[b"grpc-status"] == b"0"
        raw.frames_until_closed()  # the server closes the connection (or this times out)
    finally:
        raw.close()
    assert gw.process.wait(timeout=20) in (0, -signal.SIGTERM)  # uvicorn re-raises it


async def test_a_connection_that_never_says_http2_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The handshake timeout (slowloris): a bare ``http2.Connection`` on a loopback socket,
    the client sending nothing, is closed with GOAWAY after ``HANDSHAKE_TIMEOUT_S``."""
    monkeypatch.setattr(http2, "HANDSHAKE_TIMEOUT_S", 0.2)
    loop = asyncio.get_running_loop()

    def refuse(stream: http2.Stream, headers: http2.Headers) -> Any:
        raise AssertionError("no stream expected")

    server = await loop.create_server(lambda: http2.Connection(refuse, loop), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        received = await asyncio.wait_for(reader.read(), 5)  # until the server closes
        elapsed = time.monotonic() - started
        writer.close()
    finally:
        server.close()
    assert 0.15 < elapsed < 3
    frames = []
    while received:
        length = int.from_bytes(received[:3], "big")
        frames.append((received[3], 0, 0, received[9 : 9 + length]))
        received = received[9 + length :]
    assert _goaway_code(frames) == PROTOCOL_ERROR


# -- pure functions -------------------------------------------------------------------------


def test_header_blocks_are_reused_only_while_the_table_stands() -> None:
    """A client's blocks in order, decoded with the cache, equal a plain decoder's, including
    the same bytes after an insertion moved what their indexes point at."""
    encoder = hpack.Encoder()
    base = [(":method", "POST"), (":path", "/a"), ("x-key", "one")]
    blocks = [encoder.encode(base), encoder.encode(base)]  # the second: indexed fields only
    blocks.append(encoder.encode([("x-other", "two")]))  # inserts: index 62 moves
    blocks.append(blocks[1])  # same bytes, now meaning something else
    blocks.append(blocks[1])
    assert not _changes_table(blocks[1]) and _changes_table(blocks[0])
    ours, plain = HeaderDecoder(), hpack.Decoder()
    for block in blocks:
        want = [(bytes(k), bytes(v)) for k, v in plain.decode(block, raw=True)]
        assert ours.decode(block) == want
    assert ours.decode(blocks[4]) != [(k.encode(), v.encode()) for k, v in base]


def test_grpc_timeout_and_message_encoding() -> None:
    assert grpc_timeout_s(b"300m") == pytest.approx(0.3)
    assert grpc_timeout_s(b"2S") == 2.0 and grpc_timeout_s(b"1H") == 3600.0
    assert grpc_timeout_s(b"123456789S") is None and grpc_timeout_s(b"5x") is None
    assert percent_encode("ok 100%\n é") == b"ok 100%25%0A %C3%A9"


def test_grpc_transport_setting() -> None:
    assert Settings().grpc_transport == "asyncio"
    assert load_settings(None, env={"GATEWAY_GRPC_TRANSPORT": "grpcio"}).grpc_transport == "grpcio"
    with pytest.raises(SettingsError, match="grpc_transport"):
        Settings(grpc_transport="h3")


# -- attacks: what a hostile client sends (the HTTP/2 CVEs of recent years) ----------------

ENHANCE_YOUR_CALM, CANCEL, INITIAL_WINDOW_SIZE = 11, 8, 4
SEND_TIMEOUT_S = 3.0
IDLE_S = 1.5


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str]]:
    """A gateway with short connection limits: 1 s to say HTTP/2, 1.5 s idle, 3 s without
    taking answer bytes, 3 connections."""
    gw, address = _start(
        tmp_path_factory.mktemp("h2limits"), "--grpc-send-timeout-s", str(SEND_TIMEOUT_S),
        env={"GATEWAY_HEADER_TIMEOUT_S": "1", "GATEWAY_GRPC_IDLE_TIMEOUT_S": str(IDLE_S),
             "GATEWAY_MAX_CONNECTIONS": "3"},
    )  # fmt: skip
    try:
        yield gw, address
    finally:
        gw.stop()


def test_endless_empty_continuation_frames_close_the_connection(
    gateway: tuple[GatewayProcess, str],
) -> None:
    """CONTINUATION flood (CVE-2024-27316 family): empty frames add no bytes, so only a bound
    on their count stops them; GOAWAY ENHANCE_YOUR_CALM, and the server serves on."""
    gw, address = gateway
    raw = Raw(address)
    raw.sock.settimeout(5)
    try:
        block = raw.headers(INFER)
        raw.send(frame(HEADERS, 0, 1, block[:4]), frame(CONTINUATION, 0, 1) * 5000)
        frames = raw.frames_until_closed()
    finally:
        raw.close()
    assert _goaway_code(frames) == ENHANCE_YOUR_CALM
    _infer_ok(address)
    assert gw.process.poll() is None


def test_header_block_cache_holds_only_small_blocks() -> None:
    """Distinct large literal blocks (no table change) are decoded but not kept: a connection
    does not hold 64 blocks of up to 64 KiB each."""
    ours = HeaderDecoder()
    for i in range(64):
        block = http2.header_block([(b"x-pad", b"%02d" % i + b"p" * 60000)])
        assert not _changes_table(block)
        assert ours.decode(block)[0][1][:2] == b"%02d" % i
    small = http2.header_block([(b":path", b"/a")])
    ours.decode(small)
    assert sum(len(block) for block in ours._cache) <= 64 * 1024
    assert small in ours._cache


@pytest.mark.parametrize(
    "extra",
    [
        (("X-Upper", "1"),),
        (("connection", "keep-alive"),),
        (("transfer-encoding", "chunked"),),
        (("te", "gzip"),),
        ((":protocol", "x"),),
    ],
    ids=["uppercase-name", "connection", "transfer-encoding", "te-not-trailers", "bad-pseudo"],
)
def test_malformed_request_headers_reset_the_stream_only(
    gateway: tuple[GatewayProcess, str], extra: tuple[tuple[str, str], ...]
) -> None:
    """RFC 9113 8.2: a malformed request is a stream error (RST_STREAM PROTOCOL_ERROR); the
    connection goes on and answers the next call."""
    _, address = gateway
    raw = Raw(address)
    try:
        raw.send(raw.call(1, INFER, simple_request(), *extra))
        raw.send(raw.call(3, INFER, simple_request("next")))
        answers = raw.responses(2)
    finally:
        raw.close()
    assert answers[1]["reset"] == PROTOCOL_ERROR and not answers[1]["headers"]
    assert answers[3]["headers"][b"grpc-status"] == b"0"


def test_pseudo_header_after_a_field_and_missing_path_are_malformed() -> None:
    good = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/x"), (b"te", b"trailers")]
    assert http2.request_problem(good) is None
    assert http2.request_problem([*good[1:], good[0]]) is not None
    assert http2.request_problem(good[:2]) is not None
    assert http2.request_problem([good[0], *good]) is not None


def test_wrong_method_and_content_type(gateway: tuple[GatewayProcess, str]) -> None:
    """gRPC over HTTP/2: a content-type not ``application/grpc`` is 415, a method not POST 405."""
    _, address = gateway
    raw = Raw(address)
    try:
        block = raw.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", INFER),
                                    ("content-type", "text/plain")])  # fmt: skip
        get = raw.encoder.encode([(":method", "GET"), (":scheme", "http"), (":path", INFER),
                                  ("content-type", "application/grpc")])  # fmt: skip
        raw.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, block),
                 frame(HEADERS, END_HEADERS | END_STREAM, 3, get))  # fmt: skip
        answers = raw.responses(2)
    finally:
        raw.close()
    assert answers[1]["headers"][b":status"] == b"415"
    assert answers[3]["headers"][b":status"] == b"405"


def test_rapid_reset_closes_the_connection(gateway: tuple[GatewayProcess, str]) -> None:
    """CVE-2023-44487: calls opened and reset at once, by the thousand, in one write. Past
    the reset budget the connection gets GOAWAY ENHANCE_YOUR_CALM; the requests already
    submitted are cancelled, not run to the end, and others are served meanwhile."""
    gw, address = gateway
    before = _stats(address)
    raw = Raw(address)
    raw.sock.settimeout(10)
    try:
        sid, out = 1, []
        for _ in range(2000):
            out.append(raw.call(sid, INFER, simple_request()))
            out.append(frame(RST_STREAM, 0, sid, struct.pack(">I", CANCEL)))
            sid += 2
        raw.send(*out)
        frames = raw.frames_until_closed()
    finally:
        raw.close()
    assert _goaway_code(frames) == ENHANCE_YOUR_CALM
    _infer_ok(address)
    after = _stats(address)
    assert after[1] - before[1] < 1000  # most resets cancelled their request (or it was not read)
    assert gw.process.poll() is None
    status, metrics = get(f"{gw.url}/metrics")
    counted = [
        line
        for line in metrics.decode().splitlines()
        if line.startswith('gateway_grpc_http2_events_total{event="rapid_reset"}')
    ]
    assert status == 200 and counted and float(counted[0].split()[-1]) >= 1, counted


def test_cancelling_fewer_than_half_the_calls_keeps_the_connection(
    gateway: tuple[GatewayProcess, str],
) -> None:
    """A client cancelling on its deadlines while most calls complete is not closed, however
    many it cancels (Envoy's rule): 600 cancelled among 1200 answered."""
    _, address = gateway
    raw = Raw(address)
    answers: dict[int, dict[str, Any]] = {}
    try:
        for round_ in range(10):  # 180 streams a round: under the 256 concurrent
            out = []
            for i in range(60 * round_, 60 * round_ + 60):
                good, other, bad = 6 * i + 1, 6 * i + 3, 6 * i + 5
                out += [raw.call(good, INFER, simple_request()),
                        raw.call(other, INFER, simple_request()),
                        frame(HEADERS, END_HEADERS, bad, raw.headers(INFER)),
                        frame(RST_STREAM, 0, bad, struct.pack(">I", CANCEL))]  # fmt: skip
            raw.send(*out)
            answers.update(raw.responses(120))  # raises on GOAWAY
    finally:
        raw.close()
    assert len(answers) == 1200
    assert all(a["headers"].get(b"grpc-status") == b"0" for a in answers.values())


def _zero_window(address: str) -> Raw:
    raw = Raw(address, handshake=False)
    raw.send(PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", INITIAL_WINDOW_SIZE, 0)))
    return raw


def test_answers_a_client_never_takes_are_bounded(limited: tuple[GatewayProcess, str]) -> None:
    """A zero stream window (the client never grants any): the answers wait unsent, up to the
    connection's bound (64 MiB here); the calls past it end with RESOURCE_EXHAUSTED (their
    trailers are not flow-controlled), other connections are served meanwhile, and the
    connection, which takes nothing, is closed after ``grpc_send_timeout_s``."""
    gw, address = limited
    rss_before = rss_bytes(gw.process.pid)
    raw = _zero_window(address)
    floats = 480 * 1024  # 1.875 MiB per answer, under the 2 MiB message limit
    request = pb.ModelInferRequest(model_name="identity")
    request.inputs.add(name="X", datatype="FP32", shape=[floats])
    request.raw_input_contents.append(np.ones(floats, np.float32).tobytes())
    body = request.SerializeToString()
    calls = 48  # 90 MiB of answers
    started = time.monotonic()
    try:
        for i in range(calls):
            raw.send(raw.call(1 + 2 * i, INFER, body))
        statuses: dict[int, bytes] = {}
        while (got := raw.read_frame()) is not None:
            kind, _, stream_id, payload = got
            if kind == HEADERS:
                block = dict(raw.decoder.decode(payload, raw=True))
                if b"grpc-status" in block:
                    statuses[stream_id] = block[b"grpc-status"]
            if kind == GOAWAY:
                goaway = int(struct.unpack(">II", payload[:8])[1])
        elapsed = time.monotonic() - started
    finally:
        raw.close()
    exhausted = str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]).encode()
    assert 0 < list(statuses.values()).count(exhausted) <= calls - 30  # 30 x 1.875 < 64 MiB
    assert goaway == ENHANCE_YOUR_CALM
    assert SEND_TIMEOUT_S <= elapsed < SEND_TIMEOUT_S + 20
    _infer_ok(address)
    assert rss_bytes(gw.process.pid) - rss_before < 200 * 1024 * 1024


def test_a_connection_that_never_says_http2_gets_header_timeout(
    limited: tuple[GatewayProcess, str],
) -> None:
    _, address = limited
    raw = Raw(address, handshake=False)
    started = time.monotonic()
    try:
        frames = raw.frames_until_closed()
    finally:
        raw.close()
    assert _goaway_code(frames) == PROTOCOL_ERROR
    assert time.monotonic() - started < 5  # header_timeout_s (1), not the 10 s default


def test_an_idle_connection_is_closed_and_pings_keep_one_open(
    limited: tuple[GatewayProcess, str],
) -> None:
    """No stream and no PING for grpc_idle_timeout_s: GOAWAY NO_ERROR, then closed."""
    _, address = limited
    idle, pinging = Raw(address), Raw(address)
    try:
        started = time.monotonic()
        while time.monotonic() - started < IDLE_S * 2:
            pinging.send(frame(PING, 0, 0, b"12345678"))
            time.sleep(IDLE_S / 4)
        pinging.send(pinging.call(1, INFER, simple_request()))
        assert pinging.responses(1)[1]["headers"][b"grpc-status"] == b"0"
        frames = idle.frames_until_closed()
    finally:
        idle.close()
        pinging.close()
    assert _goaway_code(frames) == 0


def test_connections_over_max_connections_are_refused(
    limited: tuple[GatewayProcess, str],
) -> None:
    _, address = limited
    held = [Raw(address) for _ in range(3)]
    try:
        for raw in held:  # the handshake is done: each connection is counted
            raw.send(frame(PING, 0, 0, b"12345678"))
            while (got := raw.read_frame()) is not None and got[0] != PING:
                pass
        extra = Raw(address)
        frames = extra.frames_until_closed()
        extra.close()
        assert _goaway_code(frames) == ENHANCE_YOUR_CALM
    finally:
        for raw in held:
            raw.close()
    time.sleep(0.3)
    _infer_ok(address)


def test_hpack_bomb_is_a_connection_error(gateway: tuple[GatewayProcess, str]) -> None:
    """An HPACK bomb: one 4 KB field in the table, then one-byte references to it; decoding
    stops at 64 KiB of header list (COMPRESSION_ERROR), not at 48 MB."""
    gw, address = gateway
    raw = Raw(address)
    try:
        big = hpack.Encoder().encode([("x-bomb", "v" * 4000)])  # literal with indexing: 62
        block = big + b"\xbe" * 12000
        raw.send(frame(HEADERS, END_HEADERS, 1, block))
        frames = raw.frames_until_closed()
    finally:
        raw.close()
    assert _goaway_code(frames) == COMPRESSION_ERROR
    _infer_ok(address)
    assert gw.process.poll() is None


def test_a_ping_flood_never_read_is_bounded_and_closed(
    limited: tuple[GatewayProcess, str],
) -> None:
    """PINGs sent without end and their ACKs never read: the gateway stops reading the
    connection once its socket buffer is full (memory stays bounded), serves others, and
    closes the connection after ``grpc_send_timeout_s`` without progress."""
    gw, address = limited
    rss_before = rss_bytes(gw.process.pid)
    raw = Raw(address)
    raw.sock.settimeout(1)
    pings = frame(PING, 0, 0, b"12345678") * 4096
    sent = 0
    try:
        started = time.monotonic()
        while time.monotonic() - started < 10:
            try:
                raw.sock.sendall(pings)
            except TimeoutError:
                break  # the gateway stopped reading
            sent += len(pings)
        assert time.monotonic() - started < 10, "the gateway read PINGs without end"
        _infer_ok(address)
        time.sleep(SEND_TIMEOUT_S + 1)
        raw.sock.settimeout(10)
        closed = False
        try:
            while raw.sock.recv(1 << 20):
                pass
            closed = True
        except ConnectionResetError:
            closed = True
    finally:
        raw.close()
    assert closed
    assert rss_bytes(gw.process.pid) - rss_before < 100 * 1024 * 1024


def test_one_byte_data_frames_are_bounded(gateway: tuple[GatewayProcess, str]) -> None:
    """A 200 KB request in 1-byte DATA frames: the pieces are copied together, not kept as
    200 000 views (~40 MB, and a quadratic cut); the call is answered normally."""
    gw, address = gateway
    raw = Raw(address)
    floats = 50_000
    request = pb.ModelInferRequest(model_name="identity", id="tiny")
    request.inputs.add(name="X", datatype="FP32", shape=[floats])
    request.raw_input_contents.append(np.ones(floats, np.float32).tobytes())
    data = message(request.SerializeToString())
    rss_before = rss_bytes(gw.process.pid)
    try:
        raw.send(frame(HEADERS, END_HEADERS, 1, raw.headers(INFER)))
        raw.send(b"".join(frame(DATA, 0, 1, data[i : i + 1]) for i in range(len(data) - 1)))
        raw.send(frame(PING, 0, 0, b"87654321"))  # its ACK: every DATA frame was read
        while (got := raw.read_frame()) is not None and not (got[0] == PING and got[1] & ACK):
            pass
        grown = rss_bytes(gw.process.pid) - rss_before
        raw.send(frame(DATA, END_STREAM, 1, data[-1:]))
        answer = raw.responses(1)[1]
    finally:
        raw.close()
    assert answer["headers"][b"grpc-status"] == b"0"
    assert pb.ModelInferResponse.FromString(answer["data"][5:]).id == "tiny"
    assert grown < 20 * 1024 * 1024


def test_a_unary_call_with_many_messages_fails_at_the_second(
    gateway: tuple[GatewayProcess, str],
) -> None:
    """Tiny messages by the hundred thousand on a unary call are not buffered to the end: the
    second one ends the call (INTERNAL), before the client's END_STREAM."""
    _, address = gateway
    raw = Raw(address)
    try:
        raw.send(frame(HEADERS, END_HEADERS, 1, raw.headers(INFER)))
        blob = message(b"x") * 2000
        for _ in range(50):
            raw.send(frame(DATA, 0, 1, blob))
        answer = raw.responses(1)[1]  # no END_STREAM sent
    finally:
        raw.close()
    assert answer["headers"][b"grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0]).encode()


def test_settings_with_thousands_of_window_sizes_are_cheap(
    gateway: tuple[GatewayProcess, str],
) -> None:
    """SETTINGS frames full of INITIAL_WINDOW_SIZE entries, with 255 streams open: the window
    is applied once per frame, not once per entry and stream (2730 x 255 each)."""
    _, address = gateway
    raw = Raw(address)
    try:
        raw.send(*(frame(HEADERS, END_HEADERS, 1 + 2 * i, raw.headers(INFER)) for i in range(255)))
        entries = b"".join(struct.pack(">HI", INITIAL_WINDOW_SIZE, 65535 + i % 2)
                           for i in range(2730))  # fmt: skip
        started = time.monotonic()
        raw.send(frame(SETTINGS, 0, 0, entries) * 60, frame(PING, 0, 0, b"87654321"))
        while (got := raw.read_frame()) is not None and not (got[0] == PING and got[1] & ACK):
            pass
        elapsed = time.monotonic() - started
        _infer_ok(address)
    finally:
        raw.close()
    assert got is not None
    assert elapsed < 5  # ~42 M window updates otherwise


def _simple_message(request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="simple", id=request_id)
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        request.raw_input_contents.append(np.arange(16, dtype=np.int32).tobytes())
    return request


@contextlib.asynccontextmanager
async def _in_process_server(tmp_path: Path) -> AsyncIterator[Any]:
    """The HTTP/2 gRPC server with ``simple`` (``sub``), in this process: its objects and the
    loop's state can be looked at."""
    from gateway.backends.onnxruntime import OnnxRuntimeFactory
    from gateway.dataplane import DataPlane
    from gateway.grpc.calls import Http2GrpcServer
    from gateway.repository.local import LocalRepository

    models.add_sub(tmp_path)
    settings = Settings(model_repo=str(tmp_path), warmup=False)
    dataplane = DataPlane(settings, LocalRepository(tmp_path), OnnxRuntimeFactory(settings))
    await dataplane.start()
    server = Http2GrpcServer(dataplane, "127.0.0.1", 0, MAX_MESSAGE_BYTES)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        await dataplane.stop()


async def test_finished_calls_leave_no_reference_cycle(tmp_path: Path) -> None:
    """Calls and their streams are freed as they end, by reference counting: a call and its
    stream, or its context, pointing at each other left every call to the cycle collector,
    whose passes (one per ~1,500 calls, ~10,000 objects) were a p99 stall. Answered, failed,
    refused, streamed and cancelled calls alike; the server runs in this process so that its
    objects can be counted."""
    from gateway.grpc.calls import Call

    async with _in_process_server(tmp_path) as server:
        gc.collect()
        gc.disable()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                for i in range(20):
                    answer = await stub.ModelInfer(_simple_message(str(i)))
                    assert answer.id == str(i)
                with pytest.raises(grpc.aio.AioRpcError) as failed:  # ended by the transport
                    await channel.unary_unary(INFER)(b"\xff")
                assert failed.value.code() == grpc.StatusCode.INTERNAL
                with pytest.raises(grpc.aio.AioRpcError) as refused:  # ended as it opens
                    await channel.unary_unary(f"{SERVICE}/NoSuchMethod")(b"")
                assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
                assert (await stub.ServerLive(pb.ServerLiveRequest())).live
                streamed = stub.ModelStreamInfer(iter([_simple_message("a"), _simple_message("b")]))
                assert sorted([r.infer_response.id async for r in streamed]) == ["a", "b"]
                cancelled = stub.ModelStreamInfer()
                await cancelled.write(_simple_message("c"))
                await cancelled.read()
                cancelled.cancel()
                await asyncio.sleep(0.2)  # the cancel reaches the server
                left = [o for o in gc.get_objects() if isinstance(o, Call | http2.Stream)]
        finally:
            gc.enable()
    assert left == []


async def test_a_connection_counts_as_the_most_infer_calls_it_has_had_open_at_once(
    tmp_path: Path,
) -> None:
    """An HTTP/2 connection carries any number of calls at once; the batcher counts it at the
    most ``ModelInfer`` calls it has had open at once (clients sharing it wait for their
    answers, as perf_analyzer's gRPC clients do). Other calls (perf_analyzer asks for
    statistics while its requests run) send nothing to a batcher and are not counted; the
    count grows with the calls and never shrinks (``gateway.batching.clients``)."""
    loop = asyncio.get_running_loop()
    encoder = hpack.Encoder()

    def opens(stream_id: int, path: str = INFER) -> bytes:  # a call whose message is to come
        fields = [
            (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "a"),
            ("content-type", "application/grpc"), ("te", "trailers"),
        ]  # fmt: skip
        return frame(HEADERS, END_HEADERS, stream_id, encoder.encode(fields))

    async def answered(stream_id: int) -> None:  # read up to the call's END_STREAM
        while True:
            head = await reader.readexactly(9)
            payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
            if head[3] == HEADERS and head[4] & END_STREAM:
                assert int.from_bytes(head[5:9], "big") == stream_id, payload
                return

    async def may_send(outstanding: int) -> int | None:
        await asyncio.sleep(0.05)  # what was written reaches the server
        clients._BY_LOOP[loop].first_s -= clients.RECENT_FIRST_S  # not "lately"
        return clients.may_send(loop, outstanding)

    async with _in_process_server(tmp_path) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(PREFACE + frame(SETTINGS, 0, 0))
        assert await may_send(0) == 0  # no ModelInfer call yet
        writer.write(opens(1) + opens(3) + opens(5) + opens(7, f"{SERVICE}/ModelStatistics"))
        assert [await may_send(n) for n in (0, 2, 3)] == [3, 1, 0]
        writer.write(frame(DATA, END_STREAM, 1, message(simple_request("a"))))
        await asyncio.wait_for(answered(1), 10)
        writer.write(opens(9))  # three again: no more
        assert await may_send(3) == 0
        writer.write(opens(11))  # four
        assert await may_send(3) == 1
        writer.close()
        await asyncio.sleep(0.05)
        assert loop not in clients._BY_LOOP


async def test_a_streaming_call_leaves_who_may_send_unknown_while_it_is_open(
    tmp_path: Path,
) -> None:
    """One ``ModelStreamInfer`` stream carries any number of requests at once: while it is
    open the batcher cannot count who may still send; once it ends, its connection counts
    again at the most calls it had open at once (``gateway.batching.clients``)."""
    loop = asyncio.get_running_loop()

    def may_send() -> int | None:
        clients._BY_LOOP[loop].first_s -= clients.RECENT_FIRST_S  # not "lately"
        return clients.may_send(loop, 0)

    async with (
        _in_process_server(tmp_path) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert (await stub.ModelInfer(_simple_message("1"))).id == "1"
        assert may_send() == 1
        streamed = stub.ModelStreamInfer()
        await streamed.write(_simple_message("a"))
        assert (await streamed.read()).infer_response.id == "a"
        assert may_send() is None
        await streamed.done_writing()
        assert await streamed.read() == grpc.aio.EOF
        await asyncio.sleep(0.1)  # the stream's end reaches the server
        assert may_send() == 1
    assert loop not in clients._BY_LOOP


def _call_headers(*extra: tuple[bytes, bytes], path: bytes = INFER.encode()) -> http2.Headers:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", b"127.0.0.1"),
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc"),
        *extra,
    ]


def test_a_header_list_seen_again_is_not_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection's HPACK decoder hands back the same header list for a block it has seen,
    and a client's calls repeat one block: what the list decides (method, handler, deadline,
    refusal) is read once per list. Lists are told apart by identity, not by equality; only
    small ones are kept, and only ``OPENINGS`` of them."""
    from gateway.backends.onnxruntime import OnnxRuntimeFactory
    from gateway.dataplane import DataPlane
    from gateway.grpc import calls
    from gateway.repository.local import LocalRepository

    settings = Settings(model_repo=str(tmp_path), api_keys=("k1",))
    dataplane = DataPlane(settings, LocalRepository(tmp_path), OnnxRuntimeFactory(settings))
    server = calls.Http2GrpcServer(dataplane, "127.0.0.1", 0, MAX_MESSAGE_BYTES)
    reads: list[http2.Headers] = []
    read = calls.read_opening
    monkeypatch.setattr(calls, "read_opening", lambda h, s: reads.append(h) or read(h, s))
    allowed = _call_headers(
        (b"x-api-key", b"k1"), (b"grpc-timeout", b"3S"), (b"grpc-timeout", b"2S")
    )
    first = server.opening(allowed)
    assert (first.method, first.failure, first.timeout_s) == ("ModelInfer", None, 2.0)
    assert server.opening(allowed) is first and len(reads) == 1
    assert server.opening(list(allowed)) == first and len(reads) == 2  # equal, not the same
    wrong_key = server.opening(_call_headers((b"x-api-key", b"k2")))
    assert wrong_key.failure is not None
    assert wrong_key.failure[0] == grpc.StatusCode.UNAUTHENTICATED
    assert server.opening(_call_headers(path=b"/nope")).failure == (
        grpc.StatusCode.UNIMPLEMENTED, "Method not found: /nope")  # fmt: skip
    bad = _call_headers((b"grpc-encoding", b"br"), path=b"/nope")  # the encoding first
    assert server.opening(bad).failure == (
        grpc.StatusCode.UNIMPLEMENTED, "unsupported grpc-encoding b'br'")  # fmt: skip
    assert server.opening([(b":method", b"GET"), *allowed[1:]]).status == b"405"
    big = _call_headers((b"x-api-key", b"k1"), (b"x-pad", b"p" * 4096))
    server.opening(big)
    server.opening(big)
    assert reads[-2:] == [big, big]  # a large list: read every time, never kept
    lists = [_call_headers((b"x-api-key", b"k1"), (b"n", str(i).encode())) for i in range(300)]
    for headers in lists:
        server.opening(headers)
    assert len(server._openings) <= calls.OPENINGS


def test_a_602_kb_image_goes_out_whole_without_waiting_for_window(
    gateway: tuple[GatewayProcess, str],
) -> None:
    """The windows the server grants at the start (SETTINGS INITIAL_WINDOW_SIZE, the
    connection's WINDOW_UPDATE) take a 602 KB request whole: over a link with latency, a
    client never waits a round trip for a WINDOW_UPDATE in the middle of an image."""
    _, address = gateway
    request = pb.ModelInferRequest(model_name="identity", id="image")
    request.inputs.add(name="X", datatype="FP32", shape=[IMAGE_FLOATS])
    request.raw_input_contents.append(np.ones(IMAGE_FLOATS, np.float32).tobytes())
    body = request.SerializeToString()
    raw = Raw(address)
    try:
        stream_window = connection_window = 65535  # the protocol's defaults until told
        while True:
            got = raw.read_frame()
            assert got is not None
            kind, flags, stream_id, payload = got
            if kind == SETTINGS and not flags & ACK:
                for i in range(0, len(payload), 6):
                    key, value = struct.unpack_from(">HI", payload, i)
                    if key == 4:  # INITIAL_WINDOW_SIZE
                        stream_window = value
                raw.send(frame(SETTINGS, ACK, 0))
            elif kind == WINDOW_UPDATE and stream_id == 0:
                connection_window += int.from_bytes(payload, "big")
                break
        assert min(stream_window, connection_window) >= len(message(body))
        raw.send(raw.call(1, INFER, body))  # all of it, within what was granted
        answer = raw.responses(1)[1]
    finally:
        raw.close()
    assert answer["headers"][b"grpc-status"] == b"0"
    reply = pb.ModelInferResponse.FromString(answer["data"][5:])
    assert reply.id == "image" and len(reply.raw_output_contents[0]) == 4 * IMAGE_FLOATS


class _Collect:
    """A stream handler that records what its stream's request brought."""

    def __init__(self, stream: http2.Stream, got: list[tuple[int, Any]]) -> None:
        self.stream, self.got = stream, got

    def data(self, payload: memoryview) -> None:
        self.got.append((self.stream.id, payload))

    def end(self) -> None:
        self.got.append((self.stream.id, None))

    def reset(self) -> None:
        self.got.append((self.stream.id, "reset"))


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def writelines(self, data: list[bytes]) -> None:
        self.written += [bytes(d) for d in data]

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> None:
        return None

    def close(self) -> None:
        pass


def test_frames_cut_by_reads_read_the_same_and_whole_ones_stay_in_their_read() -> None:
    """However the client's bytes are cut into reads (one byte at a time, inside a frame
    header, inside a payload), every stream gets the same bytes and its end; a frame the last
    read cut is completed with only the bytes it lacks, so the frames after it are handed over
    as views into the read that brought them, not into a copy of it."""
    body = bytes(range(256)) * 160  # 40,960 bytes: DATA frames of 16 KiB, 16 KiB, 8 KiB
    chunks = [body[i : i + 16384] for i in range(0, len(body), 16384)]
    wire = PREFACE + frame(SETTINGS, 0, 0)
    fields = [(":method", "POST"), (":scheme", "http"), (":path", "/p"), (":authority", "a")]
    for stream_id in (1, 3):
        wire += frame(HEADERS, END_HEADERS, stream_id, hpack.Encoder().encode(fields))
        wire += b"".join(frame(DATA, 0, stream_id, c) for c in chunks[:-1])
        wire += frame(DATA, END_STREAM, stream_id, chunks[-1])
    loop = asyncio.new_event_loop()
    try:
        for size in (1, 5, 9, 10, 4096, 16393, 20000, len(wire)):
            got: list[tuple[int, Any]] = []
            conn = http2.Connection(lambda stream, _, got=got: _Collect(stream, got), loop)
            conn.connection_made(_Transport())  # type: ignore[arg-type]
            for i in range(0, len(wire), size):
                conn.data_received(wire[i : i + size])
            for stream_id in (1, 3):
                mine = [p for s, p in got if s == stream_id]
                assert mine[-1] is None  # ended
                assert b"".join(bytes(p) for p in mine[:-1]) == body, size
            conn.connection_lost(None)
        # A read that ends inside stream 1's first DATA frame, then the rest in one read.
        got = []
        conn = http2.Connection(lambda stream, _: _Collect(stream, got), loop)
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        cut = wire.index(chunks[0]) + 100
        first, second = wire[:cut], wire[cut:]
        conn.data_received(first)
        conn.data_received(second)
        payloads = [p for _, p in got if isinstance(p, memoryview)]
        assert len(payloads) == 6 and payloads[0].obj is not second  # the cut frame: joined
        assert all(p.obj is second for p in payloads[1:])  # the rest: where they arrived
        conn.connection_lost(None)
    finally:
        loop.close()
