"""The gateway serving through a real Triton Inference Server host (a Triton-only deployment:
the router over Triton hosts, ``gateway.backends.routed``).

One tritonserver (python backend only, from the nvidia-pytriton wheel) and two gateway
processes for the module, one talking HTTP to it and one gRPC (with its HTTP ``url`` pointing
nowhere, so everything it does must go over gRPC); the host-crash test runs last and leaves a
restarted server behind.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from gateway import context
from gateway.backends.hosts import configured_hosts
from gateway.backends.triton import DEFAULT_PROTOCOL, TritonHost, triton_config
from gateway.errors import HostUnreachable, InvalidInput, ModelNotReady
from gateway.repository.config import DynamicBatching, ModelConfig, TensorConfig
from gateway.settings import Settings, SettingsError
from gateway.testing.tritonserver import TritonServer, free_port, tritonserver_unavailable_reason
from tests import models
from tests.helpers import GatewayProcess, as_text, ort_run, start_gateway, triton_infer
from tests.models import dtype_inputs, dtypes_onnx

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
        dynamic_batching=DynamicBatching(preferred_batch_sizes=(4,), max_queue_delay_us=2000),
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
    # The gateway batches (and waits) before Triton by default: Triton gets the sizes, no wait.
    assert ort_cfg["dynamic_batching"] == {"preferred_batch_size": [4]}
    assert py_cfg["dynamic_batching"] == {"preferred_batch_size": [4]}
    waits_there = triton_config(config, [1], "cpu", "python", batching="triton")
    assert waits_there["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert config.dynamic_batching and config.dynamic_batching.max_queue_delay_us == 2000


def triton_hosts(settings: Settings) -> list[tuple[Any, frozenset[str] | None]]:
    entries, _, _ = configured_hosts(settings)
    return [(e.host, e.models) for e in entries]


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
    assert (a.protocol, b.protocol, a.grpc_url) == ("http", "http", None)
    assert (a.batching, b.batching) == ("gateway", "gateway")
    (shared, _), (own, _) = triton_hosts(
        Settings(
            hosts=({"url": "x:1", "batching": "triton"}, {"url": "x:2"}),
            triton_batching="triton",
        )
    )
    assert (shared.batching, own.batching) == ("triton", "triton")
    (g, _), (h, _), (i, _) = triton_hosts(
        Settings(
            hosts=(
                {"url": "10.0.0.5:8000", "grpc_url": "10.0.0.5:8001", "protocol": "grpc"},
                {"url": "10.0.0.6:8000", "grpc_url": "10.0.0.6:8001", "protocol": "http"},
                {"url": "10.0.0.7:8000", "grpc_url": "10.0.0.7:8001"},  # the measured default
            )
        )
    )
    assert (g.protocol, g.grpc_url, h.protocol) == ("grpc", "10.0.0.5:8001", "http")
    assert i.protocol == DEFAULT_PROTOCOL == "grpc"
    assert g.describe()["protocol"] == "grpc" and g.describe()["grpc_url"] == "10.0.0.5:8001"
    for bad in (
        {"kind": "triton"},
        {"url": "x:1", "device": "tpu"},
        {"url": "x:1", "models": 1},
        {"url": "x:1", "protocol": "grpc"},  # no grpc_url
        {"url": "x:1", "protocol": "thrift", "grpc_url": "x:2"},
        {"url": "x:1", "grpc_url": "grpc://x:2"},
        {"url": "x:1", "grpc_url": 8001},
        {"url": "x:1", "batching": "both"},
    ):
        with pytest.raises(SettingsError):
            triton_hosts(Settings(hosts=(bad,)))
    with pytest.raises(SettingsError):
        Settings(triton_strategy="tensorrt")
    with pytest.raises(SettingsError):
        Settings(triton_batching="client")


def _host(protocol: str, url: str, grpc_url: str | None = None, **kwargs: Any) -> TritonHost:
    return TritonHost(protocol, url, grpc_url=grpc_url, protocol=protocol, **kwargs)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_unreachable_host_fails_fast(protocol: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    host = _host(protocol, dead, dead, probe_interval_s=0.2)
    try:
        assert not await host.ready()
        for _ in range(2):  # a new connection, then one the client already saw fail
            started = time.monotonic()
            with pytest.raises(HostUnreachable):
                await host.infer("m", 1, {"X": np.zeros((1, 4), np.float32)}, ["Y"])
            assert time.monotonic() - started < 1.0
            assert host.describe()["state"] == "down"
    finally:
        await host.close()


class _RecordingClient:
    """Stands in for the pooled tritonclient client: records the ``infer`` call."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    async def infer(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self

    def as_numpy(self, name: str) -> np.ndarray:
        return np.zeros((1, 4), np.float32)

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_request_ids_and_deadline_go_upstream(protocol: str) -> None:
    host = _host(protocol, "127.0.0.1:1", "127.0.0.1:2")
    client = _RecordingClient()
    host._transport._client = client
    try:
        context.batch_request_ids.set(("a", "b"))
        await host.infer("m", 3, {"X": np.ones((2, 4), np.float32)}, ["Y"], timeout_s=1.5)
        context.batch_request_ids.set(())
        context.request_id.set("solo")
        await host.infer("m", 3, {"X": np.ones((1, 4), np.float32)}, ["Y"])
    finally:
        context.request_id.set(None)
        await host.close()
    (args, batched), (_, single) = client.calls
    assert args[0] == "m" and batched["model_version"] == "3"
    assert batched["request_id"] == "a,b" and batched["headers"]["x-request-id"] == "a,b"
    assert single["request_id"] == "solo" and single["timeout"] is None
    assert batched["timeout"] == 1_500_000  # Triton's own request timeout, microseconds
    (tensor,), (wanted,) = args[1], batched["outputs"]
    assert type(tensor).__module__.startswith(f"tritonclient.{protocol}")
    assert type(wanted).__module__.startswith(f"tritonclient.{protocol}")
    if protocol == "grpc":  # the deadline travels as the gRPC deadline too; raw bytes
        assert (batched["client_timeout"], single["client_timeout"]) == (1.5, host.timeout_s)
        assert tensor._get_content() == np.ones((2, 4), np.float32).tobytes()
        assert batched["headers"] == {"x-request-id": "a,b"}
    else:
        assert "client_timeout" not in batched
        # aiohttp would ask for gzip, and Triton would compress every response for it.
        assert batched["headers"]["accept-encoding"] == single["headers"]["accept-encoding"]
        assert single["headers"]["accept-encoding"] == "identity"
        assert tensor._get_binary_data() == np.ones((2, 4), np.float32).tobytes()


