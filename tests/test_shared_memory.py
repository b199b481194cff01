"""Triton's system shared-memory extension, driven by the real ``tritonclient`` (HTTP and gRPC)
and its ``tritonclient.utils.shared_memory`` helpers against real gateway processes.

Regions are POSIX shared-memory objects under /dev/shm created by this test process, as a
co-located client would; every test destroys what it created.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from gateway.errors import InvalidInput, RegionExists, SharedMemoryError, UnknownRegion
from gateway.pending import validate
from gateway.protocol.codec import decode_infer_request, encode_infer_response
from gateway.protocol.types import (
    InferRequest,
    InferResponse,
    RequestedOutput,
    SharedInput,
    SharedMemoryRef,
)
from gateway.repository.config import parse_json
from gateway.shared_memory import SharedMemoryRegistry, write_outputs
from tests import models
from tests.helpers import GatewayProcess, free_port, start_gateway

SLOW = """
name: "slow"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 1500000 preferred_batch_size: [ 8 ] }
"""
A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.full((1, 16), 3, dtype=np.int32)
NBYTES = A.nbytes  # 64


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, int]]:
    tmp = tmp_path_factory.mktemp("shm")
    models.add_sub(tmp / "repo", "simple")
    models.dense(tmp / "repo", "slow", features=16, classes=4, config=SLOW)
    grpc_port = free_port()
    gw = start_gateway(tmp / "repo", tmp, "--grpc-port", str(grpc_port))
    try:
        yield gw, grpc_port
    finally:
        gw.stop()


class Regions:
    """Shared-memory objects this test created (unique keys), destroyed at the end."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.tag = uuid.uuid4().hex[:8]

    def create(self, name: str, byte_size: int) -> tuple[Any, str]:
        key = f"/gwtest_{self.tag}_{name}"
        handle = shm.create_shared_memory_region(name, key, byte_size, create_only=True)
        self.handles.append(handle)
        return handle, key

    def close(self) -> None:
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)


@pytest.fixture
def regions() -> Iterator[Regions]:
    made = Regions()
    try:
        yield made
    finally:
        made.close()


def _http(gw: GatewayProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(gw.address)


def _post(gw: GatewayProcess, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(gw.url + path, data=data, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _simple_in_shm(regions: Regions) -> tuple[Any, str, Any, str]:
    """Inputs A, B in one region (B at offset 64), room for both outputs in another."""
    ins, in_key = regions.create("in", 2 * NBYTES)
    shm.set_shared_memory_region(ins, [A])
    shm.set_shared_memory_region(ins, [B], offset=NBYTES)
    outs, out_key = regions.create("out", 2 * NBYTES)
    return ins, in_key, outs, out_key


def _infer_http(client: Any, outputs_in_shm: bool = True) -> Any:
    inputs = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_shared_memory("in", NBYTES)
    inputs[1].set_shared_memory("in", NBYTES, offset=NBYTES)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("OUTPUT0", "OUTPUT1")]
    if outputs_in_shm:
        outputs[0].set_shared_memory("out", NBYTES)
        outputs[1].set_shared_memory("out", NBYTES, offset=NBYTES)
    return client.infer("simple", inputs, outputs=outputs)


def test_http_register_infer_status_unregister(served: Any, regions: Regions) -> None:
    gw, _ = served
    client = _http(gw)
    _, in_key, outs, out_key = _simple_in_shm(regions)
    client.unregister_system_shared_memory()
    client.register_system_shared_memory("in", in_key, 2 * NBYTES)
    client.register_system_shared_memory("out", out_key, 2 * NBYTES)
    status = client.get_system_shared_memory_status()
    assert {r["name"]: (r["key"], r["offset"], r["byte_size"]) for r in status} == {
        "in": (in_key, 0, 2 * NBYTES),
        "out": (out_key, 0, 2 * NBYTES),
    }
    assert client.get_system_shared_memory_status("out") == [
        {"name": "out", "key": out_key, "offset": 0, "byte_size": 2 * NBYTES}
    ]

    result = _infer_http(client)
    for index, (name, expected) in enumerate((("OUTPUT0", A + B), ("OUTPUT1", A - B))):
        output = result.get_output(name)
        assert output == {"name": name, "datatype": "INT32", "shape": [1, 16]}  # no data: in shm
        got = shm.get_contents_as_numpy(outs, np.int32, [1, 16], offset=index * NBYTES)
        np.testing.assert_array_equal(got, expected)

    # Inputs from shared memory, outputs in the body.
    result = _infer_http(client, outputs_in_shm=False)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)

    client.unregister_system_shared_memory("in")
    assert [r["name"] for r in client.get_system_shared_memory_status()] == ["out"]
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []
    client.unregister_system_shared_memory("never-registered")  # no error, as Triton


def test_grpc_register_infer_status_unregister(served: Any, regions: Regions) -> None:
    _, grpc_port = served
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    ins, in_key, outs, out_key = _simple_in_shm(regions)
    client.unregister_system_shared_memory()
    client.register_system_shared_memory("in", in_key, 2 * NBYTES)
    client.register_system_shared_memory("out", out_key, 2 * NBYTES)
    status = client.get_system_shared_memory_status()
    assert {name: (r.key, r.offset, r.byte_size) for name, r in status.regions.items()} == {
        "in": (in_key, 0, 2 * NBYTES),
        "out": (out_key, 0, 2 * NBYTES),
    }

    inputs = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_shared_memory("in", NBYTES)
    inputs[1].set_data_from_numpy(B)  # mixed: one input in shared memory, one raw
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("OUTPUT0", "OUTPUT1")]
    outputs[1].set_shared_memory("out", NBYTES, offset=NBYTES)
    result = client.infer("simple", inputs, outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
    shared = result.get_output("OUTPUT1")
    assert (shared.datatype, list(shared.shape)) == ("INT32", [1, 16])
    got = shm.get_contents_as_numpy(outs, np.int32, [1, 16], offset=NBYTES)
    np.testing.assert_array_equal(got, A - B)

    # All inputs in shared memory (no raw input data): still one raw_output_contents entry per
    # output, empty for those in shared memory, as Triton (its C++ client indexes them).
    inputs[1].set_shared_memory("in", NBYTES, offset=NBYTES)
    answer = client.infer("simple", inputs, outputs=outputs).get_response()
    assert [len(raw) for raw in answer.raw_output_contents] == [NBYTES, 0]
    # ... and outputs in the body come raw too (tritonclient reads only raw_output_contents).
    plain = [grpcclient.InferRequestedOutput(n) for n in ("OUTPUT0", "OUTPUT1")]
    result = client.infer("simple", inputs, outputs=plain)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)

    with pytest.raises(InferenceServerException) as err:
        client.register_system_shared_memory("in", in_key, NBYTES)
    assert err.value.status() == "StatusCode.ALREADY_EXISTS"
    assert "'in' already in manager" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_system_shared_memory_status("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND" and "'nope'" in err.value.message()
    client.unregister_system_shared_memory()
    assert not client.get_system_shared_memory_status().regions
    del ins


def _shm_body(region: str, offset: int, byte_size: int) -> dict[str, Any]:
    params = {"shared_memory_region": region, "shared_memory_byte_size": byte_size}
    if offset:
        params["shared_memory_offset"] = offset
    return {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "parameters": params},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": B.tolist()},
        ]
    }


