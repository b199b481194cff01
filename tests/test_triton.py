"""The gateway serving through a real Triton Inference Server host (``TritonFactory``).

One tritonserver (python backend only, from the nvidia-pytriton wheel) and one gateway process
for the module; the host-crash test runs last and leaves a restarted server behind.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from gateway.backends.triton import TritonHost, triton_config, triton_hosts
from gateway.repository.config import ModelConfig, TensorConfig
from gateway.settings import Settings, SettingsError
from gateway.testing.tritonserver import TritonServer, free_port, tritonserver_unavailable_reason
from tests import models
from tests.conftest import GatewayProcess, start_gateway

httpclient = pytest.importorskip("tritonclient.http")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

pytestmark = pytest.mark.triton

PROBE_INTERVAL_S = 0.5
TIMEOUT_S = 10.0


# -- without a server ---------------------------------------------------------------------


def test_triton_config_for_each_strategy() -> None:
    config = ModelConfig(
        name="m",
        max_batch_size=8,
        inputs=(TensorConfig("X", "FP32", (4,)),),
        outputs=(TensorConfig("Y", "FP32", (4,)),),
        instance_kind="KIND_GPU",
        instance_count=2,
    )
    ort_cfg = triton_config(config, [2, 1], "cpu", "onnxruntime")
    assert ort_cfg["backend"] == "onnxruntime" and ort_cfg["platform"] == "onnxruntime_onnx"
    assert ort_cfg["version_policy"] == {"specific": {"versions": [1, 2]}}
    assert ort_cfg["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    assert triton_config(config, [1], "gpu", "onnxruntime")["instance_group"][0]["kind"] == (
        "KIND_GPU"
    )
    py_cfg = triton_config(config, [1], "cpu", "python")
    assert py_cfg["backend"] == "python" and "platform" not in py_cfg
    assert py_cfg["input"] == ort_cfg["input"] and py_cfg["max_batch_size"] == 8


def test_hosts_from_settings() -> None:
    settings = Settings(
        hosts=(
            {"kind": "triton", "name": "a", "url": "127.0.0.1:1", "models": ["m"]},
            {"kind": "triton", "url": "http://127.0.0.1:2", "device": "gpu"},
        ),
        triton_strategy="python",
    )
    (a, a_models), (b, b_models) = triton_hosts(settings)
    assert (a.name, a.url, a_models, a.strategy) == ("a", "http://127.0.0.1:1", {"m"}, "python")
    assert (b.name, b_models, "gpu" in b.labels) == ("http://127.0.0.1:2", None, True)
    for bad in ({"kind": "triton"}, {"url": "x:1", "device": "tpu"}, {"url": "x:1", "models": 1}):
        with pytest.raises(SettingsError):
            triton_hosts(Settings(hosts=(bad,)))
    with pytest.raises(SettingsError):
        Settings(triton_strategy="tensorrt")


async def test_unreachable_host_fails_fast() -> None:
    host = TritonHost("dead", f"127.0.0.1:{free_port()}", probe_interval_s=0.2)
    try:
        assert not await host.ready()
        started = time.monotonic()
        from gateway.errors import HostUnreachable

        with pytest.raises(HostUnreachable):
            await host.infer("m", 1, {"X": np.zeros((1, 4), np.float32)}, ["Y"])
        assert time.monotonic() - started < 1.0
        assert host.describe()["state"] == "down"
    finally:
        await host.close()


# -- gateway -> real Triton -----------------------------------------------------------------


@pytest.fixture(scope="module")
def triton() -> Iterator[TritonServer]:
    reason = tritonserver_unavailable_reason()
    if reason is not None:
        print(f"tritonserver unavailable: {reason}")
        pytest.skip(f"tritonserver unavailable: {reason}")
    with TritonServer() as server:
        yield server


@pytest.fixture(scope="module")
def triton_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("triton-repo")
    models.add_sub(root, "simple")
    models.dense(root, "dense")  # no config.pbtxt: auto-completed by the gateway
    models.add_sub(root, "ghost")  # only allowed on a host that does not exist
    return root


@pytest.fixture(scope="module")
def gw(
    triton: TritonServer, triton_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("triton-gw")
    config = tmp / "gateway.toml"
    config.write_text(
        f"host_probe_interval_s = {PROBE_INTERVAL_S}\n"
        "host_concurrency = 4\n"
        "[[hosts]]\n"
        'kind = "triton"\nname = "t1"\ndevice = "cpu"\n'
        f'url = "{triton.http_url}"\nmodels = ["simple", "dense"]\n'
        "[[hosts]]\n"
        'kind = "triton"\nname = "nowhere"\n'
        f'url = "127.0.0.1:{free_port()}"\nmodels = ["ghost"]\n'
    )
    process = start_gateway(triton_repo, tmp, "--config", str(config))
    try:
        yield process
    finally:
        process.stop()
        print(process.log()[-3000:])


def _client(address: str) -> Any:
    return httpclient.InferenceServerClient(
        address, connection_timeout=TIMEOUT_S, network_timeout=TIMEOUT_S
    )


def _simple_feeds(rows: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows)
    return {
        n: rng.integers(-1000, 1000, size=(rows, 16), dtype=np.int32) for n in ("INPUT0", "INPUT1")
    }


def _infer(client: Any, model: str, feeds: dict[str, np.ndarray], binary: bool) -> Any:
    inputs = []
    for name, array in feeds.items():
        datatype = "INT32" if array.dtype == np.int32 else "FP32"
        tensor = httpclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return client.infer(model, inputs)


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_outputs_match_onnxruntime(gw: GatewayProcess, triton_repo: Path, binary: bool) -> None:
    client = _client(gw.address)
    feeds = _simple_feeds()
    result = _infer(client, "simple", feeds, binary)
    for name, want in _ort(triton_repo / "simple" / "1" / "model.onnx", feeds).items():
        np.testing.assert_array_equal(result.as_numpy(name), want)
    x = {"X": np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)}
    got = _infer(client, "dense", x, binary).as_numpy("Y")
    np.testing.assert_allclose(got, _ort(triton_repo / "dense" / "1" / "model.onnx", x)["Y"], 1e-5)


def test_metadata_config_and_readiness(gw: GatewayProcess, triton: TritonServer) -> None:
    client = _client(gw.address)
    assert client.is_model_ready("simple") and client.is_model_ready("dense")
    meta = client.get_model_metadata("simple")
    assert [i["name"] for i in meta["inputs"]] == ["INPUT0", "INPUT1"]
    assert meta["inputs"][0]["shape"] == [-1, 16]
    params = meta["parameters"]
    print(f"metadata parameters: {json.dumps(params)}")
    assert params["backend"] == "triton"
    assert params["strategy"] == "python"  # this Triton build has no onnxruntime backend
    (host,) = params["hosts"]
    assert (host["name"], host["state"], host["model_ready"]) == ("t1", "up", True)
    assert (
        "unable to find backend library for backend 'onnxruntime'"
        in (host["onnxruntime_backend_error"])
    )
    config = client.get_model_config("dense")
    assert config["max_batch_size"] == 4 and config["input"][0]["dims"] == [64]
    direct = _client(triton.http_address)
    assert direct.is_model_ready("simple", "1") and direct.is_model_ready("dense", "1")
    assert direct.get_model_config("simple")["backend"] == "python"


def test_load_failure_reason_in_index(gw: GatewayProcess) -> None:
    index = {e["name"]: e for e in _client(gw.address).get_model_repository_index()}
    assert index["simple"]["state"] == "READY"
    ghost = index["ghost"]
    assert ghost["state"] == "UNAVAILABLE"
    assert "could not be loaded on any Triton host" in ghost["reason"]
    assert "nowhere" in ghost["reason"] and "unreachable" in ghost["reason"]


def test_unload_and_load_through_the_gateway(gw: GatewayProcess, triton: TritonServer) -> None:
    client, direct = _client(gw.address), _client(triton.http_address)
    client.unload_model("dense")
    assert not client.is_model_ready("dense")
    assert not direct.is_model_ready("dense")
    client.load_model("dense")
    assert direct.is_model_ready("dense", "1")
    x = {"X": np.ones((2, 64), np.float32)}
    assert _infer(client, "dense", x, True).as_numpy("Y").shape == (2, 8)


def _post_json(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read().decode(),
            )
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode()


SIMPLE_JSON = {
    "inputs": [
        {"name": n, "shape": [1, 16], "datatype": "INT32", "data": list(range(16))}
        for n in ("INPUT0", "INPUT1")
    ]
}


def test_host_crash_fails_fast_and_restart_recovers(
    gw: GatewayProcess, triton: TritonServer
) -> None:
    """Runs last: kills the module's Triton and restarts it on the same ports."""
    url = f"{gw.url}/v2/models/simple/infer"
    assert _post_json(url, SIMPLE_JSON)[0] == 200
    triton.kill()
    for _ in range(3):  # the first finds the dead connection, the rest a host marked down
        started = time.monotonic()
        status, headers, body = _post_json(url, SIMPLE_JSON)
        elapsed = time.monotonic() - started
        print(f"after kill: {status} in {elapsed * 1000:.1f} ms: {body}")
        assert status == 503 and elapsed < 5.0
        assert "retry-after" in headers and "t1" in body
    host = _client(gw.address).get_model_metadata("simple")["parameters"]["hosts"][0]
    assert host["state"] == "down" and host["model_ready"] is False
    assert not _client(gw.address).is_model_ready("simple")  # no host serves it: not ready

    triton.restart()  # same ports, empty repository
    started = time.monotonic()
    deadline = started + PROBE_INTERVAL_S + 15.0
    while (status := _post_json(url, SIMPLE_JSON)[0]) != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"serving again {time.monotonic() - started:.2f} s after the restart")
    assert status == 200
    assert _client(gw.address).is_model_ready("simple")
    direct = _client(triton.http_address)
    assert direct.is_model_ready("simple", "1")
    deadline = time.monotonic() + 15.0
    while not direct.is_model_ready("dense", "1") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert direct.is_model_ready("dense", "1")