def test_grpc_errors_become_what_the_http_client_raises() -> None:
    """gRPC status codes -> HTTP-like statuses; UNAVAILABLE is a lost connection only when the
    channel is no longer READY (else it is Triton's own, e.g. a full queue)."""
    import grpc

    from gateway.backends.triton import _GrpcTransport

    transport = _GrpcTransport("127.0.0.1:1", reconnect_s=1.0)

    def said(code: str) -> Exception:
        return transport._translate(InferenceServerException(f"{code}!", f"StatusCode.{code}"))

    assert isinstance(said("DEADLINE_EXCEEDED"), TimeoutError)
    assert isinstance(said("UNAVAILABLE"), ConnectionError)  # no channel: never connected

    class Channel:
        def get_state(self) -> Any:
            return grpc.ChannelConnectivity.READY

    class Client:
        _channel = Channel()

    transport._client = Client()
    for code, status in [("UNAVAILABLE", "503"), ("NOT_FOUND", "404"), ("INTERNAL", "500")]:
        error = said(code)
        assert isinstance(error, InferenceServerException)
        assert (error.status(), error.message()) == (status, f"{code}!")
    assert said("INVALID_ARGUMENT").status() == "400"


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
    # A queue delay, waited at the gateway and not pushed to Triton (``batching = "gateway"``).
    delayed = models.SIMPLE_CONFIG.replace(
        "dynamic_batching { }", "dynamic_batching { max_queue_delay_microseconds: 500 }"
    )
    models.add_sub(root, "simple", config=delayed)
    models.dense(root, "dense")  # no config.pbtxt: auto-completed by the gateway
    # A long queue delay: concurrent requests meet in the gateway's batcher, deterministically
    # (10 s: a full batch sent at once is told from one sent at the delay by a loose bound).
    patient = models.SIMPLE_CONFIG.replace('"simple"', '"patient"').replace(
        "dynamic_batching { }", "dynamic_batching { max_queue_delay_microseconds: 10000000 }"
    )
    models.add_sub(root, "patient", config=patient, offset=7)
    models.add_sub(root, "ghost")  # only allowed on a host that does not exist
    # ORT session entries reach the python-backend model; this one makes its session refuse
    # an .onnx file.
    config = models.SIMPLE_CONFIG.replace('"simple"', '"ortformat"') + (
        'parameters { key: "session.load_model_format" value: { string_value: "ORT" } }\n'
    )
    models.add_sub(root, "ortformat", config=config)
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
        # ``patient``'s eight requests at once make one batch: Triton's fixed delay (the
        # adaptive one sends the first of a burst after a quiet spell at once).
        'batching_delay = "triton"\n'
        "[[hosts]]\n"
        'kind = "triton"\nname = "t1"\ndevice = "cpu"\n'
        f'url = "{triton.http_url}"\nmodels = ["simple", "dense", "ortformat", "patient"]\n'
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