@pytest.mark.parametrize(
    ("offset", "byte_size", "words"),
    [
        (0, 2 * NBYTES, "does not match shape"),  # inside the region, wrong size for the shape
        (NBYTES, 2 * NBYTES, "Invalid offset + byte size for shared memory region: 'in'"),
        (2 * NBYTES, NBYTES, "Invalid offset for shared memory region: 'in'"),
        (2**62, NBYTES, "Invalid offset for shared memory region: 'in'"),
    ],
)
def test_bad_offsets_and_sizes_are_400_naming_the_region(
    served: Any, regions: Regions, offset: int, byte_size: int, words: str
) -> None:
    gw, grpc_port = served
    _, in_key, _, _ = _simple_in_shm(regions)
    client = _http(gw)
    client.register_system_shared_memory("in", in_key, 2 * NBYTES)
    try:
        status, body = _post(gw, "/v2/models/simple/infer", _shm_body("in", offset, byte_size))
        assert status == 400 and words in body["error"], body
        assert "'in'" in body["error"]
        g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        tensor = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
        tensor.set_shared_memory("in", byte_size, offset=offset)
        other = grpcclient.InferInput("INPUT1", [1, 16], "INT32").set_data_from_numpy(B)
        with pytest.raises(InferenceServerException) as err:
            g.infer("simple", [tensor, other])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and words in err.value.message()
        # The gateway goes on serving, the region still usable.
        assert _post(gw, "/v2/models/simple/infer", _shm_body("in", 0, NBYTES))[0] == 200
    finally:
        client.unregister_system_shared_memory()


def test_unknown_region_and_bad_parameters(served: Any) -> None:
    gw, grpc_port = served
    status, body = _post(gw, "/v2/models/simple/infer", _shm_body("ghost", 0, NBYTES))
    assert status == 400 and body["error"] == "Unable to find shared memory region: 'ghost'"
    only_region = _shm_body("ghost", 0, NBYTES)
    del only_region["inputs"][0]["parameters"]["shared_memory_byte_size"]
    status, body = _post(gw, "/v2/models/simple/infer", only_region)
    assert status == 400 and "must be given together" in body["error"]
    with_data = _shm_body("ghost", 0, NBYTES)
    with_data["inputs"][0]["data"] = A.tolist()
    status, body = _post(gw, "/v2/models/simple/infer", with_data)
    assert status == 400 and "shared memory parameters and data" in body["error"]
    unknown_output = {
        **_shm_body("ghost", 0, NBYTES),
        "outputs": [
            {
                "name": "OUTPUT0",
                "parameters": {"shared_memory_region": "nowhere", "shared_memory_byte_size": 64},
            }
        ],
    }
    unknown_output["inputs"][0] = {
        "name": "INPUT0",
        "datatype": "INT32",
        "shape": [1, 16],
        "data": A.tolist(),
    }
    status, body = _post(gw, "/v2/models/simple/infer", unknown_output)
    assert status == 400 and "'nowhere'" in body["error"]
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "INT32").set_shared_memory("ghost", 64)
    other = grpcclient.InferInput("INPUT1", [1, 16], "INT32").set_data_from_numpy(B)
    with pytest.raises(InferenceServerException) as err:
        g.infer("simple", [tensor, other])
    assert err.value.status() == "StatusCode.NOT_FOUND" and "'ghost'" in err.value.message()


