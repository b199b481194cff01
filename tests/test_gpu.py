"""GPU placement without a GPU: CUDA is asked for, and a CPU session is never taken quietly.

ONNX Runtime never refuses a CUDA session; it falls back to the CPU. The CPU package does the
same when told CUDA is available and asked for it (it warns and makes a CPU session), which is
how these tests stand in for ``onnxruntime-gpu`` on a machine without a GPU: the factory takes
the list of available providers as a parameter. Sessions that *claim* CUDA (a wrapper around a
real CPU session) check the success path: options, devices, warm-up, run-time failures.

``test_gpu_wheel_*`` run the real ``onnxruntime-gpu`` package in a ``gateway serve`` process
when ``GATEWAY_GPU_WHEEL_PYTHON`` names a Python whose ``onnxruntime`` is that package (made by
``scripts/gpu_wheel_venv.sh``; CI does). Nothing here needs a GPU; ``scripts/gpu_check.sh`` is
the check for a machine that has one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

from gateway.backends.onnxruntime import (
    CPU,
    CUDA,
    CUDA_BUILDS,
    OnnxRuntimeFactory,
    cuda_options,
    plan_providers,
    preload_cuda_libraries,
)
from gateway.backends.triton import triton_config
from gateway.dataplane import DataPlane
from gateway.errors import InvalidInput, ModelLoadError, Unavailable
from gateway.repository.config import ModelConfig, TensorConfig, parse_json, parse_pbtxt
from gateway.repository.local import LocalRepository
from gateway.settings import Settings, SettingsError
from tests import models
from tests.helpers import GatewayProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
GPU_BUILD = [CUDA, CPU]  # what onnxruntime-gpu lists, GPU or not
# The CPU package warns when a session is asked for a provider it lacks: that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")


def group_config(name: str, group: str = "", dynamic: str = "dynamic_batching { }") -> str:
    return models.SIMPLE_CONFIG.replace('"simple"', f'"{name}"').replace(
        "dynamic_batching { }", f"{group}\n{dynamic}"
    )


def add_model(
    root: Path, name: str, group: str = "", dynamic: str = "dynamic_batching { }"
) -> None:
    models.add_sub(root, name, config=group_config(name, group, dynamic))


class Preload:
    """Stands in for ``onnxruntime.preload_dlls``: counts calls, says what was not found."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return "Failed to load libcublasLt.so.12: libcublasLt.so.12: cannot open shared object"


class ClaimsCuda:
    """A real CPU session that reports CUDA, recording what it was asked for."""

    made: list[ClaimsCuda]

    def __init__(self, path: str, options: Any, providers: Sequence[Any]) -> None:
        self.inner = ort.InferenceSession(path, options, providers=[CPU])
        self.providers = list(providers)
        self.fallback_disabled = False
        self.batch_sizes: list[int] = []
        self.fail_with: Exception | None = None
        type(self).made.append(self)

    def get_providers(self) -> list[str]:
        asked_cuda = isinstance(self.providers[0], tuple) and self.providers[0][0] == CUDA
        return [CUDA, CPU] if asked_cuda else [CPU]

    def disable_fallback(self) -> None:
        self.fallback_disabled = True

    def run(self, outputs: list[str], feeds: dict[str, Any]) -> Any:
        if self.fail_with is not None:
            raise self.fail_with
        self.batch_sizes.append(int(next(iter(feeds.values())).shape[0]))
        return self.inner.run(outputs, feeds)

    def __getattr__(self, name: str) -> Any:  # get_inputs, get_outputs
        return getattr(self.inner, name)


@pytest.fixture
def claims_cuda() -> Iterator[type[ClaimsCuda]]:
    kind = type("Made", (ClaimsCuda,), {"made": []})
    yield kind


def simple_inputs(rows: int) -> dict[str, np.ndarray[Any, Any]]:
    data = np.arange(rows * 16, dtype=np.int32).reshape(rows, 16)
    return {"INPUT0": data, "INPUT1": np.ones_like(data)}


# -- which provider is asked for ------------------------------------------------------------


def config_of(group: str) -> ModelConfig:
    return parse_pbtxt(group_config("m", group), "m/config.pbtxt", "m")


