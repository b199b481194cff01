"""Build the shipped Triton-style `model_repo/` deterministically with `onnx.helper`.

Every model is generated from code and a fixed numpy seed, so the committed bytes can be
re-made (and reviewed) instead of trusted. After building, each model is run with onnxruntime
against a numpy reference and each config.pbtxt is parsed back with Triton's own
`ModelConfig` schema and compared with the ONNX graph it describes.

    python scripts/build_models.py                 # build + check into model_repo/
    python scripts/build_models.py --out DIR       # somewhere else
    python scripts/build_models.py --measure       # also time the `mlp` model in-process
    python scripts/build_models.py --heavy         # also resnet50 + bert_encoder (~250 MB)
                                                   # into bench/out/models (never committed)
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


# --- heavy models: built on demand, never committed -----------------------------------------
#
# Shaped like the workloads users serve (an image CNN, a transformer encoder) so benches see
# the payload copies, codec and batch concatenation of real requests. Random weights: shapes and
# operators are what matter. ~100 MB and ~150 MB of FP32, so they are built into a cache
# directory (``--heavy``; ``ensure_heavy``), never into ``model_repo/``.

RESNET_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # width, blocks, stride
RESNET_CLASSES = 1000
BERT_VOCAB = 30522
BERT_SEQ = 128
BERT_HIDDEN = 768
BERT_HEADS = 12
BERT_FFN = 3072
BERT_LAYERS = 2  # "a few layers": 12 would only multiply the compute on a 2-core machine
HEAVY_VERSION = "2"  # bump when a heavy builder changes: cached copies are rebuilt


class _Graph:
    """Nodes and FP32 initializers of a graph under construction, with unique names."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, prefix: str, value: Array) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def weight(self, prefix: str, shape: tuple[int, ...], fan_in: int, gain: float = 2.0) -> str:
        value = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(
            np.sqrt(gain / fan_in)
        )
        return self.const(prefix, value)

    def op(self, op_type: str, inputs: list[str], prefix: str = "", **attrs: Any) -> str:
        out = self.name(prefix or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out


def _conv(
    g: _Graph, x: str, cin: int, cout: int, k: int, stride: int, relu: bool, gain: float = 2.0
) -> str:
    """Conv with bias (BatchNorm folded in, as exported ResNets are), optionally ReLU."""
    w = g.weight("conv_w", (cout, cin, k, k), cin * k * k, gain)
    b = g.const("conv_b", np.zeros(cout, dtype=np.float32))
    pad = k // 2
    y = g.op(
        "Conv", [x, w, b], kernel_shape=[k, k], strides=[stride, stride], pads=[pad, pad, pad, pad]
    )
    return g.op("Relu", [y]) if relu else y


def build_resnet50() -> Built:
    """ResNet-50 v1.5's layer shapes (bottleneck blocks 3-4-6-3, stride on the 3x3 conv),
    FP32 [3, 224, 224] -> logits [1000], ~25.6 M parameters (~100 MB). The last conv of each
    block is scaled down so 16 residual additions keep activations in range."""
    f32 = TensorProto.FLOAT
    g = _Graph(np.random.default_rng(SEED + 50))
    x = _conv(g, "INPUT", 3, 64, 7, 2, relu=True)
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for width, blocks, stride in RESNET_STAGES:
        for i in range(blocks):
            s = stride if i == 0 else 1
            cout = width * 4
            y = _conv(g, x, cin, width, 1, 1, relu=True)
            y = _conv(g, y, width, width, 3, s, relu=True)
            y = _conv(g, y, width, cout, 1, 1, relu=False, gain=0.2)
            short = _conv(g, x, cin, cout, 1, s, relu=False) if i == 0 else x
            x = g.op("Relu", [g.op("Add", [y, short])])
            cin = cout
    x = g.op("GlobalAveragePool", [x])
    x = g.op("Flatten", [x], axis=1)
    w = g.weight("fc_w", (cin, RESNET_CLASSES), cin, 1.0)
    b = g.const("fc_b", np.zeros(RESNET_CLASSES, dtype=np.float32))
    g.nodes.append(helper.make_node("Gemm", [x, w, b], ["OUTPUT"]))
    graph = helper.make_graph(
        g.nodes,
        "resnet50",
        [_vi("INPUT", f32, ["batch", 3, 224, 224])],
        [_vi("OUTPUT", f32, ["batch", RESNET_CLASSES])],
        g.inits,
    )
    config = _config(
        "resnet50",
        8,
        [("INPUT", f32, [3, 224, 224])],
        [("OUTPUT", f32, [RESNET_CLASSES])],
        # No queue delay: a run takes 100+ ms on a CPU, so a request that finds the instance
        # free goes at once, and those that arrive while it runs form the next batch anyway.
        batching=mc.ModelDynamicBatching(),
        instances=[mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)],
    )

    def check(sess: ort.InferenceSession, rng: np.random.Generator) -> None:
        x = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
        (both,) = sess.run(["OUTPUT"], {"INPUT": x})
        (one,) = sess.run(["OUTPUT"], {"INPUT": x[1:]})
        if both.shape != (2, RESNET_CLASSES) or not np.all(np.isfinite(both)):
            raise AssertionError(f"resnet50: {both.shape}, finite={np.isfinite(both).all()}")
        np.testing.assert_allclose(one[0], both[1], rtol=1e-3, atol=1e-3 * np.abs(both).max())
        if np.allclose(both[0], both[1]) or both.std() == 0:
            raise AssertionError("resnet50: the answer does not depend on the input")

    doc = "ResNet-50 v1.5 layer shapes, BatchNorm folded into Conv biases, random weights"
    return Built("resnet50", _model(graph, doc), config, check)