@pytest.fixture(scope="module")
def grpc_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models of their own (one Triton serves both gateways; names must not collide)."""
    root = tmp_path_factory.mktemp("triton-grpc-repo")
    models.add_sub(root, "simple_grpc")
    (root / "dtypes" / "1").mkdir(parents=True)  # no config.pbtxt: auto-completed
    (root / "dtypes" / "1" / "model.onnx").write_bytes(dtypes_onnx())
    return root


@pytest.fixture(scope="module")
def gw_grpc(
    triton: TritonServer, grpc_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """The gateway talking gRPC to the module's Triton; its HTTP ``url`` leads nowhere."""
    tmp = tmp_path_factory.mktemp("triton-gw-grpc")
    config = tmp / "gateway.toml"
    config.write_text(
        f"host_probe_interval_s = {PROBE_INTERVAL_S}\n"
        "[[hosts]]\n"
        'kind = "triton"\nname = "g1"\nprotocol = "grpc"\n'
        f'url = "127.0.0.1:{free_port()}"\ngrpc_url = "{triton.grpc_url}"\n'
    )
    process = start_gateway(grpc_repo, tmp, "--config", str(config))
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
    assert params["host_concurrency"] == 4  # as configured
    assert params["batching"] == "gateway"  # the default: one wait, at the gateway
    (host,) = params["hosts"]
    assert (host["name"], host["state"], host["model_ready"]) == ("t1", "up", True)
    assert host["batching"] == "gateway"
    assert (
        "unable to find backend library for backend 'onnxruntime'"
        in (host["onnxruntime_backend_error"])
    )
    config = client.get_model_config("dense")
    assert config["max_batch_size"] == 4 and config["input"][0]["dims"] == [64]
    direct = _client(triton.http_address)
    assert direct.is_model_ready("simple", "1") and direct.is_model_ready("dense", "1")
    assert direct.get_model_config("simple")["backend"] == "python"
    waits = client.get_model_config("simple")["dynamic_batching"]["max_queue_delay_microseconds"]
    assert int(waits) == 500
    there = direct.get_model_config("simple")["dynamic_batching"]
    assert int(there.get("max_queue_delay_microseconds", 0)) == 0


