"""Attack suite: a gRPC ``ModelStreamInfer`` client that sends big requests and never reads.

The rule under test (README, Security): one stream holds at most ``grpc_stream_max_inflight``
requests read but not yet answered and written; past that the gateway stops reading the stream,
so HTTP/2 flow control pushes back on the client instead of the gateway's memory growing; a
cancelled stream frees what it held. The servicer's bound is also tested directly, with a fake
per-request answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from gateway.grpc.server import InferenceServicer
from tests import models
from tests.helpers import GatewayProcess, free_port, rss_bytes, start_gateway

MAX_INFLIGHT = 4
REQUEST_BYTES = 1024 * 1024
ATTEMPTED_REQUESTS = 200  # ~200 MiB offered on one stream
WRITE_STALL_S = 1.0  # a write blocked this long: flow control holds the client
RSS_GROWTH_LIMIT_BYTES = 120 * 1024 * 1024  # unbounded buffering grows ~2x ATTEMPTED MiB

IDENTITY_CONFIG = """
name: "identity"
max_batch_size: 0
input { name: "X" data_type: TYPE_FP32 dims: [ -1 ] }
output { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] }
"""


def _identity_onnx() -> bytes:
    """FP32 [n] -> the same: every answer is as big as its request."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        "identity",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None])],
    )
    return models.graph_bytes(graph)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str]]:
    repo = tmp_path_factory.mktemp("repo")
    (repo / "identity" / "1").mkdir(parents=True)
    (repo / "identity" / "1" / "model.onnx").write_bytes(_identity_onnx())
    (repo / "identity" / "config.pbtxt").write_text(IDENTITY_CONFIG)
    grpc_port = free_port()
    gw = start_gateway(
        repo,
        tmp_path_factory.mktemp("logs"),
        "--grpc-port",
        str(grpc_port),
        "--grpc-max-message-bytes",
        str(4 * REQUEST_BYTES),
        "--execution-provider",
        "cpu",
        env={"GATEWAY_GRPC_STREAM_MAX_INFLIGHT": str(MAX_INFLIGHT)},
    )
    try:
        yield gw, f"127.0.0.1:{grpc_port}"
    finally:
        gw.stop()


def _request(values: int, request_id: str) -> Any:
    request = pb.ModelInferRequest(model_name="identity", id=request_id)
    request.inputs.add(name="X", datatype="FP32", shape=[values])
    request.raw_input_contents.append(np.full(values, 1.5, np.float32).tobytes())
    return request


async def _infer_ok(stub: Any) -> None:
    """A normal inference, unary and on a fresh stream, both answered in time."""
    reply = await stub.ModelInfer(_request(4, "unary"), timeout=10)
    assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [1.5] * 4
    call = stub.ModelStreamInfer(timeout=10)
    await call.write(_request(4, "stream"))
    answer = await call.read()
    assert not answer.error_message and answer.infer_response.id == "stream"
    await call.done_writing()
    call.cancel()


async def _flood(stub: Any) -> tuple[Any, int]:
    """Write 1 MiB requests on one stream, reading nothing, until a write stalls."""
    call = stub.ModelStreamInfer()
    big = _request(REQUEST_BYTES // 4, "big")
    for written in range(ATTEMPTED_REQUESTS):
        try:
            await asyncio.wait_for(asyncio.shield(call.write(big)), WRITE_STALL_S)
        except TimeoutError:
            return call, written
    return call, ATTEMPTED_REQUESTS


async def test_stream_that_is_never_read_is_bounded(gateway: tuple[GatewayProcess, str]) -> None:
    gw, address = gateway
    pid = gw.process.pid
    async with grpc.aio.insecure_channel(
        address,
        options=[("grpc.max_send_message_length", 4 * REQUEST_BYTES)],
    ) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        await _infer_ok(stub)
        # Warm the allocator and the model on big messages, then take the baseline.
        call = stub.ModelStreamInfer(timeout=10)
        for i in range(MAX_INFLIGHT):
            await call.write(_request(REQUEST_BYTES // 4, str(i)))
            assert not (await call.read()).error_message
        call.cancel()
        await asyncio.sleep(0.5)
        before = rss_bytes(pid)

        for round_ in range(3):  # a leak on cancel would add up across rounds
            call, written = await _flood(stub)
            await asyncio.sleep(0.5)  # let the gateway take what it will take
            grown = rss_bytes(pid) - before
            print(f"round {round_}: {written} writes went through, RSS +{grown / 2**20:.0f} MiB")
            assert grown < RSS_GROWTH_LIMIT_BYTES, f"RSS grew {grown / 2**20:.0f} MiB"
            # Our request is read only while a slot is free; the rest sit in HTTP/2 windows.
            assert written < ATTEMPTED_REQUESTS // 2
            call.cancel()
            await asyncio.sleep(0.2)
            await _infer_ok(stub)
        grown = rss_bytes(pid) - before
        assert grown < RSS_GROWTH_LIMIT_BYTES, f"RSS grew {grown / 2**20:.0f} MiB after cancels"
    assert gw.process.poll() is None


# -- the servicer's bound, without a server ------------------------------------------------


class FakeServicer(InferenceServicer):
    """Answers each request with itself once ``release`` is set; counts what was started."""

    def __init__(self, max_inflight: int) -> None:
        super().__init__(dataplane=None, stream_max_inflight=max_inflight)  # type: ignore[arg-type]
        self.release = asyncio.Event()
        self.started = 0
        self.cancelled = 0

    async def _stream_one(self, request: Any, context: Any = None) -> Any:
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return request


class CountingRequests:
    """A request stream of ``total`` items that counts how many were pulled."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.pulled = 0

    def __aiter__(self) -> AsyncIterator[int]:
        return self

    async def __anext__(self) -> int:
        if self.pulled == self.total:
            raise StopAsyncIteration
        self.pulled += 1
        return self.pulled


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_reader_stops_at_the_bound_until_answers_are_taken() -> None:
    servicer = FakeServicer(max_inflight=3)
    requests = CountingRequests(total=10)
    stream = servicer.ModelStreamInfer(requests, context=None)
    first = asyncio.ensure_future(anext(stream))
    await _settle()
    assert requests.pulled == 3  # read up to the bound, and no further, with nothing answered
    servicer.release.set()
    got = [await first]
    await _settle()
    assert requests.pulled == 3  # answered but not all written: still no slot
    got.append(await anext(stream))  # the first answer is written: one slot frees
    await _settle()
    assert requests.pulled == 4
    got += [item async for item in stream]
    assert sorted(got) == list(range(1, 11)) and requests.pulled == 10


async def test_closing_the_stream_cancels_what_it_holds() -> None:
    servicer = FakeServicer(max_inflight=5)
    requests = CountingRequests(total=100)
    stream = servicer.ModelStreamInfer(requests, context=None)
    first = asyncio.ensure_future(anext(stream))
    await _settle()
    assert requests.pulled == 5 and servicer.started == 5
    first.cancel()  # what grpc.aio does when the client cancels
    with pytest.raises(asyncio.CancelledError):
        await first
    await _settle()
    assert servicer.cancelled == 5 and requests.pulled == 5
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not [t for t in leftover if "ModelStreamInfer" in repr(t.get_coro())]