def test_register_refuses_bad_keys_and_bounds(served: Any, regions: Regions) -> None:
    gw, _ = served
    _, key = regions.create("small", 128)
    cases = [
        ({"key": key, "offset": 64, "byte_size": 128}, "past the end"),
        ({"key": key, "offset": 0, "byte_size": 0}, "must be positive"),
        ({"key": key, "offset": -1, "byte_size": 8}, "'offset' must be a non-negative"),
        ({"key": "/gwtest-does-not-exist", "byte_size": 8}, "Unable to open shared memory"),
        ({"key": "/../etc/passwd", "byte_size": 8}, "invalid key"),
        ({"key": "../../etc/passwd", "byte_size": 8}, "invalid key"),
        ({"key": 7, "byte_size": 8}, "'key' must be a string"),
        ({"byte_size": 8}, "missing 'key'"),
    ]
    for body, words in cases:
        status, answer = _post(gw, "/v2/systemsharedmemory/region/r1/register", body)
        assert status == 400 and words in answer["error"], (body, answer)
        assert "'r1'" in answer["error"] or "Unable to open" in answer["error"]
    status, answer = _post(gw, "/v2/systemsharedmemory/region/r1/register", b"{not json")
    assert status == 400
    assert (
        _post(gw, "/v2/systemsharedmemory/region/r1/register", {"key": key, "byte_size": 8})[0]
        == 200
    )
    status, answer = _post(
        gw, "/v2/systemsharedmemory/region/r1/register", {"key": key, "byte_size": 8}
    )
    assert status == 400 and answer["error"] == "shared memory region 'r1' already in manager"
    status, answer = _post(gw, "/v2/systemsharedmemory/region/r1/unregister", b"")
    assert status == 200
    with urllib.request.urlopen(gw.url + "/v2/systemsharedmemory/status", timeout=5) as r:
        assert json.load(r) == []
    try:
        urllib.request.urlopen(gw.url + "/v2/systemsharedmemory/region/r1/status", timeout=5)
    except urllib.error.HTTPError as exc:
        assert exc.code == 400
        assert json.load(exc)["error"] == "Unable to find system shared memory region: 'r1'"
    else:
        raise AssertionError("status of an unknown region answered 200")


def test_output_region_too_small_is_400(served: Any, regions: Regions) -> None:
    gw, _ = served
    client = _http(gw)
    _, in_key, _, out_key = _simple_in_shm(regions)
    client.register_system_shared_memory("in", in_key, 2 * NBYTES)
    client.register_system_shared_memory("out", out_key, 2 * NBYTES)
    try:
        inputs = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        inputs[0].set_shared_memory("in", NBYTES)
        inputs[1].set_shared_memory("in", NBYTES, offset=NBYTES)
        output = httpclient.InferRequestedOutput("OUTPUT0")
        output.set_shared_memory("out", 16)
        with pytest.raises(InferenceServerException) as err:
            client.infer("simple", inputs, outputs=[output])
        assert err.value.status() == "400"
        assert "output 'OUTPUT0' (16 bytes) should be at least 64 bytes" in err.value.message()
    finally:
        client.unregister_system_shared_memory()


def _mapped(pid: int, key: str) -> bool:
    return f"/dev/shm{key}" in Path(f"/proc/{pid}/maps").read_text()