def test_requests_are_batched_once_at_the_gateway(gw: GatewayProcess, triton: TritonServer) -> None:
    """Eight single-row requests at once fill the gateway's batch (max 8) before its 10 s queue
    delay ends, and reach Triton as one request of 8 rows, run at once (Triton got no delay of
    its own); each caller still gets its own row back. (Batching at Triton would have sent it
    several requests, merged there.)"""
    direct = _client(triton.http_address)
    there = direct.get_model_config("patient")["dynamic_batching"]
    assert int(there.get("max_queue_delay_microseconds", 0)) == 0

    def one(i: int) -> tuple[int, np.ndarray]:
        feeds = {n: np.full((1, 16), i, np.int32) for n in ("INPUT0", "INPUT1")}
        return i, _infer(_client(gw.address), "patient", feeds, True).as_numpy("OUTPUT0")

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    # A full batch does not wait for the delay: half of it, as load alone can stretch eight
    # clients' round trips well past a second.
    assert time.monotonic() - started < 5.0
    for i, out in answers:
        np.testing.assert_array_equal(out, np.full((1, 16), 2 * i + 7, np.int32))
    (stats,) = direct.get_inference_statistics("patient")["model_stats"]
    requests = int(stats["inference_stats"]["success"]["count"])  # what Triton was sent
    assert (requests, stats["inference_count"], stats["execution_count"]) == (1, 8, 1)


def test_load_failure_reason_in_index(gw: GatewayProcess) -> None:
    index = {e["name"]: e for e in _client(gw.address).get_model_repository_index()}
    assert index["simple"]["state"] == "READY"
    ghost = index["ghost"]
    assert ghost["state"] == "UNAVAILABLE"
    assert "could not be loaded on any Triton host" in ghost["reason"]
    assert "nowhere" in ghost["reason"] and "unreachable" in ghost["reason"]
    # The host answered, and said why its python-backend model could not start.
    ortformat = index["ortformat"]
    assert ortformat["state"] == "UNAVAILABLE"
    assert "t1" in ortformat["reason"] and "ORT model verification" in ortformat["reason"]


def test_unload_and_load_through_the_gateway(gw: GatewayProcess, triton: TritonServer) -> None:
    client, direct = _client(gw.address), _client(triton.http_address)
    client.unload_model("dense")
    assert not client.is_model_ready("dense")
    assert not direct.is_model_ready("dense")
    client.load_model("dense")
    assert direct.is_model_ready("dense", "1")
    x = {"X": np.ones((2, 64), np.float32)}
    assert _infer(client, "dense", x, True).as_numpy("Y").shape == (2, 8)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_grpc_host_outputs_match_onnxruntime(gw_grpc: GatewayProcess, binary: bool) -> None:
    """tritonclient.http -> gateway -> Triton over gRPC, every datatype, against ORT."""
    client = _client(gw_grpc.address)
    feeds = dtype_inputs(batch=3)
    expected = ort_run(dtypes_onnx(), feeds)
    fp16 = frozenset({"IN_FP16", "OUT_FP16"})  # as in the harness: FP16 only binary
    result = triton_infer(
        client, "dtypes", feeds, binary=binary, outputs=list(expected), always_binary=fp16
    )
    for name, want in expected.items():
        got = result.as_numpy(name)
        if want.dtype == np.object_:
            np.testing.assert_array_equal(as_text(got), want)
        else:
            assert got.dtype == want.dtype, name
            np.testing.assert_array_equal(got, want)
    pair = _simple_feeds()
    simple = _infer(client, "simple_grpc", pair, binary)
    np.testing.assert_array_equal(simple.as_numpy("OUTPUT1"), pair["INPUT0"] - pair["INPUT1"])
    params = client.get_model_metadata("dtypes")["parameters"]
    assert params["host_concurrency"] == 2  # the default: one instance there, and one more
    (host,) = params["hosts"]
    assert (host["name"], host["protocol"], host["state"]) == ("g1", "grpc", "up")


