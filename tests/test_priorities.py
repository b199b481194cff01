"""Request priorities end to end (Triton's ``priority_levels``): the ``priority`` parameter on
every front end, and the point of it, a load test: under overload the low priority is shed and
the high priority keeps its latency."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.testing import open_loop
from tests import models
from tests.helpers import GatewayProcess, free_port, start_gateway

# One instance, one row per batch, no batching delay: each request costs one model run, so the
# request rate the model sustains is known from one request's latency. Level 2 (the default)
# queues at most 24 requests; level 1 has the gateway's default bound.
HEAVY = """
name: "heavy"
max_batch_size: 1
instance_group [ { count: 1 kind: KIND_CPU } ]
dynamic_batching {
  priority_levels: 2
  default_priority_level: 2
  priority_queue_policy { key: 2 value: { max_queue_size: 24 } }
}
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    repo = tmp_path_factory.mktemp("priorities")
    models.heavy(repo, "heavy", HEAVY, layers=128)
    grpc_port = free_port()
    gw = start_gateway(repo, repo, "--grpc-port", str(grpc_port))
    gw.grpc_port = grpc_port  # type: ignore[attr-defined]
    try:
        yield gw
    finally:
        gw.stop()


def body(priority: object | None) -> bytes:
    request: dict[str, object] = {
        "inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}]
    }
    if priority is not None:
        request["parameters"] = {"priority": priority}
    return json.dumps(request).encode()


def post(url: str, data: bytes) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


ANY_PRIORITY_ERROR = (
    "parameter 'priority' must be a non-negative integer (0: the model's default level)"
)


@pytest.mark.parametrize("priority", ["high", -1, 1.5, True, [1]])
def test_an_invalid_priority_is_a_400_on_rest_and_grpc(
    server: GatewayProcess, priority: object
) -> None:
    status, answer = post(f"{server.url}/v2/models/heavy/infer", body(priority))
    assert status == 400
    assert answer == {"error": ANY_PRIORITY_ERROR}
    if isinstance(priority, (str, bool, float)):  # what an InferParameter can carry
        assert grpc_infer(server, priority) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ANY_PRIORITY_ERROR,
        )


def grpc_infer(server: GatewayProcess, priority: object) -> tuple[grpc.StatusCode, str]:
    """A ModelInfer with a ``priority`` parameter of any type (tritonclient only sends ints)."""
    request = service_pb2.ModelInferRequest(model_name="heavy")
    tensor = request.inputs.add(name="X", datatype="FP32", shape=[1, 8])
    tensor.contents.fp32_contents.extend([0.5] * 8)
    param = request.parameters["priority"]
    if isinstance(priority, bool):
        param.bool_param = priority
    elif isinstance(priority, float):
        param.double_param = priority
    elif isinstance(priority, int):
        param.int64_param = priority
    else:
        param.string_param = str(priority)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:  # type: ignore[attr-defined]
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, timeout=30)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_valid_priorities_are_served_on_every_front_end(server: GatewayProcess) -> None:
    """0 (the default level), the levels, and one past them (the default level, as Triton)."""
    for priority in (None, 0, 1, 2, 3):
        status, answer = post(f"{server.url}/v2/models/heavy/infer", body(priority))
        assert status == 200, answer
    assert grpc_infer(server, -3) == (grpc.StatusCode.INVALID_ARGUMENT, ANY_PRIORITY_ERROR)
    assert grpc_infer(server, 1) == (grpc.StatusCode.OK, "")
    http = httpclient.InferenceServerClient(server.address)
    rpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")  # type: ignore[attr-defined]
    x = np.full((1, 8), 0.5, dtype=np.float32)
    for module, client in ((httpclient, http), (grpcclient, rpc)):
        infer_input = module.InferInput("X", [1, 8], "FP32")
        infer_input.set_data_from_numpy(x)
        for priority in (1, 2, 7):
            result = client.infer("heavy", [infer_input], priority=priority)
            assert result.as_numpy("Y").shape == (1, 1)
        client.close()


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


def capacity_per_s(url: str, seconds: float = 1.5, clients: int = 6) -> float:
    """Requests a second the model serves now, saturated (closed loop, low priority, fewer
    than its queue holds). Not ``1 / one request's latency``: that latency includes HTTP work
    done alongside the model, so the model serves more than that (seen: 1 / 72 ms = 14/s
    against 21/s served), and a rate of 1.8 / L did not always overload it."""
    stop_s = time.perf_counter() + seconds
    done = []

    def client() -> None:
        while time.perf_counter() < stop_s:
            status, _ = post(url, body(2))
            if status == 200:
                done.append(time.perf_counter())

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return len(done) / (max(done, default=stop_s) - started)


@pytest.mark.slow
def test_under_overload_the_low_priority_is_shed_and_the_high_keeps_its_latency(
    server: GatewayProcess, tmp_path: Path
) -> None:
    """Open-loop load at rates set from what the model serves now, C requests a second (so that
    it holds on a slow or busy machine): high priority at 0.25 C, low priority at 0.6 C, then
    tripled to 1.8 C, beyond what the model sustains, long enough to overflow the low level's
    queue (24) twice; each phase has 12 high-priority requests at least. The high priority's
    requests all succeed and its p99 stays within 6 L (one request's latency) of the first
    phase's, while the low priority's queue fills and sheds (503); with one level for both,
    the high priority would queue behind 24 low requests (~24 L)."""
    url = f"{server.url}/v2/models/heavy/infer"
    latencies = []
    for _ in range(12):
        started = time.perf_counter()
        assert post(url, body(2))[0] == 200
        latencies.append(time.perf_counter() - started)
    one_s = statistics.median(latencies[2:])
    served_per_s = capacity_per_s(url)
    # Each phase long enough for 12 high-priority requests (a p99 of 4, on a slow machine, was
    # its maximum, noise); tripled, 1.05 C more than served arrive a second: 48 past the
    # queue's 24 at least.
    phase_s = max(3.0, 12 / (0.25 * served_per_s))
    overflow_s = max(phase_s, 2 * 24 / (1.05 * served_per_s))
    path = "/v2/models/heavy/infer"
    phases = {}
    for name, low_factor, seconds in (("before", 0.6, phase_s), ("tripled", 1.8, overflow_s)):
        high = open_loop.Stream("high", path, body(1), 0.25 * served_per_s)
        low = open_loop.Stream("low", path, body(0), low_factor * served_per_s)
        asyncio.run(open_loop.run("127.0.0.1", server.port, [high, low], duration_s=seconds))
        phases[name] = (high, low)
    summary = {
        name: {
            "high_sent": len(high.statuses),
            "high_ok": high.count(200),
            "high_p99_ms": p99(high.ok_latencies_s()) * 1e3,
            "low_sent": len(low.statuses),
            "low_ok": low.count(200),
            "low_shed": low.count(503),
            "low_p99_ms": p99(low.ok_latencies_s()) * 1e3 if low.count(200) else None,
        }
        for name, (high, low) in phases.items()
    }
    print(f"one request {one_s * 1e3:.1f} ms, {served_per_s:.1f}/s served; {summary}")
    for name, (high, _) in phases.items():
        assert high.count(200) == len(high.statuses), (name, summary)
    before, tripled = summary["before"], summary["tripled"]
    assert tripled["low_shed"] > 0, summary
    # Loose enough for a busy machine (L drifts between phases), far below the ~24 L that
    # one shared level costs the high priority.
    assert tripled["high_p99_ms"] <= before["high_p99_ms"] + 6 * one_s * 1e3, summary