def _layer_norm(g: _Graph, x: str) -> str:
    scale = g.const("ln_scale", np.ones(BERT_HIDDEN, dtype=np.float32))
    bias = g.const("ln_bias", np.zeros(BERT_HIDDEN, dtype=np.float32))
    return g.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-12)


def _dense(g: _Graph, x: str, cin: int, cout: int) -> str:
    w = g.weight("dense_w", (cin, cout), cin, 1.0)
    b = g.const("dense_b", np.zeros(cout, dtype=np.float32))
    return g.op("Add", [g.op("MatMul", [x, w]), b])


def _gelu(g: _Graph, x: str) -> str:
    """0.5 x (1 + erf(x / sqrt 2)): BERT's exact GELU, which opset 17 spells out."""
    inv_sqrt2 = g.const("inv_sqrt2", np.array(1 / np.sqrt(2), dtype=np.float32))
    half = g.const("half", np.array(0.5, dtype=np.float32))
    one = g.const("one", np.array(1.0, dtype=np.float32))
    erf = g.op("Erf", [g.op("Mul", [x, inv_sqrt2])])
    return g.op("Mul", [g.op("Mul", [x, half]), g.op("Add", [erf, one])])


def build_bert_encoder() -> Built:
    """BERT-base's shapes (vocabulary 30522, hidden 768, 12 heads, FFN 3072, post-LayerNorm)
    with ``BERT_LAYERS`` layers: INT64 ``input_ids`` and ``attention_mask`` [128] ->
    ``last_hidden_state`` [128, 768] and ``pooler_output`` [768]."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    g = _Graph(np.random.default_rng(SEED + 768))
    heads, head_dim = BERT_HEADS, BERT_HIDDEN // BERT_HEADS
    word = g.weight("word_emb", (BERT_VOCAB, BERT_HIDDEN), 1, 0.02**2)
    pos = g.weight("pos_emb", (BERT_SEQ, BERT_HIDDEN), 1, 0.02**2)
    x = g.op("Add", [g.op("Gather", [word, "input_ids"], axis=0), pos])
    x = _layer_norm(g, x)
    # [B, 128] mask of 1/0 -> additive bias [B, 1, 1, 128] of 0 / -10000, as BERT does.
    mask = g.op("Cast", ["attention_mask"], to=f32)
    mask = g.op("Unsqueeze", [mask, g.const("axes", np.array([1, 2], dtype=np.int64))])
    one = g.const("one", np.array(1.0, dtype=np.float32))
    big = g.const("neg", np.array(-10000.0, dtype=np.float32))
    bias = g.op("Mul", [g.op("Sub", [one, mask]), big])
    split_shape = g.const("shape", np.array([0, BERT_SEQ, heads, head_dim], dtype=np.int64))
    merge_shape = g.const("shape", np.array([0, BERT_SEQ, BERT_HIDDEN], dtype=np.int64))
    scale = g.const("scale", np.array(1 / np.sqrt(head_dim), dtype=np.float32))
    for _ in range(BERT_LAYERS):

        def heads_of(t: str, perm: list[int]) -> str:
            return g.op("Transpose", [g.op("Reshape", [t, split_shape])], perm=perm)

        q = heads_of(_dense(g, x, BERT_HIDDEN, BERT_HIDDEN), [0, 2, 1, 3])
        k = heads_of(_dense(g, x, BERT_HIDDEN, BERT_HIDDEN), [0, 2, 3, 1])
        v = heads_of(_dense(g, x, BERT_HIDDEN, BERT_HIDDEN), [0, 2, 1, 3])
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), bias])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_shape])
        x = _layer_norm(g, g.op("Add", [x, _dense(g, ctx, BERT_HIDDEN, BERT_HIDDEN)]))
        ffn = _dense(g, _gelu(g, _dense(g, x, BERT_HIDDEN, BERT_FFN)), BERT_FFN, BERT_HIDDEN)
        x = _layer_norm(g, g.op("Add", [x, ffn]))
    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"]))
    cls = g.op("Gather", [x, g.const("zero", np.array(0, dtype=np.int64))], axis=1)
    g.nodes.append(
        helper.make_node("Tanh", [_dense(g, cls, BERT_HIDDEN, BERT_HIDDEN)], ["pooler_output"])
    )
    graph = helper.make_graph(
        g.nodes,
        "bert_encoder",
        [
            _vi("input_ids", i64, ["batch", BERT_SEQ]),
            _vi("attention_mask", i64, ["batch", BERT_SEQ]),
        ],
        [
            _vi("last_hidden_state", f32, ["batch", BERT_SEQ, BERT_HIDDEN]),
            _vi("pooler_output", f32, ["batch", BERT_HIDDEN]),
        ],
        g.inits,
    )
    config = _config(
        "bert_encoder",
        8,
        [("input_ids", i64, [BERT_SEQ]), ("attention_mask", i64, [BERT_SEQ])],
        [
            ("last_hidden_state", f32, [BERT_SEQ, BERT_HIDDEN]),
            ("pooler_output", f32, [BERT_HIDDEN]),
        ],
        batching=mc.ModelDynamicBatching(),  # as resnet50's: no queue delay
        instances=[mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)],
    )

    def check(sess: ort.InferenceSession, rng: np.random.Generator) -> None:
        ids = rng.integers(0, BERT_VOCAB, (2, BERT_SEQ), dtype=np.int64)
        mask = np.ones((2, BERT_SEQ), dtype=np.int64)
        mask[1, 100:] = 0
        hidden, pooled = sess.run(None, {"input_ids": ids, "attention_mask": mask})
        if hidden.shape != (2, BERT_SEQ, BERT_HIDDEN) or pooled.shape != (2, BERT_HIDDEN):
            raise AssertionError(f"bert_encoder: {hidden.shape} {pooled.shape}")
        if not (np.all(np.isfinite(hidden)) and np.all(np.isfinite(pooled))):
            raise AssertionError("bert_encoder: non-finite output")
        # Masked positions must not change the unmasked ones' answers.
        ids2 = ids.copy()
        ids2[1, 100:] = 0
        hidden2, _ = sess.run(None, {"input_ids": ids2, "attention_mask": mask})
        np.testing.assert_allclose(hidden2[1, :100], hidden[1, :100], rtol=1e-4, atol=1e-4)
        if np.allclose(hidden[0], hidden[1]):
            raise AssertionError("bert_encoder: the answer does not depend on the input")

    doc = f"BERT-base shapes, {BERT_LAYERS} encoder layers, random weights"
    return Built("bert_encoder", _model(graph, doc), config, check)


HEAVY_BUILDERS: list[Callable[[], Built]] = [build_resnet50, build_bert_encoder]
HEAVY_CACHE = Path(__file__).resolve().parent.parent / "bench" / "out" / "models"


def ensure_heavy(out: Path = HEAVY_CACHE, names: list[str] | None = None) -> Path:
    """The heavy models built and checked into ``out`` (once: a ``.version`` stamp per model
    says the cached copy is this script's); returns ``out``, a Triton-style repository."""
    for builder in HEAVY_BUILDERS:
        name = builder.__name__.removeprefix("build_")
        if names is not None and name not in names:
            continue
        stamp = out / name / ".version"
        if stamp.is_file() and stamp.read_text() == HEAVY_VERSION:
            continue
        built = builder()
        write(built, out)
        check_written(built, out)
        stamp.write_text(HEAVY_VERSION)
    return out


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
    parser.add_argument(
        "--heavy",
        nargs="?",
        const=HEAVY_CACHE,
        type=Path,
        help=f"also build resnet50 and bert_encoder (~250 MB) into this dir ({HEAVY_CACHE})",
    )
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
    if args.heavy is not None:
        for builder in HEAVY_BUILDERS:
            started = time.perf_counter()
            built = builder()
            write(built, args.heavy)
            check_written(built, args.heavy)
            (args.heavy / built.name / ".version").write_text(HEAVY_VERSION)
            size = (args.heavy / built.name / "1" / "model.onnx").stat().st_size
            took = time.perf_counter() - started
            print(f"ok  {built.name:<24} {size:>10,d} bytes  {took:.1f} s  -> {args.heavy}")

    if args.measure:
        rates = measure(args.out, args.batch_sizes, args.window_s, args.rounds)
        for bs, (median, best) in rates.items():
            print(f"mlp batch {bs:>4d}: {median:>7.0f} items/s median, {best:>7.0f} best")
        if 1 in rates and 64 in rates:
            print(f"mlp batch 64 / batch 1 (medians): {rates[64][0] / rates[1][0]:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
