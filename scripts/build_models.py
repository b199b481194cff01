"""Build the shipped Triton-style `model_repo/` deterministically with `onnx.helper`.

Every model is generated from code and a fixed numpy seed, so the committed bytes can be
re-made (and reviewed) instead of trusted. After building, each model is run with onnxruntime
against a numpy reference and each config.pbtxt is parsed back with Triton's own
`ModelConfig` schema and compared with the ONNX graph it describes.

    python scripts/build_models.py                 # build + check into model_repo/
    python scripts/build_models.py --out DIR       # somewhere else
    python scripts/build_models.py --measure       # also time the `mlp` model in-process
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2 as mc

SEED = 20240601
OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; every onnxruntime >= 1.14 loads it
PRODUCER = "gateway/scripts/build_models.py"

Array = npt.NDArray[Any]

# mlp shape: see build_mlp for why it looks like this.
MLP_FEATURES = 1024
MLP_HIDDEN = 1024
MLP_REPEATS = 16
MLP_CLASSES = 10

# ONNX element type -> Triton config data_type.
TRITON_TYPE: dict[int, int] = {
    TensorProto.FLOAT: mc.TYPE_FP32,
    TensorProto.FLOAT16: mc.TYPE_FP16,
    TensorProto.INT32: mc.TYPE_INT32,
    TensorProto.INT64: mc.TYPE_INT64,
    TensorProto.BOOL: mc.TYPE_BOOL,
    TensorProto.STRING: mc.TYPE_STRING,
}


@dataclass(frozen=True)
class Built:
    """One model of the repository; `config` is None where Triton should auto-complete."""

    name: str
    model: onnx.ModelProto
    config: mc.ModelConfig | None
    check: Callable[[ort.InferenceSession, np.random.Generator], None]


def _model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name=PRODUCER,
        doc_string=doc,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _vi(name: str, elem: int, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _config(
    name: str,
    max_batch_size: int,
    inputs: list[tuple[str, int, list[int]]],
    outputs: list[tuple[str, int, list[int]]],
    batching: mc.ModelDynamicBatching | None = None,
    instances: list[mc.ModelInstanceGroup] | None = None,
) -> mc.ModelConfig:
    """Build the config through Triton's schema so a typo cannot produce an unparsable file."""
    cfg = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=max_batch_size)
    for tname, elem, dims in inputs:
        cfg.input.add(name=tname, data_type=TRITON_TYPE[elem], dims=dims)
    for tname, elem, dims in outputs:
        cfg.output.add(name=tname, data_type=TRITON_TYPE[elem], dims=dims)
    if batching is not None:
        cfg.dynamic_batching.CopyFrom(batching)
    if instances:
        cfg.instance_group.extend(instances)
    return cfg


def _close(got: Array, want: Array, name: str, rtol: float = 0.0) -> None:
    if got.dtype != want.dtype or got.shape != want.shape:
        raise AssertionError(f"{name}: got {got.dtype}{got.shape}, want {want.dtype}{want.shape}")
    if rtol:
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * 0.1, err_msg=name)
    else:
        np.testing.assert_array_equal(got, want, err_msg=name)


# --- simple ---------------------------------------------------------------------------------


def build_simple() -> Built:
    """Drop-in for Triton's example `simple` (add/sub of two INT32[16]), so its clients work."""
    i32 = TensorProto.INT32
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "simple",
        [_vi("INPUT0", i32, ["batch", 16]), _vi("INPUT1", i32, ["batch", 16])],
        [_vi("OUTPUT0", i32, ["batch", 16]), _vi("OUTPUT1", i32, ["batch", 16])],
    )
    config = _config(
        "simple",
        8,
        [("INPUT0", i32, [16]), ("INPUT1", i32, [16])],
        [("OUTPUT0", i32, [16]), ("OUTPUT1", i32, [16])],
        batching=mc.ModelDynamicBatching(),
    )

    def check(sess: ort.InferenceSession, rng: np.random.Generator) -> None:
        a = rng.integers(-1000, 1000, (3, 16), dtype=np.int32)
        b = rng.integers(-1000, 1000, (3, 16), dtype=np.int32)
        out0, out1 = sess.run(["OUTPUT0", "OUTPUT1"], {"INPUT0": a, "INPUT1": b})
        _close(out0, a + b, "OUTPUT0")
        _close(out1, a - b, "OUTPUT1")

    return Built(
        "simple",
        _model(graph, "OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1"),
        config,
        check,
    )


