"""A real tritonserver (nvidia-pytriton's binary) with ONNX models pushed over the repository API.

Checks the two things the gateway relies on: this Triton build rejects ``backend:
"onnxruntime"`` (so the gateway must fall back), and the python-backend wrapper serves the same
``model.onnx`` with results identical to ONNX Runtime in process.
"""

from __future__ import annotations

import ast
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.backends.triton_python_model import (
    PYTHON_BACKEND_MODEL_PY,
    python_backend_config,
    python_backend_files,
)
from gateway.errors import ModelLoadError
from gateway.testing.tritonserver import (
    TritonServer,
    TritonServerError,
    _pushed_model_dirs,
    _stubs,
    free_port,
    process_running,
    tritonserver_unavailable_reason,
)
from tests.helpers import as_text, foreign_ready_server, ort_run, triton_infer
from tests.models import DTYPE_CASES, dtype_inputs, dtypes_onnx, simple_onnx

httpclient = pytest.importorskip("tritonclient.http")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

pytestmark = pytest.mark.triton

NETWORK_TIMEOUT_S = 10.0


def _skip_without_triton() -> None:
    reason = tritonserver_unavailable_reason()
    if reason is not None:
        pytest.skip(f"tritonserver unavailable: {reason}")


@pytest.fixture(scope="module")
def triton() -> Iterator[TritonServer]:
    _skip_without_triton()
    server = TritonServer()
    try:
        server.start()
        print(f"tritonserver ready in {server.startup_s:.2f} s at {server.http_url}")
        yield server
    finally:
        server.stop()


_open_clients: list[Any] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close every client a test opened: Triton's SIGTERM waits for idle keep-alive sockets."""
    yield
    while _open_clients:
        _open_clients.pop().close()


def _client(server: TritonServer, timeout_s: float = NETWORK_TIMEOUT_S) -> Any:
    client = httpclient.InferenceServerClient(
        server.http_address, connection_timeout=timeout_s, network_timeout=timeout_s
    )
    _open_clients.append(client)
    return client


# -- models built at test time ------------------------------------------------------------


def simple_config(name: str, *, dynamic_batching: bool = False) -> dict[str, Any]:
    io = {"data_type": "TYPE_INT32", "dims": [16]}
    config: dict[str, Any] = {
        "name": name,
        "backend": "onnxruntime",
        "max_batch_size": 8,
        "input": [{"name": n, **io} for n in ("INPUT0", "INPUT1")],
        "output": [{"name": n, **io} for n in ("OUTPUT0", "OUTPUT1")],
        "instance_group": [{"kind": "KIND_CPU", "count": 1}],
    }
    if dynamic_batching:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": 20000}
    return config


def dtypes_config(name: str) -> dict[str, Any]:
    def io(prefix: str) -> list[dict[str, Any]]:
        return [
            {"name": f"{prefix}_{t}", "data_type": tt, "dims": [3]} for t, _, tt, *_ in DTYPE_CASES
        ]

    return {
        "name": name,
        "platform": "onnxruntime_onnx",
        "max_batch_size": 4,
        "input": io("IN"),
        "output": io("OUT"),
    }


# -- tests without a server ---------------------------------------------------------------


def test_model_py_is_valid_python() -> None:
    compile(PYTHON_BACKEND_MODEL_PY, "model.py", "exec")


def test_model_py_stands_alone() -> None:
    """What is pushed is the package's ``triton_model/model.py`` (the file ruff and mypy check),
    and Triton runs it by path on the host's Python: it imports nothing the host lacks (the
    gateway), and parses on Python 3.8, the oldest the python-backend stubs are built for."""
    path = Path(__file__).resolve().parent.parent / "gateway/backends/triton_model/model.py"
    assert PYTHON_BACKEND_MODEL_PY == path.read_text("utf-8")
    tree = ast.parse(PYTHON_BACKEND_MODEL_PY, feature_version=(3, 8))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    allowed = {"__future__", "json", "os", "typing", "numpy", "onnxruntime"}
    assert imported <= allowed | {"triton_python_backend_utils"}, imported