@pytest.mark.parametrize(
    ("mode", "group", "available", "devices", "need"),
    [
        ("cpu", "instance_group [ { kind: KIND_GPU } ]", GPU_BUILD, (), "none"),
        ("auto", "instance_group [ { kind: KIND_CPU count: 2 } ]", GPU_BUILD, (), "none"),
        ("auto", "", GPU_BUILD, (0,), "optional"),  # no group: KIND_AUTO, as in Triton
        ("auto", "instance_group [ { kind: KIND_AUTO } ]", [CPU], (), "optional"),
        ("auto", "instance_group [ { kind: KIND_GPU } ]", [CPU], (), "expected"),
        ("auto", "instance_group [ { kind: KIND_GPU count: 2 gpus: [ 1, 3 ] } ]", GPU_BUILD,
         (1, 1, 3, 3), "expected"),
        ("cuda", "instance_group [ { kind: KIND_CPU count: 2 } ]", GPU_BUILD, (5, 5), "required"),
    ],
)  # fmt: skip
def test_plan_providers(
    mode: str, group: str, available: list[str], devices: tuple[int, ...], need: str
) -> None:
    settings = Settings(execution_provider=mode, cuda_device_id=5 if mode == "cuda" else 0)
    plan = plan_providers(settings, config_of(group), available)
    assert (plan.device_ids, plan.need) == (devices, need)


def test_cuda_on_the_cpu_package_fails_with_the_pins() -> None:
    with pytest.raises(ModelLoadError) as info:
        plan_providers(Settings(execution_provider="cuda"), config_of(""), [CPU])
    message = info.value.message
    assert "model 'm'" in message and "no CUDA execution provider" in message
    for version, driver in CUDA_BUILDS.values():
        assert f"=={version}" in message and driver in message


def test_cuda_options_are_strings_from_the_settings() -> None:
    assert cuda_options(Settings(), 2) == {
        "device_id": "2",
        "arena_extend_strategy": "kNextPowerOfTwo",
        "cudnn_conv_algo_search": "HEURISTIC",
    }
    settings = Settings(
        cuda_mem_limit_bytes=2**30,
        cuda_arena_extend_strategy="same_as_requested",
        cudnn_conv_algo_search="exhaustive",
    )
    assert cuda_options(settings, 0) == {
        "device_id": "0",
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "gpu_mem_limit": str(2**30),
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"cuda_device_id": -1},
        {"cuda_mem_limit_bytes": -1},
        {"cuda_arena_extend_strategy": "grow"},
        {"cudnn_conv_algo_search": "fast"},
    ],
)
def test_cuda_settings_are_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(SettingsError):
        Settings(**bad)


def test_preload_says_nothing_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    """preload_dlls prints what it cannot load; that goes to the log, not the process's stdout."""
    note = preload_cuda_libraries()
    assert capsys.readouterr().out == ""
    assert isinstance(note, str)


# -- CUDA asked for, CPU given (ONNX Runtime's silent fallback) -------------------------------


async def test_cuda_setting_fails_the_load_when_sessions_land_on_the_cpu(tmp_path: Path) -> None:
    add_model(tmp_path, "m")
    preload = Preload()
    factory = OnnxRuntimeFactory(
        Settings(execution_provider="cuda", cuda_device_id=1, warmup=False),
        available_providers=lambda: GPU_BUILD,
        preload=preload,
    )
    with pytest.raises(ModelLoadError) as info:
        await factory.load(LocalRepository(tmp_path).source("m"), 1)
    message = info.value.message
    assert message.startswith("model 'm' version 1: execution_provider is \"cuda\" but")
    assert "CUDA device(s) [1]" in message and "fell back to the CPU" in message
    assert "not found: libcublasLt.so.12" in message and "NVIDIA_VISIBLE_DEVICES" in message
    assert preload.calls == 1