# --- mlp ------------------------------------------------------------------------------------


def _mlp_weights(rng: np.random.Generator) -> dict[str, Array]:
    """FP16 weights; He-scaled so activations neither vanish nor blow up over the repeats."""
    f, h, c = MLP_FEATURES, MLP_HIDDEN, MLP_CLASSES
    w: dict[str, Array] = {
        "w_in": rng.standard_normal((f, h)) * np.sqrt(2.0 / f),
        "b_in": rng.standard_normal(h) * 0.01,
        "w_shared": rng.standard_normal((h, h)) * np.sqrt(2.0 / h),
        "w_out": rng.standard_normal((h, c)) * np.sqrt(1.0 / h),
        "b_out": rng.standard_normal(c) * 0.01,
        "w_skip": rng.standard_normal((f, c)) * np.sqrt(2.0 / f),
    }
    for i in range(MLP_REPEATS):
        w[f"scale{i}"] = 1.0 + 0.1 * rng.standard_normal(h)
        w[f"b{i}"] = rng.standard_normal(h) * 0.01
    return {k: v.astype(np.float16) for k, v in w.items()}


def _mlp_reference(w: dict[str, Array], x: Array) -> Array:
    w32 = {k: v.astype(np.float32) for k, v in w.items()}
    hid = np.maximum(x @ w32["w_in"] + w32["b_in"], 0.0)
    for i in range(MLP_REPEATS):
        hid = np.maximum(hid @ (w32["w_shared"] * w32[f"scale{i}"]) + w32[f"b{i}"], 0.0)
    logits = hid @ w32["w_out"] + w32["b_out"] + x @ w32["w_skip"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs: Array = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return probs


def build_mlp() -> Built:
    """A dense classifier whose per-item compute dominates HTTP cost and where batching pays.

    File size stays small (~4 MB) because weights are FP16 initializers behind a Cast and the
    hidden matrix is shared by all repeats. Each repeat multiplies the shared matrix by its own
    column scale; onnxruntime constant-folds Cast and Mul at load, leaving distinct FP32
    matrices (~64 MB, more than a 32 MB L3). Batch 1 then streams every weight from memory per
    item while large batches reuse it, which is what makes batching matter (with plain tying
    one 4 MB matrix stays cache-resident and batch 64 was only ~2x batch 1). A linear "wide"
    path from INPUT to the logits keeps answers input-dependent: repeating one matrix acts like
    power iteration, so the deep path alone gives every input the same argmax.
    """
    f32 = TensorProto.FLOAT
    w = _mlp_weights(np.random.default_rng(SEED))
    inits = [numpy_helper.from_array(v, f"{k}_fp16") for k, v in w.items()]
    nodes = [helper.make_node("Cast", [f"{k}_fp16"], [k], to=f32) for k in w]
    nodes += [
        helper.make_node("Gemm", ["INPUT", "w_in", "b_in"], ["pre_in"]),
        helper.make_node("Relu", ["pre_in"], ["h_in"]),
    ]
    hid = "h_in"
    for i in range(MLP_REPEATS):
        nodes += [
            helper.make_node("Mul", ["w_shared", f"scale{i}"], [f"w{i}"]),
            helper.make_node("Gemm", [hid, f"w{i}", f"b{i}"], [f"pre{i}"]),
            helper.make_node("Relu", [f"pre{i}"], [f"h{i}"]),
        ]
        hid = f"h{i}"
    nodes += [
        helper.make_node("Gemm", [hid, "w_out", "b_out"], ["deep"]),
        helper.make_node("Gemm", ["INPUT", "w_skip"], ["wide"]),
        helper.make_node("Add", ["deep", "wide"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["PROBS"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [_vi("INPUT", f32, ["batch", MLP_FEATURES])],
        [_vi("PROBS", f32, ["batch", MLP_CLASSES])],
        inits,
    )
    config = _config(
        "mlp",
        64,
        [("INPUT", f32, [MLP_FEATURES])],
        [("PROBS", f32, [MLP_CLASSES])],
        # No preferred sizes, as Triton advises: batches as large as the queue allows within
        # 4 ms. Two halves of 32 overlap the event loop with ORT, but ORT's cost per item at 64
        # is ~25 % lower and that won (bench/results/variants.md). 64 closed-loop clients on
        # two shared cores come back over 2-4 ms: with 2 ms, batches averaged 37-59.
        batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=4000),
        instances=[mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)],
    )

    def check(sess: ort.InferenceSession, rng: np.random.Generator) -> None:
        x = rng.standard_normal((64, MLP_FEATURES)).astype(np.float32)
        (probs,) = sess.run(["PROBS"], {"INPUT": x})
        _close(probs, _mlp_reference(w, x), "PROBS", rtol=1e-3)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        # Tests tell items apart by their answers: no saturated softmax, no constant argmax.
        classes = len(set(probs.argmax(axis=1).tolist()))
        if probs.max() > 0.999 or classes < MLP_CLASSES // 2:
            raise AssertionError(f"mlp degenerate: max prob {probs.max():.4f}, {classes} classes")

    doc = (
        f"PROBS = softmax(deep(INPUT) + wide(INPUT)); deep: {MLP_REPEATS} repeats of one shared "
        f"{MLP_HIDDEN}x{MLP_HIDDEN} matrix with per-repeat column scales; FP16 weights"
    )
    return Built("mlp", _model(graph, doc), config, check)


# --- preprocess, and the ensemble that feeds mlp through it ----------------------------------


def _preprocess_stats(rng: np.random.Generator) -> tuple[Array, Array]:
    """Per-feature mean and 1/std of the raw data `preprocess` normalises (bytes, 0..255)."""
    mean = rng.uniform(96.0, 160.0, MLP_FEATURES).astype(np.float32)
    inv_std = (1.0 / rng.uniform(32.0, 96.0, MLP_FEATURES)).astype(np.float32)
    return mean, inv_std


def build_preprocess() -> Built:
    """The first step of `mlp_pipeline`: raw features (0..255) -> what `mlp` takes."""
    f32 = TensorProto.FLOAT
    mean, inv_std = _preprocess_stats(np.random.default_rng(SEED + 1))
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["RAW", "mean"], ["centred"]),
            helper.make_node("Mul", ["centred", "inv_std"], ["NORMALIZED"]),
        ],
        "preprocess",
        [_vi("RAW", f32, ["batch", MLP_FEATURES])],
        [_vi("NORMALIZED", f32, ["batch", MLP_FEATURES])],
        [numpy_helper.from_array(mean, "mean"), numpy_helper.from_array(inv_std, "inv_std")],
    )
    config = _config(
        "preprocess",
        64,
        [("RAW", f32, [MLP_FEATURES])],
        [("NORMALIZED", f32, [MLP_FEATURES])],
        batching=mc.ModelDynamicBatching(),
    )

    def check(sess: ort.InferenceSession, rng: np.random.Generator) -> None:
        x = rng.uniform(0, 255, (8, MLP_FEATURES)).astype(np.float32)
        (got,) = sess.run(["NORMALIZED"], {"RAW": x})
        _close(got, (x - mean) * inv_std, "NORMALIZED", rtol=1e-6)

    return Built("preprocess", _model(graph, "NORMALIZED = (RAW - mean) * inv_std"), config, check)