def test_python_backend_files_layout() -> None:
    files = python_backend_files(b"onnx", 3)
    assert files == {
        "file:3/model.py": PYTHON_BACKEND_MODEL_PY.encode(),
        "file:3/model.onnx": b"onnx",
    }
    with pytest.raises(ValueError):
        python_backend_files(b"onnx", 0)


def test_python_backend_config_rewrites_only_the_backend() -> None:
    original = {
        **dtypes_config("m"),
        "default_model_filename": "model.onnx",
        "optimization": {"execution_accelerators": {"cpu_execution_accelerator": [{"name": "x"}]}},
    }
    converted = python_backend_config(original)
    assert converted["backend"] == "python"
    assert "platform" not in converted
    assert "default_model_filename" not in converted
    assert "optimization" not in converted
    assert converted["input"] == original["input"] and original["platform"] == "onnxruntime_onnx"
    assert python_backend_config(simple_config("s"))["backend"] == "python"
    with pytest.raises(ModelLoadError):
        python_backend_config({"platform": "tensorrt_plan"})


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# -- tests against the real server --------------------------------------------------------


def test_server_is_ready_on_loopback(triton: TritonServer) -> None:
    client = _client(triton)
    assert client.is_server_live() and client.is_server_ready()
    assert triton.http_url.startswith("http://127.0.0.1:")
    assert triton.grpc_url.startswith("127.0.0.1:")
    assert client.get_model_repository_index() == []
    import urllib.request

    with urllib.request.urlopen(triton.metrics_url, timeout=NETWORK_TIMEOUT_S) as response:
        assert response.status == 200


def test_onnxruntime_backend_is_missing(triton: TritonServer) -> None:
    """This build has no onnxruntime backend: the gateway must detect this and fall back."""
    client = _client(triton)
    config = simple_config("simple_ort")
    with pytest.raises(InferenceServerException) as info:
        client.load_model(
            "simple_ort", config=json.dumps(config), files={"file:1/model.onnx": simple_onnx()}
        )
    message = info.value.message()
    print(f"ORT-backend load failure: {message!r}")
    assert "onnxruntime" in message
    assert not client.is_model_ready("simple_ort")


@pytest.fixture(scope="module")
def simple_model(triton: TritonServer) -> str:
    """The ``simple`` model pushed as python backend + model.onnx, with dynamic batching."""
    name = "simple"
    config = python_backend_config(simple_config(name, dynamic_batching=True))
    _client(triton, 60.0).load_model(
        name, config=json.dumps(config), files=python_backend_files(simple_onnx(), 1)
    )
    return name


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_python_backend_matches_onnxruntime(
    triton: TritonServer, simple_model: str, binary: bool
) -> None:
    client = _client(triton)
    assert client.is_model_ready(simple_model)
    rng = np.random.default_rng(0)
    feeds = {
        n: rng.integers(-1000, 1000, size=(3, 16), dtype=np.int32) for n in ("INPUT0", "INPUT1")
    }
    expected = ort_run(simple_onnx(), feeds)
    result = triton_infer(client, simple_model, feeds, binary=binary)
    for name, want in expected.items():
        got = result.as_numpy(name)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
    only_diff = triton_infer(client, simple_model, feeds, binary=binary, outputs=["OUTPUT1"])
    assert [o["name"] for o in only_diff.get_response()["outputs"]] == ["OUTPUT1"]