def test_unregister_while_requests_use_the_region(served: Any, regions: Regions) -> None:
    """Requests queued with a region's views finish correctly after it is unregistered; the
    mapping goes once they are done; a request after that is refused naming the region."""
    gw, _ = served
    client = _http(gw)
    x = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    handle, key = regions.create("x", x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    client.register_system_shared_memory("x", key, x.nbytes)
    plain = httpclient.InferInput("X", [1, 16], "FP32").set_data_from_numpy(x)
    expected = client.infer("slow", [plain]).as_numpy("Y")  # waits its batch's delay too

    results: list[Any] = []

    def infer() -> None:
        tensor = httpclient.InferInput("X", [1, 16], "FP32").set_shared_memory("x", x.nbytes)
        try:
            results.append(_http(gw).infer("slow", [tensor]).as_numpy("Y"))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=infer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # all four are waiting for their batch (1.5 s queue delay)
    client.unregister_system_shared_memory("x")
    assert client.get_system_shared_memory_status() == []
    assert _mapped(gw.process.pid, key)  # still mapped: requests hold it
    for t in threads:
        t.join(10)
    assert len(results) == 4
    for got in results:
        assert isinstance(got, np.ndarray), got
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    deadline = time.monotonic() + 5
    while _mapped(gw.process.pid, key) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _mapped(gw.process.pid, key)  # the last request's end unmapped it
    tensor = httpclient.InferInput("X", [1, 16], "FP32").set_shared_memory("x", x.nbytes)
    with pytest.raises(InferenceServerException) as err:
        client.infer("slow", [tensor])
    assert "Unable to find shared memory region: 'x'" in err.value.message()


def test_cuda_shared_memory_is_refused_clearly(served: Any) -> None:
    gw, grpc_port = served
    client = _http(gw)
    assert "system_shared_memory" in client.get_server_metadata()["extensions"]
    assert "cuda_shared_memory" not in client.get_server_metadata()["extensions"]
    assert client.get_cuda_shared_memory_status() == []
    client.unregister_cuda_shared_memory()  # Triton's examples start with this: a no-op
    status, body = _post(
        gw,
        "/v2/cudasharedmemory/region/gpu0/register",
        {"raw_handle": {"b64": "AAAA"}, "device_id": 0, "byte_size": 64},
    )
    assert status == 400 and "'gpu0'" in body["error"] and "not supported" in body["error"]
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    assert not g.get_cuda_shared_memory_status().regions
    g.unregister_cuda_shared_memory()
    with pytest.raises(InferenceServerException) as err:
        g.register_cuda_shared_memory("gpu0", b"\0" * 64, 0, 64)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "not supported" in err.value.message()


def test_shared_memory_endpoints_need_a_key(tmp_path: Path, regions: Regions) -> None:
    models.add_sub(tmp_path / "repo", "simple")
    grpc_port = free_port()
    gw = start_gateway(
        tmp_path / "repo",
        tmp_path,
        "--grpc-port",
        str(grpc_port),
        env={"GATEWAY_API_KEYS": "user-key", "GATEWAY_ADMIN_KEYS": "admin-key"},
    )
    try:
        handle, key = regions.create("auth", 64)
        body = {"key": key, "byte_size": 64}
        register = "/v2/systemsharedmemory/region/auth/register"
        assert _post(gw, register, body)[0] == 401
        assert _post(gw, register, body, {"Authorization": "Bearer wrong"})[0] == 401
        assert _post(gw, register, body, {"X-API-Key": "user-key"})[0] == 200
        request = urllib.request.Request(gw.url + "/v2/systemsharedmemory/status")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 401
        request.add_header("Authorization", "Bearer admin-key")
        with urllib.request.urlopen(request, timeout=5) as r:
            assert [s["name"] for s in json.load(r)] == ["auth"]
        # Inference naming the region: the ASGI path (guards apply), with a key.
        shm.set_shared_memory_region(handle, [A])
        body = _shm_body("auth", 0, NBYTES)
        assert _post(gw, "/v2/models/simple/infer", body)[0] == 401
        status, answer = _post(gw, "/v2/models/simple/infer", body, {"X-API-Key": "user-key"})
        assert status == 200 and answer["outputs"][0]["data"] == (A + B).ravel().tolist()
        assert _post(gw, "/v2/systemsharedmemory/unregister", b"")[0] == 401
        g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        with pytest.raises(InferenceServerException) as err:
            g.get_system_shared_memory_status()
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as err:
            g.register_system_shared_memory("auth2", key, 64)
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        status = g.get_system_shared_memory_status(headers={"x-api-key": "user-key"})
        assert list(status.regions) == ["auth"]
        g.unregister_system_shared_memory(headers={"authorization": "Bearer user-key"})
        assert not g.get_system_shared_memory_status(headers={"x-api-key": "user-key"}).regions
    finally:
        gw.stop()


# -- in process: the decode step and the registry ----------------------------------------------


CONFIG = {
    "name": "big",
    "max_batch_size": 4,
    "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [1 << 20]}],
    "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [1]}],
}


def test_a_4mb_input_is_a_view_of_the_mapping_up_to_the_backend(regions: Regions) -> None:
    """No copy before ONNX Runtime: the array the batcher hands the backend (one request's batch
    passes its inputs as they are) shares memory with the client's region."""
    x = np.random.default_rng(2).standard_normal((1, 1 << 20)).astype(np.float32)  # 4 MiB
    handle, key = regions.create("big", x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    registry = SharedMemoryRegistry()
    registry.register("big", key, 0, x.nbytes)
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "X",
                    "datatype": "FP32",
                    "shape": [1, 1 << 20],
                    "parameters": {
                        "shared_memory_region": "big",
                        "shared_memory_byte_size": x.nbytes,
                    },
                }
            ]
        }
    ).encode()
    request = decode_infer_request(body)
    assert request.inputs == {}  # nothing read from the body
    registry.resolve(request)
    prepared, rows = validate(parse_json(json.dumps(CONFIG), "test", "big"), request)
    mapping = registry.region("big").mapping
    region = np.frombuffer(mapping, dtype=np.uint8)
    assert rows == 1 and np.shares_memory(prepared["X"], region)
    np.testing.assert_array_equal(prepared["X"], x)  # and it reads the client's data
    x[0, :4] = 42  # the client writes again: the view sees it (no copy was taken)
    shm.set_shared_memory_region(handle, [x])
    assert prepared["X"][0, 0] == 42
    del region, prepared, request, mapping
    registry.close()