def ensemble_mlp_pipeline() -> mc.ModelConfig:
    """Triton's ensemble of `preprocess` then `mlp`: RAW -> NORMALIZED -> PROBS."""
    f32 = mc.TYPE_FP32
    cfg = mc.ModelConfig(name="mlp_pipeline", platform="ensemble", max_batch_size=64)
    cfg.input.add(name="RAW", data_type=f32, dims=[MLP_FEATURES])
    cfg.output.add(name="PROBS", data_type=f32, dims=[MLP_CLASSES])
    first = cfg.ensemble_scheduling.step.add(model_name="preprocess", model_version=-1)
    first.input_map["RAW"] = "RAW"
    first.output_map["NORMALIZED"] = "normalized"
    second = cfg.ensemble_scheduling.step.add(model_name="mlp", model_version=-1)
    second.input_map["INPUT"] = "normalized"
    second.output_map["PROBS"] = "PROBS"
    return cfg


ENSEMBLES: list[Callable[[], mc.ModelConfig]] = [ensemble_mlp_pipeline]


def write_ensemble(config: mc.ModelConfig, out: Path) -> None:
    """An ensemble is a config and an empty version directory (kept in git by a README)."""
    version_dir = out / config.name / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / "README").write_text(
        "An ensemble's version directory: its steps are other models of this repository.\n"
    )
    (out / config.name / "config.pbtxt").write_text(text_format.MessageToString(config))


