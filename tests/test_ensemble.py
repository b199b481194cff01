"""Ensembles (``platform: "ensemble"``): the config's checks; a DAG run step by step through
``DataPlane.submit`` with real ONNX Runtime sessions (parallel steps, batching with the step
model's other traffic, errors naming the step, deadline, cancel, statistics); the shipped
``mlp_pipeline`` through a real gateway against its steps called by hand; and parity with a real
``tritonserver`` serving the same ensemble."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from google.protobuf import json_format, text_format
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2 as mc

from gateway.backends.onnxruntime import OnnxRuntimeFactory
from gateway.backends.triton_python_model import python_backend_config, python_backend_files
from gateway.dataplane import DataPlane
from gateway.ensemble import EnsembleBackend, StepFailed, _step_error
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    ModelLoadError,
    ModelNotFound,
    QueueFull,
    Unavailable,
)
from gateway.pending import Pending
from gateway.protocol.types import InferRequest
from gateway.repository.config import load_config, parse_pbtxt
from gateway.repository.local import LocalRepository
from gateway.settings import Settings
from gateway.testing.tritonserver import TritonServer, tritonserver_unavailable_reason
from tests import models
from tests.helpers import ROOT, get, start_gateway

F32 = TensorProto.FLOAT


def _unary(repo: Path, name: str, op: str, constant: float, delay_us: int = 0) -> None:
    """X FP32 [-1,4] -> Y = X (op) constant."""
    graph = helper.make_graph(
        [helper.make_node(op, ["X", "c"], ["Y"])],
        name,
        [helper.make_tensor_value_info("X", F32, ["batch", 4])],
        [helper.make_tensor_value_info("Y", F32, ["batch", 4])],
        [numpy_helper.from_array(np.full(4, constant, dtype=np.float32), "c")],
    )
    config = (
        f'name: "{name}"\nmax_batch_size: 8\n'
        'input { name: "X" data_type: TYPE_FP32 dims: [ 4 ] }\n'
        'output { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] }\n'
        f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
    )
    models._save(helper.make_model(graph, opset_imports=models.OPSET), repo, name, 1, config)


def _adder(repo: Path, name: str = "add2") -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["A", "B"], ["SUM"])],
        name,
        [helper.make_tensor_value_info(n, F32, ["batch", 4]) for n in ("A", "B")],
        [helper.make_tensor_value_info("SUM", F32, ["batch", 4])],
    )
    config = (
        f'name: "{name}"\nmax_batch_size: 8\n'
        'input [ { name: "A" data_type: TYPE_FP32 dims: [ 4 ] },'
        ' { name: "B" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output { name: "SUM" data_type: TYPE_FP32 dims: [ 4 ] }\ndynamic_batching { }\n'
    )
    models._save(helper.make_model(graph, opset_imports=models.OPSET), repo, name, 1, config)


def _broken(repo: Path) -> None:
    """Loads, fails every run (a reshape its data cannot take)."""
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["X", "odd"], ["odd_rows"]),
            helper.make_node("Reshape", ["odd_rows", "back"], ["Y"]),
        ],
        "broken",
        [helper.make_tensor_value_info("X", F32, ["batch", 4])],
        [helper.make_tensor_value_info("Y", F32, ["batch", 4])],
        [
            numpy_helper.from_array(np.array([-1, 3], dtype=np.int64), "odd"),
            numpy_helper.from_array(np.array([-1, 4], dtype=np.int64), "back"),
        ],
    )
    config = (
        'name: "broken"\nmax_batch_size: 8\n'
        'input { name: "X" data_type: TYPE_FP32 dims: [ 4 ] }\n'
        'output { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] }\n'
    )
    models._save(helper.make_model(graph, opset_imports=models.OPSET), repo, "broken", 1, config)


def _ensemble(name: str, steps: list[tuple[str, dict[str, str], dict[str, str]]]) -> str:
    text = (
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: 8\n'
        'input { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] }\n'
        'output { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] }\nensemble_scheduling {\n'
    )
    for model, inputs, outputs in steps:
        text += f'  step {{ model_name: "{model}" model_version: -1\n'
        for key, value in inputs.items():
            text += f'    input_map {{ key: "{key}" value: "{value}" }}\n'
        for key, value in outputs.items():
            text += f'    output_map {{ key: "{key}" value: "{value}" }}\n'
        text += "  }\n"
    return text + "}\n"


DIAMOND = _ensemble(
    "diamond",
    [
        ("double", {"X": "IN"}, {"Y": "d"}),
        ("inc", {"X": "IN"}, {"Y": "i"}),
        ("add2", {"A": "d", "B": "i"}, {"SUM": "OUT"}),
    ],
)


def _write_ensemble(repo: Path, name: str, text: str) -> None:
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(text)


@pytest.fixture(scope="module")
def dag_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dag_repo")
    _unary(root, "double", "Mul", 2.0)
    _unary(root, "inc", "Add", 1.0)
    _unary(root, "slow", "Add", 0.0, delay_us=300_000)  # waits for company in its batcher
    _adder(root)
    _broken(root)
    _write_ensemble(root, "diamond", DIAMOND)
    _write_ensemble(root, "via_slow", _ensemble("via_slow", [("slow", {"X": "IN"}, {"Y": "OUT"})]))
    _write_ensemble(
        root,
        "fails",
        _ensemble(
            "fails", [("inc", {"X": "IN"}, {"Y": "a"}), ("broken", {"X": "a"}, {"Y": "OUT"})]
        ),
    )
    _write_ensemble(root, "orphan", _ensemble("orphan", [("missing", {"X": "IN"}, {"Y": "OUT"})]))
    cached = DIAMOND.replace('"diamond"', '"cached_diamond"') + "response_cache { enable: true }\n"
    _write_ensemble(root, "cached_diamond", cached)
    for name, other in (("loop_a", "loop_b"), ("loop_b", "loop_a")):  # name each other
        _write_ensemble(root, name, _ensemble(name, [(other, {"IN": "IN"}, {"OUT": "OUT"})]))
    return root


async def _dataplane(repo: Path) -> DataPlane:
    # Triton's fixed batching delay: ``slow``'s lone requests wait in its batch window (the
    # adaptive delay sends a request at once when no traffic was seen).
    settings = Settings(model_repo=str(repo), warmup=False, batching_delay="triton")
    dataplane = DataPlane(settings, LocalRepository(repo), OnnxRuntimeFactory(settings))
    await dataplane.start()
    return dataplane


def _x(rows: int = 2) -> np.ndarray:
    return np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)


# -- the config --------------------------------------------------------------------------------


def test_ensemble_config_is_checked_as_triton_does() -> None:
    config = parse_pbtxt(DIAMOND, "diamond/config.pbtxt", "diamond")
    assert config.is_ensemble and [s.model_name for s in config.ensemble_steps] == [
        "double", "inc", "add2",
    ]  # fmt: skip
    as_json = config.to_dict()
    assert as_json["platform"] == "ensemble" and len(as_json["ensemble_scheduling"]["step"]) == 3
    bad = {
        "cycle": [("a", {"X": "IN"}, {"Y": "OUT"}), ("b", {"X": "p"}, {"Y": "q"}),
                  ("c", {"X": "q"}, {"Y": "p"})],
        "more than one": [("a", {"X": "IN"}, {"Y": "OUT"}), ("b", {"X": "IN"}, {"Y": "OUT"})],
        "not made by any step": [("a", {"X": "IN"}, {"Y": "t"})],
        "neither an ensemble input": [("a", {"X": "nowhere"}, {"Y": "OUT"}),
                                      ("b", {"X": "IN"}, {"Y": "u"})],
    }  # fmt: skip
    for message, steps in bad.items():
        with pytest.raises(ModelLoadError, match=message):
            parse_pbtxt(_ensemble("e", steps), "e/config.pbtxt", "e")
    unused = _ensemble("e", [("a", {"X": "IN"}, {"Y": "OUT"})]).replace(
        "output {", 'input { name: "EXTRA" data_type: TYPE_FP32 dims: [ 4 ] }\noutput {'
    )
    with pytest.raises(ModelLoadError, match="'EXTRA' is not used"):
        parse_pbtxt(unused, "e/config.pbtxt", "e")
    with pytest.raises(ModelLoadError, match="backend"):
        parse_pbtxt(
            DIAMOND.replace("max_batch_size", 'backend: "python"\nmax_batch_size'), "d", "diamond"
        )
    with pytest.raises(ModelLoadError, match="ensemble_scheduling"):
        parse_pbtxt(DIAMOND.replace('platform: "ensemble"\n', ""), "d", "diamond")
    shipped = load_config(ROOT / "model_repo" / "mlp_pipeline")
    assert [s.model_name for s in shipped.ensemble_steps] == ["preprocess", "mlp"]


# -- running it ---------------------------------------------------------------------------------


async def test_steps_run_as_soon_as_their_inputs_exist(dag_repo: Path) -> None:
    dataplane = await _dataplane(dag_repo)
    calls: list[tuple[str, list[bool]]] = []
    submit = dataplane.submit
    seen: list[Pending] = []

    def spy(name: str, *args: Any, **kwargs: Any) -> Pending:
        calls.append((name, [p.done() for p in seen]))
        pending = submit(name, *args, **kwargs)
        seen.append(pending)
        return pending

    dataplane.submit = spy  # type: ignore[method-assign]
    try:
        x = _x()
        response = await dataplane.submit("diamond", None, InferRequest({"IN": x}))
        assert response.model_name == "diamond" and response.model_version == "1"
        assert list(response.outputs) == ["OUT"]  # intermediates are not answered
        np.testing.assert_array_equal(response.outputs["OUT"], 3 * x + 1)
        names = [name for name, _ in calls]
        assert names == ["diamond", "double", "inc", "add2"]
        assert calls[2][1] == [False, False]  # inc started while double was still running
        assert all(calls[3][1][1:])  # add2 only once both had ended
        stats = {s["name"]: s for s in dataplane.model_stats()["model_stats"]}
        assert stats["diamond"]["inference_stats"]["success"]["count"] == 1
        assert stats["diamond"]["inference_count"] == 2  # rows, as Triton counts them
        assert stats["diamond"]["execution_count"] == 1
        for step in ("double", "inc", "add2"):
            assert stats[step]["inference_stats"]["success"]["count"] == 1
        text = dataplane.metrics.render().decode()
        assert 'nv_inference_request_success_total{model="diamond",version="1"} 1.0' in text
    finally:
        await dataplane.stop()


async def test_a_step_is_batched_with_its_models_other_traffic(dag_repo: Path) -> None:
    dataplane = await _dataplane(dag_repo)
    try:
        x = _x(1)
        through_ensemble = dataplane.submit("via_slow", None, InferRequest({"IN": x}))
        direct = dataplane.submit("slow", None, InferRequest({"X": x + 10}))
        first, second = await asyncio.gather(through_ensemble, direct)
        np.testing.assert_array_equal(first.outputs["OUT"], x)
        np.testing.assert_array_equal(second.outputs["Y"], x + 10)
        slow = dataplane.model_stats("slow")["model_stats"][0]
        assert slow["execution_count"] == 1 and slow["inference_count"] == 2  # one batch
    finally:
        await dataplane.stop()


async def test_errors_name_the_failing_step(dag_repo: Path) -> None:
    dataplane = await _dataplane(dag_repo)
    try:
        with pytest.raises(Exception, match=r"ensemble 'fails' step 1 \('broken'\) failed"):
            await dataplane.submit("fails", None, InferRequest({"IN": _x()}))
        with pytest.raises(Unavailable, match=r"step 0 \('missing'\).*unknown model"):
            await dataplane.submit("orphan", None, InferRequest({"IN": _x()}))
        with pytest.raises(Exception, match="unexpected inference input"):
            await dataplane.submit("diamond", None, InferRequest({"NOPE": _x()}))
        with pytest.raises(Exception, match="nested in more than 8 ensembles"):
            await dataplane.submit("loop_a", None, InferRequest({"IN": _x()}))
        assert dataplane.model_ready("diamond") and dataplane.model_ready("fails")
        for unservable in ("orphan", "loop_a"):  # a step missing; a cycle
            assert not dataplane.model_ready(unservable)
        stats = dataplane.model_stats("fails")["model_stats"][0]["inference_stats"]
        assert stats["fail"]["count"] == 1 and stats["success"]["count"] == 0
        # the deadline covers every step: a step that waits past it ends the ensemble with 504
        timed = InferRequest({"IN": _x(1)}, parameters={"timeout": 50_000})
        with pytest.raises(DeadlineExceeded):
            await dataplane.submit("via_slow", None, timed)
    finally:
        await dataplane.stop()


async def test_cancelling_the_ensemble_cancels_its_steps(dag_repo: Path) -> None:
    dataplane = await _dataplane(dag_repo)
    steps: list[Pending] = []
    submit = dataplane.submit

    def spy(name: str, *args: Any, **kwargs: Any) -> Pending:
        pending = submit(name, *args, **kwargs)
        if name == "slow":
            steps.append(pending)
        return pending

    dataplane.submit = spy  # type: ignore[method-assign]
    try:
        pending = dataplane.submit("via_slow", None, InferRequest({"IN": _x(1)}))
        for _ in range(100):
            if steps:
                break
            await asyncio.sleep(0.005)
        assert steps and not steps[0].done()
        pending.cancel()
        await asyncio.sleep(0.05)
        assert pending.cancelled() and steps[0].cancelled()
    finally:
        await dataplane.stop()


async def test_an_ensemble_answer_is_cached_when_its_config_says_so(dag_repo: Path) -> None:
    settings = Settings(model_repo=str(dag_repo), warmup=False, response_cache_bytes=1 << 20)
    dataplane = DataPlane(settings, LocalRepository(dag_repo), OnnxRuntimeFactory(settings))
    await dataplane.start()
    try:
        x = _x()
        first = await dataplane.submit("cached_diamond", None, InferRequest({"IN": x}))
        hit = dataplane.submit("cached_diamond", None, InferRequest({"IN": x}))
        assert hit.done()  # answered from the cache: no step ran
        np.testing.assert_array_equal(hit.result().outputs["OUT"], first.outputs["OUT"])
        steps = dataplane.model_stats("add2")["model_stats"][0]["inference_stats"]
        assert steps["success"]["count"] == 1
    finally:
        await dataplane.stop()


# -- the shipped mlp_pipeline, through a real gateway; and against Triton ------------------------


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipeline_repo")
    for name in ("preprocess", "mlp", "mlp_pipeline"):
        shutil.copytree(ROOT / "model_repo" / name, root / name)
    return root


def _raw(rows: int = 3) -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 255, (rows, 1024)).astype(np.float32)


def _infer(client: Any, model: str, name: str, array: np.ndarray, output: str) -> np.ndarray:
    tensor = httpclient.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=True)
    result = client.infer(model, [tensor], outputs=[httpclient.InferRequestedOutput(output)])
    answer: np.ndarray = result.as_numpy(output)
    return answer


def test_shipped_pipeline_equals_its_steps_called_by_hand(
    pipeline_repo: Path, tmp_path: Path
) -> None:
    gw = start_gateway(pipeline_repo, tmp_path)
    try:
        client = httpclient.InferenceServerClient(gw.address)
        raw = _raw()
        by_hand = _infer(
            client, "mlp", "INPUT", _infer(client, "preprocess", "RAW", raw, "NORMALIZED"), "PROBS"
        )
        ensemble = _infer(client, "mlp_pipeline", "RAW", raw, "PROBS")
        np.testing.assert_array_equal(ensemble, by_hand)
        status, body = get(f"{gw.url}/v2/models/mlp_pipeline")
        assert status == 200 and json.loads(body)["platform"] == "ensemble"
        stats = json.loads(get(f"{gw.url}/v2/models/mlp_pipeline/stats")[1])
        assert stats["model_stats"][0]["inference_stats"]["success"]["count"] == 1
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def triton() -> Iterator[TritonServer]:
    reason = tritonserver_unavailable_reason()
    if reason is not None:
        pytest.skip(f"tritonserver unavailable: {reason}")
    with TritonServer() as server:
        yield server


def _triton_model(directory: Path, config: dict[str, Any], files: dict[str, bytes]) -> None:
    for key, data in files.items():
        path = directory / key.removeprefix("file:")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    message = json_format.ParseDict(config, mc.ModelConfig())
    (directory / "config.pbtxt").write_text(text_format.MessageToString(message))


@pytest.mark.triton
def test_same_outputs_as_triton_serving_the_same_ensemble(
    triton: TritonServer, pipeline_repo: Path, tmp_path: Path
) -> None:
    """Triton (its own ensemble scheduler; ONNX steps through its python backend, as this
    build has no ORT backend) and the gateway serve ``mlp_pipeline``: the same answers."""
    tc = httpclient.InferenceServerClient(triton.http_address)
    # Written into its repository (a model pushed with the load API is not found when an
    # ensemble's steps are looked up); loading the ensemble loads its steps.
    for step in ("preprocess", "mlp"):
        config = load_config(pipeline_repo / step).to_dict()
        onnx_bytes = (pipeline_repo / step / "1" / "model.onnx").read_bytes()
        _triton_model(
            triton.repo_dir / step,
            python_backend_config(config),
            python_backend_files(onnx_bytes, 1),
        )
    ensemble = load_config(pipeline_repo / "mlp_pipeline").to_dict()
    _triton_model(triton.repo_dir / "mlp_pipeline", ensemble, {"file:1/README": b"ensemble\n"})
    tc.load_model("mlp_pipeline")
    assert tc.is_model_ready("mlp_pipeline")
    gw = start_gateway(pipeline_repo, tmp_path)
    try:
        gc = httpclient.InferenceServerClient(gw.address)
        for rows in (1, 5):
            raw = _raw(rows)
            from_triton = _infer(tc, "mlp_pipeline", "RAW", raw, "PROBS")
            from_gateway = _infer(gc, "mlp_pipeline", "RAW", raw, "PROBS")
            assert from_gateway.shape == from_triton.shape == (rows, 10)
            np.testing.assert_allclose(from_gateway, from_triton, rtol=1e-5, atol=1e-7)
        triton_stats = tc.get_inference_statistics("mlp_pipeline")["model_stats"][0]
        gateway_stats = json.loads(get(f"{gw.url}/v2/models/mlp_pipeline/stats")[1])["model_stats"][
            0
        ]
        for stats in (triton_stats, gateway_stats):  # counted alike: requests, rows, executions
            assert int(stats["inference_stats"]["success"]["count"]) == 2
            assert int(stats["inference_count"]) == 6 and int(stats["execution_count"]) == 2
            assert [int(b["batch_size"]) for b in stats["batch_stats"]] == [1, 5]
    finally:
        gw.stop()


@pytest.mark.triton
def test_steps_are_routed_to_the_host_that_serves_them(
    triton: TritonServer, pipeline_repo: Path, tmp_path: Path
) -> None:
    """A Triton-only deployment: the gateway pushes ``preprocess`` and ``mlp`` to Triton and
    runs ``mlp_pipeline`` itself, each step routed there like any request to that model."""
    config = tmp_path / "gateway.toml"
    config.write_text(f'[[hosts]]\nkind = "triton"\nname = "t1"\nurl = "{triton.http_url}"\n')
    gw = start_gateway(pipeline_repo, tmp_path, "--config", str(config))
    local = start_gateway(pipeline_repo, tmp_path)
    try:
        tc = httpclient.InferenceServerClient(triton.http_address)

        def step_count() -> int:
            stats = tc.get_inference_statistics("preprocess")["model_stats"]
            return sum(int(s["inference_stats"]["success"]["count"]) for s in stats)

        before = step_count()
        raw = _raw(4)
        routed = _infer(
            httpclient.InferenceServerClient(gw.address), "mlp_pipeline", "RAW", raw, "PROBS"
        )
        in_process = _infer(
            httpclient.InferenceServerClient(local.address), "mlp_pipeline", "RAW", raw, "PROBS"
        )
        np.testing.assert_allclose(routed, in_process, rtol=1e-5, atol=1e-7)
        assert step_count() == before + 1  # the step ran on Triton
    finally:
        gw.stop()
        local.stop()


def test_an_edge_fetches_the_ensemble_and_then_its_steps_on_first_use(
    pipeline_repo: Path, tmp_path: Path
) -> None:
    """An edge replica (models pulled from a ``file://`` origin on first use): the first
    request loads ``mlp_pipeline``, and its steps' own requests load ``preprocess`` and ``mlp``."""
    from gateway.repository.manifest import write_manifests

    origin = tmp_path / "origin"
    shutil.copytree(pipeline_repo, origin)
    write_manifests(origin)
    gw = start_gateway(f"file://{origin}", tmp_path, "--cache-dir", str(tmp_path / "cache"))
    try:
        client = httpclient.InferenceServerClient(gw.address)
        before = {m["name"]: m["state"] for m in client.get_model_repository_index()}
        assert "READY" not in before.values()  # nothing loaded until asked for
        raw = _raw(2)
        assert _infer(client, "mlp_pipeline", "RAW", raw, "PROBS").shape == (2, 10)
        index = {m["name"]: m["state"] for m in client.get_model_repository_index()}
        assert index == {"mlp_pipeline": "READY", "preprocess": "READY", "mlp": "READY"}
    finally:
        gw.stop()


# -- pins found by mutation testing (scripts/mutation.sh ensemble) ----------------------------


def test_the_ensemble_backend_runs_nothing_itself() -> None:
    config = parse_pbtxt(DIAMOND, "diamond/config.pbtxt", "diamond")
    backend = EnsembleBackend(config)
    assert backend.config is config and backend.instance_count == 1
    assert backend.describe() == {"ensemble_steps": ["double", "inc", "add2"]}
    with pytest.raises(GatewayError) as caught:
        asyncio.run(backend.execute({}, ["OUT"]))
    assert str(caught.value) == "ensemble 'diamond' runs its steps, not a batch"
    assert asyncio.run(backend.close()) is None


def test_a_steps_error_keeps_its_class_and_names_the_step() -> None:
    step = parse_pbtxt(DIAMOND, "diamond/config.pbtxt", "diamond").ensemble_steps[2]
    full = QueueFull("Exceeds maximum queue size", retry_after_s=3.0)
    error = _step_error(2, step, "diamond", full)
    message = "ensemble 'diamond' step 2 ('add2') failed: Exceeds maximum queue size"
    assert type(error) is QueueFull and error is not full  # the step's own error is left alone
    assert str(error) == message and error.message == message and error.args == (message,)
    assert error.retry_after_s == 3.0 and full.message == "Exceeds maximum queue size"
    gone = _step_error(0, step, "diamond", ModelNotFound("unknown model: 'add2'"))
    assert type(gone) is Unavailable  # a step model that is not there: not the caller's fault
    assert str(gone) == "ensemble 'diamond' step 0 ('add2') failed: unknown model: 'add2'"
    bug = _step_error(1, step, "diamond", ValueError("odd"))
    assert type(bug) is StepFailed
    assert str(bug) == "ensemble 'diamond' step 1 ('add2') failed: ValueError: odd"


async def test_steps_get_the_time_left_and_their_version(dag_repo: Path, tmp_path: Path) -> None:
    """Each step's request carries the ensemble's time left as its own timeout (none without a
    deadline), and asks for the step's version (the newest for -1)."""
    repo = tmp_path / "repo"
    shutil.copytree(dag_repo, repo, ignore=shutil.ignore_patterns("loop_*", "orphan"))
    pinned = DIAMOND.replace('"diamond"', '"pinned"').replace(
        'model_name: "inc" model_version: -1', 'model_name: "inc" model_version: 1'
    )
    _write_ensemble(repo, "pinned", pinned)
    dataplane = await _dataplane(repo)
    calls: list[tuple[str, str | None, dict[str, Any]]] = []
    submit = dataplane.submit

    ids: list[object] = []

    def spy(name: str, version: str | None, request: InferRequest, *args: Any) -> Pending:
        calls.append((name, version, dict(request.parameters)))
        ids.append(args[0] if args else None)
        return submit(name, version, request, *args)

    dataplane.submit = spy  # type: ignore[method-assign]
    try:
        x = _x()
        response = await dataplane.submit("pinned", None, InferRequest({"IN": x}))
        np.testing.assert_array_equal(response.outputs["OUT"], 3 * x + 1)
        assert [(n, v, p) for n, v, p in calls[1:]] == [
            ("double", None, {}), ("inc", "1", {}), ("add2", None, {}),
        ]  # fmt: skip
        calls.clear()
        timed = InferRequest({"IN": x}, parameters={"timeout": 5_000_000})  # 5 s
        ids.clear()
        await dataplane.submit("pinned", None, timed, "request-7")
        assert ids == ["request-7"] * 4  # every step carries the ensemble's request id
        for name, _, parameters in calls[1:]:
            assert 0 < parameters["timeout"] <= 5_000_000, (name, parameters)
            assert parameters["timeout"] > 4_000_000  # the time left, not a default
    finally:
        await dataplane.stop()


async def test_an_ensemble_counts_as_one_request_with_its_reasons(dag_repo: Path) -> None:
    dataplane = await _dataplane(dag_repo)
    try:
        await dataplane.submit("diamond", None, InferRequest({"IN": _x(3)}))
        stats = dataplane.model_stats("diamond")["model_stats"][0]
        inference = stats["inference_stats"]
        assert inference["queue"]["count"] == 1 and inference["compute_infer"]["count"] == 1
        for kind in ("success", "queue", "compute_infer"):  # durations, not clock readings
            assert 0 < inference[kind]["ns"] < 10**10, (kind, inference[kind])
        assert stats["inference_count"] == 3 and stats["execution_count"] == 1
        with pytest.raises(Exception, match="nested"):
            await dataplane.submit("loop_a", None, InferRequest({"IN": _x()}))
        timed = InferRequest({"IN": _x(1)}, parameters={"timeout": 50_000})
        with pytest.raises(DeadlineExceeded):
            await dataplane.submit("via_slow", None, timed)
        text = dataplane.metrics.render().decode()
        failures = {
            line for line in text.splitlines() if line.startswith("nv_inference_request_failure")
        }
        # Each nesting level is a request of its own (loop_a at levels 1, 3, 5, 7 and 9, refused
        # at 9); a deadline that passes is CANCELED, as Triton labels it.
        assert (
            'nv_inference_request_failure_total{model="loop_a",reason="BACKEND",version="1"} 5.0'
            in failures
        ), failures
        assert (
            'nv_inference_request_failure_total{model="via_slow",reason="CANCELED",version="1"} 1.0'
            in failures
        ), failures
    finally:
        await dataplane.stop()