def test_registry_keeps_a_mapping_until_its_last_view_goes(regions: Regions) -> None:
    handle, key = regions.create("keep", 64)
    shm.set_shared_memory_region(handle, [np.arange(16, dtype=np.int32)])
    registry = SharedMemoryRegistry(max_regions=1)
    registry.register("keep", key, 0, 64)
    with pytest.raises(SharedMemoryError, match="1 regions are registered already"):
        registry.register("other", key, 0, 64)
    request = InferRequest(
        inputs={}, outputs=[RequestedOutput("Y", shared=SharedMemoryRef("keep", 32, 32))]
    )
    registry.resolve(request)
    mapping = registry.region("keep").mapping
    registry.unregister("keep")  # while a request holds a view
    with pytest.raises(UnknownRegion):
        registry.region("keep")
    assert not mapping.closed  # kept: a request still holds a view
    response = InferResponse("m", "1", {"Y": np.full(8, 7, dtype=np.int32)})
    write_outputs(request, response)  # still written where the client reads
    assert response.shared == {"Y"}
    got = shm.get_contents_as_numpy(handle, np.int32, [8], offset=32)
    np.testing.assert_array_equal(got, np.full(8, 7))
    body, _ = encode_infer_response(response, request.outputs)
    assert json.loads(body)["outputs"] == [{"name": "Y", "datatype": "INT32", "shape": [8]}]
    off = SharedMemoryRegistry(max_regions=0)
    with pytest.raises(SharedMemoryError, match="turned off"):
        off.register("keep", key, 0, 64)


def test_a_shrunk_object_is_refused_not_read(regions: Regions, tmp_path: Path) -> None:
    """Reading past the end of a truncated object would be SIGBUS: it is checked first."""
    target = tmp_path / "obj"
    target.write_bytes(b"\0" * 4096)
    registry = SharedMemoryRegistry(directory=tmp_path)
    registry.register("r", "/obj", 0, 4096)
    with target.open("r+b") as f:
        f.truncate(100)
    with pytest.raises(SharedMemoryError, match="shrank to 100 bytes"):
        registry.region("r").view(0, 64)
    registry.close()
    with pytest.raises(SharedMemoryError, match="invalid key"):
        registry.register("s", "/a/b", 0, 1)
    (tmp_path / "link").symlink_to(target)  # a link could point anywhere: not followed
    with pytest.raises(SharedMemoryError, match="Unable to open shared memory region: '/link'"):
        registry.register("s", "/link", 0, 1)
    (tmp_path / "dir").mkdir()
    with pytest.raises(SharedMemoryError, match=r"Unable to open|not a shared memory object"):
        registry.register("s", "dir", 0, 1)
    assert registry.status() == []


def test_bytes_tensors_in_shared_memory(regions: Regions) -> None:
    """BYTES inputs are read with the length-prefixed framing (bounded by the shape), BYTES
    outputs written with it."""
    words = np.array([b"shared", b"memory"], dtype=object)
    framed = b"".join(len(w).to_bytes(4, "little") + w for w in words)
    handle, key = regions.create("text", 64)
    shm.set_shared_memory_region(handle, [np.frombuffer(framed, dtype=np.uint8)])
    registry = SharedMemoryRegistry()
    registry.register("text", key, 0, 64)
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "T",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {
                        "shared_memory_region": "text",
                        "shared_memory_byte_size": len(framed),
                    },
                }
            ],
            "outputs": [
                {
                    "name": "T_OUT",
                    "parameters": {
                        "shared_memory_region": "text",
                        "shared_memory_byte_size": 64 - 32,
                        "shared_memory_offset": 32,
                    },
                }
            ],
        }
    ).encode()
    request = decode_infer_request(body)
    registry.resolve(request)
    assert request.inputs["T"].tolist() == [b"shared", b"memory"]
    response = InferResponse("m", "1", {"T_OUT": words[::-1].copy()})
    write_outputs(request, response)
    raw = bytes(np.frombuffer(handle._mpsm_handle.buf, dtype=np.uint8)[32 : 32 + len(framed)])
    assert raw == b"".join(len(w).to_bytes(4, "little") + w for w in words[::-1])
    short = decode_infer_request(body.replace(b'"shape": [2]', b'"shape": [3]'))
    with pytest.raises(SharedMemoryError, match=r"needs 3 \(shared memory region 'text'\)"):
        registry.resolve(short)
    del request, short, response
    registry.close()


# -- the registry on its own: plain files in a directory of the test's as the objects ---------