def mlp_params() -> int:
    """Parameters stored in the file (the shared matrix counted once)."""
    return sum(v.size for v in _mlp_weights(np.random.default_rng(SEED)).values())


# --- multi ----------------------------------------------------------------------------------


def build_multi() -> Built:
    """Several inputs and outputs of non-FP32 types, to exercise dtype codecs end to end."""
    i32, i64, f16, b = TensorProto.INT32, TensorProto.INT64, TensorProto.FLOAT16, TensorProto.BOOL
    graph = helper.make_graph(
        [
            helper.make_node("Where", ["MASK", "IDS", "zero"], ["MASKED_IDS"]),
            helper.make_node("Cast", ["IDS"], ["ids_f16"], to=f16),
            helper.make_node("Mul", ["ids_f16", "SCALE"], ["SCALED"]),
            helper.make_node("Cast", ["MASK"], ["mask_i32"], to=i32),
            helper.make_node("ReduceMax", ["mask_i32"], ["any_i32"], axes=[1], keepdims=1),
            helper.make_node("Cast", ["any_i32"], ["ANY"], to=b),
        ],
        "multi",
        [
            _vi("IDS", i64, ["batch", 4]),
            _vi("MASK", b, ["batch", 4]),
            _vi("SCALE", f16, ["batch", 1]),
        ],
        [
            _vi("MASKED_IDS", i64, ["batch", 4]),
            _vi("SCALED", f16, ["batch", 4]),
            _vi("ANY", b, ["batch", 1]),
        ],
        [numpy_helper.from_array(np.array(0, dtype=np.int64), "zero")],
    )
    config = _config(
        "multi",
        8,
        [("IDS", i64, [4]), ("MASK", b, [4]), ("SCALE", f16, [1])],
        [("MASKED_IDS", i64, [4]), ("SCALED", f16, [4]), ("ANY", b, [1])],
        batching=mc.ModelDynamicBatching(),
    )

    def check(sess: ort.InferenceSession, rng: np.random.Generator) -> None:
        ids = rng.integers(-500, 500, (4, 4), dtype=np.int64)
        mask = rng.random((4, 4)) < 0.5
        mask[0] = False  # make sure ANY sees both answers
        mask[1, 2] = True
        scale = rng.uniform(0.5, 2.0, (4, 1)).astype(np.float16)
        masked, scaled, any_ = sess.run(
            ["MASKED_IDS", "SCALED", "ANY"], {"IDS": ids, "MASK": mask, "SCALE": scale}
        )
        _close(masked, np.where(mask, ids, 0), "MASKED_IDS")
        _close(scaled, ids.astype(np.float16) * scale, "SCALED", rtol=1e-3)
        _close(any_, mask.any(axis=1, keepdims=True), "ANY")

    doc = "MASKED_IDS = IDS where MASK else 0; SCALED = fp16(IDS) * SCALE; ANY = any(MASK)"
    return Built("multi", _model(graph, doc), config, check)