def test_grpc_host_unload_and_load(gw_grpc: GatewayProcess, triton: TritonServer) -> None:
    """Repository unload and load through the gateway reach Triton over gRPC too."""
    client, direct = _client(gw_grpc.address), _client(triton.http_address)
    client.unload_model("simple_grpc")
    assert not direct.is_model_ready("simple_grpc")
    client.load_model("simple_grpc")
    assert direct.is_model_ready("simple_grpc", "1") and client.is_model_ready("simple_grpc")


async def test_grpc_host_maps_tritons_errors(triton: TritonServer, gw: GatewayProcess) -> None:
    """Triton's own gRPC errors, seen by a ``TritonHost`` directly (``simple`` is on Triton)."""
    host = _host("grpc", f"127.0.0.1:{free_port()}", triton.grpc_url)
    good = {n: np.ones((2, 16), np.int32) for n in ("INPUT0", "INPUT1")}
    try:
        # "ortformat" failed to load there, so Triton's strict /v2/health/ready says no; the
        # server is live, and a host that is live counts as up.
        assert not await host.ready()
        await host.probe()
        assert host.state == "up" and await host.model_ready("simple", 1)
        out = await host.infer("simple", 1, good, ["OUTPUT0"], timeout_s=TIMEOUT_S)
        np.testing.assert_array_equal(out["OUTPUT0"], good["INPUT0"] * 2)
        with pytest.raises(ModelNotReady, match="unknown model"):
            await host.infer("no_such_model", 1, good, ["OUTPUT0"])
        bad = {**good, "INPUT1": np.ones((1, 16), np.int32)}
        with pytest.raises(InvalidInput, match="batch size"):
            await host.infer("simple", 1, bad, ["OUTPUT0"])
        assert host.describe()["state"] != "down"  # Triton answered: the host is fine
    finally:
        await host.close()


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
    gw: GatewayProcess, gw_grpc: GatewayProcess, triton: TritonServer
) -> None:
    """Runs last: kills the module's Triton and restarts it on the same ports; both gateways
    (HTTP and gRPC to Triton) answer 503 at once while it is down, and recover."""
    gateways = [(gw, "simple", "t1"), (gw_grpc, "simple_grpc", "g1")]
    urls = [f"{process.url}/v2/models/{model}/infer" for process, model, _ in gateways]
    for url in urls:
        assert _post_json(url, SIMPLE_JSON)[0] == 200

    def post_after_kill(i: int) -> None:
        started = time.monotonic()
        status, headers, body = _post_json(urls[i], SIMPLE_JSON)
        elapsed = time.monotonic() - started
        host_name = gateways[i][2]
        print(f"{host_name} after kill: {status} in {elapsed * 1000:.1f} ms: {body}")
        assert status == 503 and elapsed < 5.0
        assert "retry-after" in headers and host_name in body

    triton.kill()
    # The first request to each, at once (before a probe notices), finds the dead connection;
    # the next ones a host marked down.
    with ThreadPoolExecutor(len(gateways)) as pool:
        list(pool.map(post_after_kill, range(len(gateways))))
    for i, (process, model, _) in enumerate(gateways):
        post_after_kill(i)
        post_after_kill(i)
        host = _client(process.address).get_model_metadata(model)["parameters"]["hosts"][0]
        assert host["state"] == "down" and host["model_ready"] is False
        assert not _client(process.address).is_model_ready(model)  # no host serves it

    triton.restart()  # same ports, empty repository
    started = time.monotonic()
    deadline = started + PROBE_INTERVAL_S + 15.0
    for process, model, host_name in gateways:
        url = f"{process.url}/v2/models/{model}/infer"
        while (status := _post_json(url, SIMPLE_JSON)[0]) != 200 and (time.monotonic() < deadline):
            time.sleep(0.1)
        print(f"{host_name} serving again {time.monotonic() - started:.2f} s after the restart")
        assert status == 200
        assert _client(process.address).is_model_ready(model)
    direct = _client(triton.http_address)
    assert direct.is_model_ready("simple", "1")
    deadline = time.monotonic() + 15.0
    while not direct.is_model_ready("dense", "1") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert direct.is_model_ready("dense", "1")