def _objects(tmp_path: Path, **sizes: int) -> SharedMemoryRegistry:
    """A registry over ``tmp_path``, with a file of each size as an object (bytes 0, 1, ...)."""
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(bytes(i % 256 for i in range(size)))
    return SharedMemoryRegistry(directory=tmp_path)


def _refused(call: Any, message: str, error: type[Exception] = SharedMemoryError) -> None:
    """``call()`` raises ``error`` with exactly ``message`` (what the client reads)."""
    with pytest.raises(error) as caught:
        call()
    assert str(caught.value) == message


def test_register_says_exactly_what_is_wrong(tmp_path: Path) -> None:
    registry = _objects(tmp_path, obj=100, **{"k" * 255: 8})
    fail = "failed to register shared memory region 'r': "
    cases: list[tuple[str, object, object, object, str]] = [
        ("", "/obj", 0, 8, "a shared memory region needs a name"),
        ("r", 5, 0, 8, fail + "'key' must be a string"),
        ("r", "k" * 256, 0, 8, fail + "key longer than 255 characters"),
        ("r", "/obj", -1, 8, fail + "'offset' must be a non-negative integer"),
        ("r", "/obj", "5", 8, fail + "'offset' must be a non-negative integer"),
        ("r", "/obj", 0, True, fail + "'byte_size' must be a non-negative integer"),
        ("r", "/obj", 0, -8, fail + "'byte_size' must be a non-negative integer"),
        ("r", "/obj", 0, 0, fail + "'byte_size' must be positive"),
        (
            "r",
            "/obj",
            50,
            64,
            fail + "offset 50 + byte_size 64 is past the end of '/obj' (100 bytes)",
        ),
        ("r", "/none", 0, 8, "Unable to open shared memory region: '/none' (region 'r')"),
    ]
    for key in ("/", "", "/.", "..", "/a/b", "a\x00b", "x/" * 40):
        cases.append(
            (
                "r", key, 0, 8,
                fail + f"invalid key {key[:64]!r} (a POSIX shared memory name: '/name')",
            )
        )  # fmt: skip
    for name, key, offset, size, message in cases:
        _refused(partial(registry.register, name, key, offset, size), message)
    (tmp_path / "dir").mkdir()
    _refused(
        lambda: registry.register("r", "dir", 0, 8),
        "Unable to open shared memory region: 'dir' (region 'r')",
    )
    os.mkfifo(tmp_path / "fifo")  # opens read-write without blocking, and is no file
    _refused(
        partial(registry.register, "r", "fifo", 0, 8),
        fail + "'fifo' is not a shared memory object",
    )
    assert registry.status() == []  # nothing refused was kept
    registry.register("long", "k" * 255, 0, 8)  # 255 characters: a name the system takes
    registry.register("bare", "obj", 10, 20)  # without the leading '/'
    _refused(
        lambda: registry.register("bare", "/obj", 0, 8),
        "shared memory region 'bare' already in manager",
        RegionExists,
    )
    assert registry.region("bare").view(0, 4).tobytes() == bytes([10, 11, 12, 13])
    off = SharedMemoryRegistry(max_regions=0, directory=tmp_path)
    _refused(
        lambda: off.register("r", "/obj", 0, 8),
        fail + "system shared memory is turned off on this gateway (shared_memory_max_regions = 0)",
    )
    registry.close()


def test_status_iteration_and_unregister(tmp_path: Path) -> None:
    registry = _objects(tmp_path, a=64, b=64)
    registry.register("ra", "/a", 8, 32)
    registry.register("rb", "b", 0, 64)
    assert registry.status() == [
        {"name": "ra", "key": "/a", "offset": 8, "byte_size": 32},
        {"name": "rb", "key": "b", "offset": 0, "byte_size": 64},
    ]
    assert registry.status("rb") == [{"name": "rb", "key": "b", "offset": 0, "byte_size": 64}]
    _refused(
        lambda: registry.status("nope"),
        "Unable to find system shared memory region: 'nope'",
        UnknownRegion,
    )
    assert [r.name for r in registry] == ["ra", "rb"]
    ra = registry.region("ra")
    registry.unregister("nope")  # an unknown name is no error (as Triton)
    registry.unregister("ra")  # only that one
    assert ra.mapping.closed  # no request held a view: unmapped at once
    assert [r.name for r in registry] == ["rb"]
    _refused(
        lambda: registry.region("ra"), "Unable to find shared memory region: 'ra'", UnknownRegion
    )
    _refused(lambda: ra.view(0, 4), "Unable to find shared memory region: 'ra'", UnknownRegion)
    registry.unregister()  # all
    assert registry.status() == []


def test_views_are_checked_against_the_region(tmp_path: Path) -> None:
    registry = _objects(tmp_path, obj=128)
    registry.register("r", "/obj", 64, 64)
    region = registry.region("r")
    assert region.view(60, 4).tobytes() == bytes([124, 125, 126, 127])  # the region's last bytes
    _refused(lambda: region.view(64, 0), "Invalid offset for shared memory region: 'r'")
    _refused(
        lambda: region.view(8, 64),
        "Invalid offset + byte size for shared memory region: 'r' (8 + 64 > 64 bytes)",
    )
    registry.close()