# --- identity_fp32_nobatch ------------------------------------------------------------------


def build_identity_nobatch() -> Built:
    """max_batch_size 0: shapes are taken literally, with no implicit batch dimension."""
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Mul", ["X", "two"], ["Y"])],
        "identity_fp32_nobatch",
        [_vi("X", f32, [2, 3])],
        [_vi("Y", f32, [2, 3])],
        [numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")],
    )
    config = _config("identity_fp32_nobatch", 0, [("X", f32, [2, 3])], [("Y", f32, [2, 3])])

    def check(sess: ort.InferenceSession, rng: np.random.Generator) -> None:
        x = rng.standard_normal((2, 3)).astype(np.float32)
        (y,) = sess.run(["Y"], {"X": x})
        _close(y, x * 2, "Y")

    return Built("identity_fp32_nobatch", _model(graph, "Y = X * 2"), config, check)


# --- bytes_echo -----------------------------------------------------------------------------


def build_bytes_echo() -> Built:
    """TYPE_STRING / BYTES round trip; onnxruntime runs Identity on string tensors."""
    s = TensorProto.STRING
    graph = helper.make_graph(
        [helper.make_node("Identity", ["TEXT"], ["TEXT_OUT"])],
        "bytes_echo",
        [_vi("TEXT", s, ["batch", 1])],
        [_vi("TEXT_OUT", s, ["batch", 1])],
    )
    config = _config(
        "bytes_echo",
        8,
        [("TEXT", s, [1])],
        [("TEXT_OUT", s, [1])],
        batching=mc.ModelDynamicBatching(),
    )

    def check(sess: ort.InferenceSession, rng: np.random.Generator) -> None:
        text = np.array([["hello"], ["wörld"], [""]], dtype=object)
        (out,) = sess.run(["TEXT_OUT"], {"TEXT": text})
        if out.shape != (3, 1) or out.tolist() != text.tolist():
            raise AssertionError(f"TEXT_OUT: got {out!r}")

    return Built("bytes_echo", _model(graph, "TEXT_OUT = TEXT"), config, check)


# --- autocomplete_add -----------------------------------------------------------------------


def build_autocomplete_add() -> Built:
    """No config.pbtxt: the gateway must derive inputs, outputs and batching from the graph."""
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Add", ["A", "B"], ["C"])],
        "autocomplete_add",
        [_vi("A", f32, ["batch", 4]), _vi("B", f32, ["batch", 4])],
        [_vi("C", f32, ["batch", 4])],
    )

    def check(sess: ort.InferenceSession, rng: np.random.Generator) -> None:
        a = rng.standard_normal((2, 4)).astype(np.float32)
        b = rng.standard_normal((2, 4)).astype(np.float32)
        (c,) = sess.run(["C"], {"A": a, "B": b})
        _close(c, a + b, "C")

    return Built("autocomplete_add", _model(graph, "C = A + B"), None, check)


BUILDERS: list[Callable[[], Built]] = [
    build_simple,
    build_mlp,
    build_preprocess,
    build_multi,
    build_identity_nobatch,
    build_bytes_echo,
    build_autocomplete_add,
]


# --- writing and checking -------------------------------------------------------------------


def write(built: Built, out: Path) -> None:
    model_dir = out / built.name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / "model.onnx").write_bytes(built.model.SerializeToString())
    config_path = model_dir / "config.pbtxt"
    if built.config is None:
        config_path.unlink(missing_ok=True)  # a stale config would defeat the auto-complete case
    else:
        config_path.write_text(text_format.MessageToString(built.config))