def test_concurrent_requests_are_split_back_correctly(
    triton: TritonServer, simple_model: str
) -> None:
    """Dynamic batching hands several requests to one ``execute``; each gets its own rows."""

    def one(i: int) -> tuple[np.ndarray, np.ndarray]:
        rows = 1 + i % 3
        feeds = {
            "INPUT0": np.full((rows, 16), i, dtype=np.int32),
            "INPUT1": np.arange(rows * 16, dtype=np.int32).reshape(rows, 16),
        }
        result = triton_infer(_client(triton), simple_model, feeds, binary=True)
        return result.as_numpy("OUTPUT0"), feeds["INPUT0"] + feeds["INPUT1"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        for got, want in pool.map(one, range(32)):
            np.testing.assert_array_equal(got, want)
    stats = _client(triton).get_inference_statistics(simple_model)["model_stats"][0]
    print(f"inferences {stats['inference_count']} in {stats['execution_count']} executions")


def test_all_dtypes_round_trip(triton: TritonServer) -> None:
    name = "dtypes"
    onnx_bytes = dtypes_onnx()
    client = _client(triton, 60.0)
    client.load_model(
        name,
        config=json.dumps(python_backend_config(dtypes_config(name))),
        files=python_backend_files(onnx_bytes, 1),
    )
    feeds = dtype_inputs(batch=2)
    expected = ort_run(onnx_bytes, feeds)
    # Triton refuses FP16 in JSON ("receiving FP16 data via JSON is not supported"), so a
    # JSON request still carries FP16 tensors in binary.
    fp16 = frozenset({"IN_FP16", "OUT_FP16"})
    for binary in (True, False):
        result = triton_infer(
            client, name, feeds, binary=binary, outputs=list(expected), always_binary=fp16
        )
        for out_name, want in expected.items():
            got = result.as_numpy(out_name)
            if want.dtype == np.object_:
                np.testing.assert_array_equal(as_text(got), want)
            else:
                assert got.dtype == want.dtype, out_name
                np.testing.assert_array_equal(got, want)
    client.unload_model(name)


def test_bad_request_fails_alone(triton: TritonServer, simple_model: str) -> None:
    """A shape the model rejects comes back as an error, and the model keeps serving."""
    client = _client(triton)
    bad = {"INPUT0": np.zeros((1, 16), np.int32), "INPUT1": np.zeros((2, 16), np.int32)}
    with pytest.raises(InferenceServerException):
        triton_infer(client, simple_model, bad, binary=True)
    good = {n: np.ones((1, 16), np.int32) for n in ("INPUT0", "INPUT1")}
    np.testing.assert_array_equal(
        triton_infer(client, simple_model, good, binary=True).as_numpy("OUTPUT0"),
        good["INPUT0"] * 2,
    )


def test_unload_makes_model_not_ready(triton: TritonServer, simple_model: str) -> None:
    client = _client(triton)
    client.unload_model(simple_model)
    deadline = time.monotonic() + 10.0
    while client.is_model_ready(simple_model) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not client.is_model_ready(simple_model)


def test_kill_fails_fast_and_restart_reuses_ports() -> None:
    """Its own server: a host crash must not poison the module's shared one."""
    _skip_without_triton()
    with TritonServer() as server:
        client = _client(server, 60.0)
        client.load_model(
            "simple",
            config=json.dumps(python_backend_config(simple_config("simple"))),
            files=python_backend_files(simple_onnx(), 1),
        )
        port, pid = server.http_port, server.pid
        assert pid is not None
        pushed = _pushed_model_dirs(pid)
        assert pushed and all(d.is_dir() for d in pushed)
        stubs = [p for p, _ in _stubs(pid)]
        assert stubs
        regions = list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))
        assert regions  # the stubs' shared memory, named for this server
        server.kill()
        assert not server.running
        assert not any(d.exists() for d in pushed), "kill() leaves Triton's /tmp copies behind"
        assert not any(map(process_running, stubs)), "kill() leaves python-backend stubs behind"
        assert not any(r.exists() for r in regions), "kill() leaves shared memory behind"

        dead = _client(server, 2.0)
        started = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017 - refused connection; type is the client's
            dead.is_server_ready()
        assert time.monotonic() - started < 2.0

        server.restart()
        print(f"restarted in {server.startup_s:.2f} s")
        assert server.http_port == port and server.pid != pid
        fresh = _client(server)
        assert fresh.is_server_ready()
        assert fresh.get_model_repository_index() == []
        assert not fresh.is_model_ready("simple")
        fresh.close()
        started = time.monotonic()
    assert not server.running
    print(f"graceful stop took {time.monotonic() - started:.2f} s")


def test_a_foreign_listener_on_the_port_is_not_ready() -> None:
    """``free_port`` then spawn is a race: when another process's server holds the HTTP port
    and answers 200, that is not our Triton being ready; ours fails to bind and start says so."""
    _skip_without_triton()
    server = TritonServer(startup_timeout_s=30.0)
    with foreign_ready_server() as port:
        server.http_port = port
        server.grpc_port, server.metrics_port = free_port(), free_port()
        try:
            with pytest.raises(TritonServerError, match="already in use"):
                server.start()
            assert not server.running
        finally:
            server.stop()