def test_inputs_read_from_and_outputs_written_to_regions(tmp_path: Path) -> None:
    registry = _objects(tmp_path, obj=256)
    registry.register("r", "/obj", 0, 256)
    text = b"".join(len(w).to_bytes(4, "little") + w for w in (b"ab", b"cde"))
    with (tmp_path / "obj").open("r+b") as f:
        f.seek(128)
        f.write(text + bytes([0, 1, 2]))
    request = InferRequest(
        inputs={},
        shared_inputs={
            "X": SharedInput("INT32", (2, 2), SharedMemoryRef("r", 16, 0)),
            "T": SharedInput("BYTES", (1, 2), SharedMemoryRef("r", len(text), 128)),
        },
        outputs=[
            RequestedOutput("Z", shared=SharedMemoryRef("r", 8, 64)),
            RequestedOutput("Y", shared=SharedMemoryRef("r", 32, 32)),
        ],
    )
    registry.resolve(request)
    expected = np.frombuffer(bytes(range(16)), np.int32).reshape(2, 2)
    np.testing.assert_array_equal(request.inputs["X"], expected)
    assert request.inputs["T"].shape == (1, 2)
    assert request.inputs["T"].tolist() == [[b"ab", b"cde"]]
    # Z asked for in shared memory but not answered; Y, two rows, written after it.
    y = np.arange(8, dtype=np.int32).reshape(2, 4)
    response = InferResponse("m", "1", {"Y": y})
    write_outputs(request, response)
    assert response.shared == {"Y"}
    assert (tmp_path / "obj").read_bytes()[32:64] == y.tobytes()
    small = InferResponse("m", "1", {"Y": np.zeros((3, 4), np.int32)})
    _refused(
        partial(write_outputs, request, small),
        "shared memory size specified with the request for output 'Y' (32 bytes) should be at "
        "least 48 bytes to hold the results",
    )
    for shared, message in (
        (
            SharedInput("INT32", (2, 3), SharedMemoryRef("r", 16, 0)),
            "input 'X': shared_memory_byte_size 16 of region 'r' does not match shape [2, 3] of "
            "INT32 (24 bytes)",
        ),
        (
            SharedInput("BYTES", (3,), SharedMemoryRef("r", len(text), 128)),
            "input 'X': got 2 BYTES elements, its shape needs 3 (shared memory region 'r')",
        ),
    ):
        bad = InferRequest(inputs={}, shared_inputs={"X": shared})
        _refused(partial(registry.resolve, bad), message)
    flags = InferRequest(
        inputs={},
        shared_inputs={"B": SharedInput("BOOL", (3,), SharedMemoryRef("r", 3, 128 + len(text)))},
    )
    with (tmp_path / "obj").open("r+b") as f:
        f.seek(128 + len(text))
        f.write(bytes([0, 1, 2]))
    _refused(
        lambda: registry.resolve(flags), "input 'B': BOOL data must be bytes 0 or 1", InvalidInput
    )
    del request
    registry.close()


def test_resolve_names_the_region_it_cannot_find_or_fit(tmp_path: Path) -> None:
    """Every reference of a request is checked, inputs first, then output targets: an unknown
    region (input or output) or an offset past the region is refused in Triton's words, and a
    region unregistered after an earlier request is unknown to the next."""
    registry = _objects(tmp_path, obj=128)
    registry.register("r", "/obj", 0, 64)
    good_in = {"X": SharedInput("INT32", (1, 4), SharedMemoryRef("r", 16, 0))}
    out = [RequestedOutput("Y", shared=SharedMemoryRef("r", 16, 16))]

    def request(inputs: Any, outputs: Any = None) -> InferRequest:
        return InferRequest(inputs={}, shared_inputs=dict(inputs), outputs=outputs)

    ok = request(good_in, out)
    registry.resolve(ok)
    assert ok.inputs["X"].tolist() == [[0x03020100, 0x07060504, 0x0B0A0908, 0x0F0E0D0C]]
    assert bytes(ok.shared_targets["Y"]) == bytes(range(16, 32))
    lost_in = {"X": SharedInput("INT32", (1, 4), SharedMemoryRef("gone", 16, 0))}
    lost_out = [RequestedOutput("Y", shared=SharedMemoryRef("gone-out", 16, 0))]
    unknown = "Unable to find shared memory region: "
    for call, message, error in (
        (request(lost_in, lost_out), f"{unknown}'gone'", UnknownRegion),
        (request(good_in, lost_out), f"{unknown}'gone-out'", UnknownRegion),
        (
            request({"X": SharedInput("INT32", (1, 4), SharedMemoryRef("r", 16, 64))}),
            "Invalid offset for shared memory region: 'r'",
            SharedMemoryError,
        ),
        (
            request(good_in, [RequestedOutput("Y", shared=SharedMemoryRef("r", 16, 56))]),
            "Invalid offset + byte size for shared memory region: 'r' (56 + 16 > 64 bytes)",
            SharedMemoryError,
        ),
    ):
        _refused(partial(registry.resolve, call), message, error)
    del ok
    registry.unregister("r")
    _refused(
        partial(registry.resolve, request(good_in)),
        "Unable to find shared memory region: 'r'",
        UnknownRegion,
    )
    registry.close()