async def test_kind_gpu_on_the_cpu_is_an_error_log_and_a_metric(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``auto``: a KIND_GPU model still serves (on the CPU), loudly; a KIND_AUTO one on the CPU
    is a warning; a KIND_CPU one is what was asked for. The metrics say which is where."""
    add_model(tmp_path, "gpu", "instance_group [ { kind: KIND_GPU count: 2 } ]")
    add_model(tmp_path, "anywhere")
    add_model(tmp_path, "cpu", "instance_group [ { kind: KIND_CPU } ]")
    preload = Preload()
    factory = OnnxRuntimeFactory(
        Settings(warmup=False), available_providers=lambda: GPU_BUILD, preload=preload
    )
    dataplane = DataPlane(Settings(warmup=False), LocalRepository(tmp_path), factory)
    with caplog.at_level(logging.INFO, logger="gateway.backends.onnxruntime"):
        await dataplane.start()
    try:
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(errors) == 1 and "model 'gpu' version 1" in errors[0]
        assert "asks for KIND_GPU" in errors[0] and "fell back to the CPU" in errors[0]
        assert len(warnings) == 1 and "model 'anywhere' version 1 (KIND_AUTO)" in warnings[0]
        assert preload.calls == 1

        gpu = dataplane.model_metadata("gpu")["parameters"]
        assert gpu["providers"] == [CPU] and gpu["cpu_fallback"] is True
        assert gpu["instance_providers"] == {CPU: 2} and "cuda_device_ids" not in gpu
        text = dataplane.metrics.render().decode()
        assert (
            'gateway_model_execution_provider{model="gpu",provider="CPUExecutionProvider",'
            'version="1"} 2.0' in text
        )
        assert 'gateway_model_cpu_fallback{model="gpu",version="1"} 1.0' in text
        assert 'gateway_model_cpu_fallback{model="anywhere",version="1"} 0.0' in text
        assert 'gateway_model_cpu_fallback{model="cpu",version="1"} 0.0' in text
    finally:
        await dataplane.stop()


async def test_the_cpu_package_never_tries_cuda_and_says_so_for_kind_gpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_model(tmp_path, "gpu", "instance_group [ { kind: KIND_GPU } ]")
    add_model(tmp_path, "anywhere")
    preload = Preload()
    factory = OnnxRuntimeFactory(Settings(warmup=False), preload=preload)
    repo = LocalRepository(tmp_path)
    with caplog.at_level(logging.WARNING, logger="gateway.backends.onnxruntime"):
        gpu = await factory.load(repo.source("gpu"), 1)
        anywhere = await factory.load(repo.source("anywhere"), 1)
    try:
        assert preload.calls == 0, "no CUDA provider: nothing to preload"
        assert [r.levelno for r in caplog.records] == [logging.ERROR]
        assert "has no CUDA execution provider" in caplog.records[0].getMessage()
        assert gpu.describe()["cpu_fallback"] is True
        assert anywhere.describe()["cpu_fallback"] is False
    finally:
        await gpu.close()
        await anywhere.close()


# -- CUDA given ------------------------------------------------------------------------------


async def test_cuda_sessions_get_their_devices_options_and_no_fallback(
    tmp_path: Path, claims_cuda: type[ClaimsCuda]
) -> None:
    """``count`` sessions on each of the group's ``gpus`` (Triton's rule), each with the CUDA
    options and ORT's run-time fallback switched off; warm-up covers the preferred batch sizes
    too (cuDNN picks kernels per shape at the first run)."""
    add_model(
        tmp_path,
        "m",
        "instance_group [ { kind: KIND_GPU count: 2 gpus: [ 1, 3 ] } ]",
        "dynamic_batching { preferred_batch_size: [ 2, 4 ] }",
    )
    settings = Settings(cuda_mem_limit_bytes=2**28)
    factory = OnnxRuntimeFactory(
        settings, available_providers=lambda: GPU_BUILD, new_session=claims_cuda, preload=Preload()
    )
    backend = await factory.load(LocalRepository(tmp_path).source("m"), 1)
    try:
        made = claims_cuda.made
        assert backend.instance_count == 4 == len(made)
        assert [s.providers for s in made] == [
            [(CUDA, cuda_options(settings, device)), CPU] for device in (1, 1, 3, 3)
        ]
        assert all(s.fallback_disabled for s in made)
        facts = backend.describe()
        assert facts["providers"] == [CUDA, CPU] and facts["cpu_fallback"] is False
        assert facts["instance_providers"] == {CUDA: 4} and facts["cuda_device_ids"] == [1, 3]
        warmed = sorted({size for s in made for size in s.batch_sizes})
        assert warmed == [1, 2, 4, 8]
        result = await backend.execute(simple_inputs(3), ["OUTPUT0"])
        assert result.outputs["OUTPUT0"].shape == (3, 16)
    finally:
        await backend.close()


async def test_a_failing_gpu_answers_503_and_bad_input_stays_400(
    tmp_path: Path, claims_cuda: type[ClaimsCuda], caplog: pytest.LogCaptureFixture
) -> None:
    add_model(tmp_path, "m")
    factory = OnnxRuntimeFactory(
        Settings(execution_provider="cuda", warmup=False),
        available_providers=lambda: GPU_BUILD,
        new_session=claims_cuda,
        preload=Preload(),
    )
    backend = await factory.load(LocalRepository(tmp_path).source("m"), 1)
    (session,) = claims_cuda.made
    try:
        with pytest.raises(InvalidInput):  # ORT's own complaint about the input: 400
            wrong = np.zeros((1, 3), np.int32)
            await backend.execute({"INPUT0": wrong, "INPUT1": wrong}, ["OUTPUT0"])
        for failure in (
            EPFail("CUDA execution provider failed"),
            RuntimeError("CUDA failure 700: an illegal memory access was encountered ; GPU=0"),
        ):
            session.fail_with = failure
            with caplog.at_level(logging.ERROR, logger="gateway.backends.onnxruntime"):
                with pytest.raises(Unavailable) as info:
                    await backend.execute(simple_inputs(1), ["OUTPUT0"])
            assert "model 'm': the execution provider failed" in info.value.message
        logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(logged) == 1 and "(1 so far)" in logged[0], "the 1st, then every 1000th"
    finally:
        await backend.close()


# -- Triton hosts ----------------------------------------------------------------------------


def pushed_group(group: str, device: str, backend: str = "onnxruntime") -> dict[str, Any]:
    config = config_of(group)
    groups = triton_config(config, [1], device, backend)["instance_group"]
    assert len(groups) == 1
    result: dict[str, Any] = groups[0]
    return result


@pytest.mark.parametrize(
    ("group", "gpu_host", "cpu_host"),
    [
        ("", {"count": 1, "kind": "KIND_GPU"}, {"count": 1, "kind": "KIND_CPU"}),
        (
            "instance_group [ { kind: KIND_AUTO count: 2 } ]",
            {"count": 2, "kind": "KIND_GPU"},
            {"count": 2, "kind": "KIND_CPU"},
        ),
        (
            "instance_group [ { kind: KIND_GPU gpus: [ 1 ] } ]",
            {"count": 1, "kind": "KIND_GPU", "gpus": [1]},
            {"count": 1, "kind": "KIND_CPU"},
        ),
        (
            "instance_group [ { kind: KIND_AUTO gpus: [ 0, 1 ] } ]",
            {"count": 1, "kind": "KIND_GPU", "gpus": [0, 1]},
            {"count": 1, "kind": "KIND_CPU"},
        ),
        (
            "instance_group [ { kind: KIND_CPU count: 3 } ]",
            {"count": 3, "kind": "KIND_CPU"},
            {"count": 3, "kind": "KIND_CPU"},
        ),
    ],
)
def test_triton_gets_gpu_instances_on_a_gpu_host(
    group: str, gpu_host: dict[str, Any], cpu_host: dict[str, Any]
) -> None:
    assert pushed_group(group, "gpu") == gpu_host
    assert pushed_group(group, "cpu") == cpu_host


def test_the_python_strategy_gets_cpu_instances_and_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The python-backend model runs ORT's CPU provider: GPU instances would only pretend."""
    with caplog.at_level(logging.WARNING, logger="gateway.backends.triton"):
        group = pushed_group("instance_group [ { kind: KIND_GPU gpus: [ 1 ] } ]", "gpu", "python")
    assert group == {"count": 1, "kind": "KIND_CPU"}
    assert "runs ONNX Runtime on that host's CPU" in caplog.text