def _check_config(built: Built, out: Path) -> None:
    """Parse config.pbtxt as Triton would and compare its tensors with the ONNX graph's."""
    path = out / built.name / "config.pbtxt"
    if built.config is None:
        if path.exists():
            raise AssertionError(f"{path} must not exist")
        return
    cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
    if cfg != built.config or cfg.name != built.name:
        raise AssertionError(f"{path} does not round-trip")
    batched = cfg.max_batch_size > 0
    for declared, graph_side in (
        (cfg.input, built.model.graph.input),
        (cfg.output, built.model.graph.output),
    ):
        graph_by_name = {v.name: v.type.tensor_type for v in graph_side}
        if {t.name for t in declared} != set(graph_by_name):
            raise AssertionError(f"{path}: tensor names differ from the graph")
        for t in declared:
            tt = graph_by_name[t.name]
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            if TRITON_TYPE[tt.elem_type] != t.data_type or dims != (
                [-1, *t.dims] if batched else list(t.dims)
            ):
                raise AssertionError(f"{path}: {t.name} is {dims}, config says {list(t.dims)}")


def check_written(built: Built, out: Path) -> None:
    """Run the written file (not the in-memory proto) so what ships is what was tested."""
    _check_config(built, out)
    sess = ort.InferenceSession(
        str(out / built.name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    built.check(sess, np.random.default_rng(SEED))


def measure(
    out: Path, batch_sizes: list[int], window_s: float, rounds: int
) -> dict[int, tuple[float, float]]:
    """In-process ORT items/s of `mlp` per batch size: (median, best) over timing windows.

    Batch sizes take turns window by window, so a slow spell on a shared host hits every size
    alike and the ratios between sizes stay fair; each size runs rounds * window_s in all.
    """
    sess = ort.InferenceSession(
        str(out / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(SEED)
    feeds = {
        bs: {"INPUT": rng.standard_normal((bs, MLP_FEATURES)).astype(np.float32)}
        for bs in batch_sizes
    }
    for feed in feeds.values():  # warm-up: first runs allocate arenas and spin up threads
        for _ in range(3):
            sess.run(None, feed)
    windows: dict[int, list[float]] = {bs: [] for bs in batch_sizes}
    for _ in range(rounds):
        for bs, feed in feeds.items():
            calls, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < window_s:
                sess.run(None, feed)
                calls += 1
            windows[bs].append(calls * bs / elapsed)
    return {bs: (statistics.median(w), max(w)) for bs, w in windows.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("model_repo"), help="repository dir")
    parser.add_argument("--measure", action="store_true", help="time mlp with onnxruntime")
    parser.add_argument("--window-s", type=float, default=0.25, help="one timing window")
    parser.add_argument("--rounds", type=int, default=6, help="timing windows per batch size")
    parser.add_argument(
        "--batch-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 8, 32, 64, 128],
        help="comma-separated, for --measure",
    )
    args = parser.parse_args(argv)

    for builder in BUILDERS:
        built = builder()
        write(built, args.out)
        check_written(built, args.out)
        size = (args.out / built.name / "1" / "model.onnx").stat().st_size
        print(f"ok  {built.name:<24} {size:>10,d} bytes")
    for make in ENSEMBLES:
        ensemble = make()
        write_ensemble(ensemble, args.out)
        print(f"ok  {ensemble.name:<24} (ensemble of {len(ensemble.ensemble_scheduling.step)})")
    print(f"mlp: {mlp_params():,d} stored parameters")

    if args.measure:
        rates = measure(args.out, args.batch_sizes, args.window_s, args.rounds)
        for bs, (median, best) in rates.items():
            print(f"mlp batch {bs:>4d}: {median:>7.0f} items/s median, {best:>7.0f} best")
        if 1 in rates and 64 in rates:
            print(f"mlp batch 64 / batch 1 (medians): {rates[64][0] / rates[1][0]:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