def test_outputs_of_every_layout_are_written_byte_for_byte(tmp_path: Path) -> None:
    """The write is one memoryview copy: a transposed (non-contiguous) output, a zero-element
    one (no bytes, yet marked as sent in shared memory), 1-byte and 2-byte types and a 0-d
    scalar must all land as their C-order bytes, and nothing past them."""
    registry = _objects(tmp_path, obj=256)
    registry.register("r", "/obj", 0, 256)
    outputs = {
        "T": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # strides (4, 12)
        "E": np.zeros((0, 16), np.float32),
        "B": np.array([[True, False, True]]),
        "H": np.array([1.5, -2.0], np.float16),
        "S": np.array(7, np.int64),
    }
    offsets = {"T": 0, "E": 32, "B": 64, "H": 96, "S": 128}
    request = InferRequest(
        inputs={},
        outputs=[
            RequestedOutput(n, shared=SharedMemoryRef("r", 32, o)) for n, o in offsets.items()
        ],
    )
    registry.resolve(request)
    with (tmp_path / "obj").open("r+b") as f:
        f.write(b"\xee" * 256)
    response = InferResponse("m", "1", dict(outputs))
    write_outputs(request, response)
    assert response.shared == set(outputs)
    data = (tmp_path / "obj").read_bytes()
    for name, array in outputs.items():
        written = np.ascontiguousarray(array).tobytes()
        start = offsets[name]
        assert data[start : start + len(written)] == written, name
        assert data[start + len(written) : start + 32] == b"\xee" * (32 - len(written)), name
    del request
    registry.close()


def test_resolve_refuses_every_region_whose_object_shrank(tmp_path: Path) -> None:
    """``resolve`` reads an object's size once for references in a row to the same region,
    and again for each other region, inputs and outputs alike: a shrunk object behind any
    reference of a request is refused (reading it would be SIGBUS), in the region's name."""
    registry = _objects(tmp_path, a=128, b=128, c=128)
    for name in ("a", "b", "c"):
        registry.register(name, f"/{name}", 0, 128)

    def request(inputs: tuple[str, str], outputs: tuple[str, ...] = ()) -> InferRequest:
        return InferRequest(
            inputs={},
            shared_inputs={
                f"X{n}": SharedInput("INT32", (1, 4), SharedMemoryRef(region, 16, 16 * n))
                for n, region in enumerate(inputs)
            },
            outputs=[
                RequestedOutput(f"Y{n}", shared=SharedMemoryRef(region, 16, 64 + 16 * n))
                for n, region in enumerate(outputs)
            ],
        )

    whole = request(("a", "a"), ("b", "b"))
    registry.resolve(whole)  # two regions, two references each
    assert whole.inputs["X1"].tobytes() == bytes(range(16, 32))
    assert bytes(whole.shared_targets["Y1"]) == bytes(range(80, 96))
    del whole
    os.truncate(tmp_path / "b", 100)  # the second input's region, after a good first one
    _refused(
        partial(registry.resolve, request(("a", "b"))),
        "shared memory region 'b': its object '/b' shrank to 100 bytes since it was registered",
    )
    _refused(  # an output's region, after inputs in another one
        partial(registry.resolve, request(("a", "a"), ("c", "b"))),
        "shared memory region 'b': its object '/b' shrank to 100 bytes since it was registered",
    )
    os.truncate(tmp_path / "a", 8)  # the first reference's region
    _refused(
        partial(registry.resolve, request(("a", "a"))),
        "shared memory region 'a': its object '/a' shrank to 8 bytes since it was registered",
    )
    registry.close()


def test_inputs_keep_their_mapping_after_unregister(tmp_path: Path) -> None:
    """An input resolved from a region holds the mapping (an export of it), so unregistering
    the region while the request is queued unmaps nothing under it; a zero-element input
    reads nothing."""
    registry = _objects(tmp_path, obj=64)
    registry.register("r", "/obj", 0, 64)
    request = InferRequest(
        inputs={},
        shared_inputs={
            "X": SharedInput("INT32", (2, 2), SharedMemoryRef("r", 16, 16)),
            "E": SharedInput("INT32", (0, 3), SharedMemoryRef("r", 0, 60)),
        },
    )
    registry.resolve(request)
    mapping = registry.region("r").mapping
    registry.unregister("r")
    assert not mapping.closed  # the input holds it
    expected = np.frombuffer(bytes(range(16, 32)), np.int32).reshape(2, 2)
    np.testing.assert_array_equal(request.inputs["X"], expected)
    assert request.inputs["E"].shape == (0, 3)
    del request, mapping  # the last holders: unmapped now