@pytest.mark.parametrize(
    ("group", "complaint"),
    [
        ("instance_group [ { kind: KIND_CPU gpus: [ 0 ] } ]", "'kind' is KIND_CPU"),
        ("instance_group [ { kind: KIND_GPU gpus: [ 0, 0 ] } ]", "distinct"),
        ("instance_group [ { kind: KIND_GPU gpus: [ -1 ] } ]", "distinct ids"),
        ("instance_group [ { kind: KIND_MODEL } ]", "KIND_MODEL is not supported"),
    ],
)
def test_bad_gpu_groups_are_refused(group: str, complaint: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        config_of(group)
    assert info.value.message.startswith("m/config.pbtxt: ") and complaint in info.value.message


def test_gpus_survive_the_json_round_trip() -> None:
    """Configs travel as Triton JSON (GET .../config, pushes to other gateways)."""
    config = config_of("instance_group [ { kind: KIND_GPU count: 2 gpus: [ 2, 0 ] } ]")
    assert (config.instance_kind, config.instance_gpus, config.instance_count) == (
        "KIND_GPU",
        (2, 0),
        2,
    )
    again = parse_json(json.dumps(config.to_dict()), "m", "m")
    assert again == config
    plain = ModelConfig("p", inputs=(TensorConfig("X", "FP32", (1,)),))
    assert plain.to_dict()["instance_group"] == [{"count": 1, "kind": "KIND_AUTO"}]


# -- the real onnxruntime-gpu package (GATEWAY_GPU_WHEEL_PYTHON) ------------------------------

GPU_PYTHON = os.environ.get("GATEWAY_GPU_WHEEL_PYTHON", "")
needs_gpu_wheel = pytest.mark.skipif(
    not GPU_PYTHON,
    reason="GATEWAY_GPU_WHEEL_PYTHON is not set (scripts/gpu_wheel_venv.sh makes that Python)",
)
# The child runs the gpu-wheel Python with this test's packages behind its own, so that its
# onnxruntime is onnxruntime-gpu and everything else (the gateway too) is this environment's.
BOOTSTRAP = (
    "import runpy, site, sys; site.addsitedir(sys.argv.pop(1)); "
    "runpy.run_module('gateway.cli', run_name='__main__', alter_sys=True)"
)


def start_gpu_wheel_gateway(repo: Path, tmp: Path, **settings: str) -> GatewayProcess:
    """``gateway serve`` under the gpu-wheel Python; ``settings`` as GATEWAY_* variables. The
    listener opens once every model has loaded or failed to."""
    port = free_port()
    log_path = tmp / f"gateway-gpu-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("GATEWAY_CONFIG", None)
    env.update({f"GATEWAY_{key.upper()}": value for key, value in settings.items()})
    site_packages = sysconfig.get_paths()["purelib"]
    command = [GPU_PYTHON, "-c", BOOTSTRAP, site_packages, "serve", "--model-repo", str(repo)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
    gateway = GatewayProcess(process, port, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{gateway.log()}")
        if get(f"{gateway.url}/v2/health/live")[0] == 200:
            return gateway
        time.sleep(0.1)
    gateway.stop(signal.SIGKILL)
    raise RuntimeError(f"gateway not live in 60 s:\n{gateway.log()}")


def get(url: str, data: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


@needs_gpu_wheel
def test_gpu_wheel_is_the_package_under_test() -> None:
    """The child's onnxruntime is the GPU build, not this environment's CPU one behind it."""
    probe = (
        "import site, sys; site.addsitedir(sys.argv[1]); import onnxruntime as o; "
        "from onnxruntime.capi import build_and_package_info as i; "
        "print(i.package_name, o.get_available_providers(), sys.version_info[:2])"
    )
    site_packages = sysconfig.get_paths()["purelib"]
    out = subprocess.run(
        [GPU_PYTHON, "-c", probe, site_packages],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.startswith("onnxruntime-gpu ") and CUDA in out.stdout, out.stdout
    # This environment's compiled packages are borrowed: the same Python version only.
    assert out.stdout.rstrip().endswith(str(sys.version_info[:2])), out.stdout


@needs_gpu_wheel
def test_gpu_wheel_cuda_without_a_gpu_fails_the_load_and_readiness(tmp_path: Path) -> None:
    """The issue's case: onnxruntime-gpu, ``execution_provider = "cuda"``, no usable GPU. The
    model must not load (it did, on the CPU, with readiness 200)."""
    add_model(tmp_path / "repo", "m")
    gateway = start_gpu_wheel_gateway(
        tmp_path / "repo", tmp_path, execution_provider="cuda", strict_readiness="true"
    )
    try:
        assert get(f"{gateway.url}/v2/health/ready")[0] == 503
        assert get(f"{gateway.url}/v2/models/m/ready")[0] != 200
        status, body = get(f"{gateway.url}/v2/repository/index", b"{}")
        assert status == 200, body
        (entry,) = [e for e in json.loads(body) if e["name"] == "m"]
        reason = entry["reason"]
        assert entry["state"] == "UNAVAILABLE", entry
        assert 'execution_provider is "cuda"' in reason and "fell back to the CPU" in reason
        assert re.search(r"onnxruntime-gpu \d+\.\d+\.\d+ \(CUDA \d+", reason), reason
    finally:
        gateway.stop()


@needs_gpu_wheel
def test_gpu_wheel_auto_serves_kind_gpu_on_the_cpu_loudly(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    add_model(repo, "gpu", "instance_group [ { kind: KIND_GPU } ]")
    add_model(repo, "anywhere")
    gateway = start_gpu_wheel_gateway(repo, tmp_path)
    try:
        assert get(f"{gateway.url}/v2/health/ready")[0] == 200
        status, body = get(f"{gateway.url}/v2/models/gpu")
        assert status == 200 and json.loads(body)["parameters"]["providers"] == [CPU]
        metrics = get(f"{gateway.url}/metrics")[1]
        assert 'gateway_model_cpu_fallback{model="gpu",version="1"} 1.0' in metrics
        assert 'gateway_model_cpu_fallback{model="anywhere",version="1"} 0.0' in metrics
        assert (
            'gateway_model_execution_provider{model="gpu",provider="CPUExecutionProvider",'
            'version="1"} 1.0' in metrics
        )
        lines = [json.loads(line) for line in gateway.log().splitlines() if line[:1] == "{"]
        errors = [line["msg"] for line in lines if line.get("level") == "error"]
        assert any("model 'gpu' version 1" in msg and "KIND_GPU" in msg for msg in errors), errors
    finally:
        gateway.stop()
