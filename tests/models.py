"""Tiny ONNX models built at test time, in a Triton-style repository layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def _save(model: onnx.ModelProto, repo: Path, name: str, version: int, config: str | None) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    directory = repo / name
    (directory / str(version)).mkdir(parents=True, exist_ok=True)
    path = directory / str(version) / "model.onnx"
    onnx.save(model, path)
    if config is not None:
        (directory / "config.pbtxt").write_text(config)
    return path


def graph_bytes(graph: onnx.GraphProto) -> bytes:
    """A graph as a model file's bytes (for pushes through the repository API)."""
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8  # what onnxruntime 1.17+ and Triton's ORT backends all read
    return bytes(model.SerializeToString())


def simple_onnx() -> bytes:
    """Triton's ``simple``: INT32 INPUT0, INPUT1 [-1, 16] -> OUTPUT0 = sum, OUTPUT1 = diff."""
    shape = [None, 16]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "simple",
        [helper.make_tensor_value_info(n, TensorProto.INT32, shape) for n in ("INPUT0", "INPUT1")],
        [
            helper.make_tensor_value_info(n, TensorProto.INT32, shape)
            for n in ("OUTPUT0", "OUTPUT1")
        ],
    )
    return graph_bytes(graph)


def add_sub(
    repo: Path,
    name: str = "simple",
    version: int = 1,
    config: str | None = None,
    offset: int = 0,
) -> Path:
    """Triton's ``simple``: INT32 [-1,16] x2 -> sum, difference (+ ``offset``, to tell versions
    apart)."""
    dims = ["batch", 16]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["sum"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        helper.make_node("Add", ["sum", "off"], ["OUTPUT0"]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(n, TensorProto.INT32, dims) for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info(n, TensorProto.INT32, dims) for n in ("OUTPUT0", "OUTPUT1")],
        [numpy_helper.from_array(np.array(offset, dtype=np.int32), "off")],
    )
    if config is None:
        config = SIMPLE_CONFIG.replace("simple", name)
    return _save(helper.make_model(graph, opset_imports=OPSET), repo, name, version, config)


SIMPLE_CONFIG = """
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
dynamic_batching { }
"""


def dense(
    repo: Path, name: str = "dense", features: int = 64, classes: int = 8, config: str | None = None
) -> Path:
    """FP32 [-1,features] -> softmax [-1,classes], deterministic weights."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((features, classes)).astype(np.float32) / 8
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["Y"], axis=-1),
        ],
        name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(weight, "W")],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), repo, name, 1, config)


def fixed_double(repo: Path, name: str = "double") -> Path:
    """``max_batch_size: 0``: FP32 [2,3] -> X * 2."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["X", "two"], ["Y"])],
        name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array(2, dtype=np.float32), "two")],
    )
    config = f"""
name: "{name}"
max_batch_size: 0
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 2, 3 ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 2, 3 ] }} ]
"""
    return _save(helper.make_model(graph, opset_imports=OPSET), repo, name, 1, config)


def strings(repo: Path, name: str = "echo") -> Path:
    """BYTES identity, batched, no config (auto-complete)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["TEXT"], ["TEXT_OUT"])],
        name,
        [helper.make_tensor_value_info("TEXT", TensorProto.STRING, ["batch", 1])],
        [helper.make_tensor_value_info("TEXT_OUT", TensorProto.STRING, ["batch", 1])],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), repo, name, 1, None)


# name, ONNX type, Triton type, numpy dtype, op applied (one input -> one output)
DTYPE_CASES = [
    ("FP32", TensorProto.FLOAT, "TYPE_FP32", np.float32, "Neg"),
    ("FP16", TensorProto.FLOAT16, "TYPE_FP16", np.float16, "Neg"),
    ("INT32", TensorProto.INT32, "TYPE_INT32", np.int32, "Neg"),
    ("INT64", TensorProto.INT64, "TYPE_INT64", np.int64, "Neg"),
    ("BOOL", TensorProto.BOOL, "TYPE_BOOL", np.bool_, "Not"),
    ("BYTES", TensorProto.STRING, "TYPE_STRING", np.object_, "Identity"),
]


def dtypes_onnx() -> bytes:
    """One input and output per datatype, ``IN_<T>`` -> ``OUT_<T>``, batched [-1, 3]."""
    nodes = [helper.make_node(op, [f"IN_{t}"], [f"OUT_{t}"]) for t, _, _, _, op in DTYPE_CASES]
    graph = helper.make_graph(
        nodes,
        "dtypes",
        [helper.make_tensor_value_info(f"IN_{t}", o, [None, 3]) for t, o, *_ in DTYPE_CASES],
        [helper.make_tensor_value_info(f"OUT_{t}", o, [None, 3]) for t, o, *_ in DTYPE_CASES],
    )
    return graph_bytes(graph)


def dtype_inputs(batch: int) -> dict[str, np.ndarray]:
    """Inputs for ``dtypes_onnx``: ``batch`` rows of each datatype, the same every run."""
    rng = np.random.default_rng(7)
    arrays: dict[str, np.ndarray] = {}
    for t, _, _, dtype, _ in DTYPE_CASES:
        if t == "BYTES":
            words = np.array(["héllo", "", "triton", "x y", "42", "ünïcode"], dtype=object)
            arrays[f"IN_{t}"] = rng.choice(words, size=(batch, 3)).astype(object)
        elif t == "BOOL":
            arrays[f"IN_{t}"] = rng.integers(0, 2, size=(batch, 3)).astype(bool)
        else:
            arrays[f"IN_{t}"] = (rng.standard_normal((batch, 3)) * 100).astype(dtype)
    return arrays


def string_add_sub(repo: Path, name: str = "simple_string", config: str | None = None) -> Path:
    """Triton's ``simple_string``: BYTES INPUT0, INPUT1 [-1, 16] holding integers as text ->
    OUTPUT0 = sum, OUTPUT1 = difference, as text. Empty strings are no numbers: the model
    refuses them (a made-up warm-up input of empty strings fails)."""

    def text(tensor: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(tensor, TensorProto.STRING, ["batch", 16])

    nodes = [
        helper.make_node("Cast", ["INPUT0"], ["a"], to=TensorProto.INT32),
        helper.make_node("Cast", ["INPUT1"], ["b"], to=TensorProto.INT32),
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Sub", ["a", "b"], ["diff"]),
        helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=TensorProto.STRING),
        helper.make_node("Cast", ["diff"], ["OUTPUT1"], to=TensorProto.STRING),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [text(n) for n in ("INPUT0", "INPUT1")],
        [text(n) for n in ("OUTPUT0", "OUTPUT1")],
    )
    if config is None:
        config = SIMPLE_CONFIG.replace("simple", name).replace("TYPE_INT32", "TYPE_STRING")
    return _save(helper.make_model(graph, opset_imports=OPSET), repo, name, 1, config)


def with_initializer_input(repo: Path, name: str = "biased") -> Path:
    """FP32 X [3] + B [3] -> Y, where B is also an initializer (ones): an ONNX input a request
    may leave out (``optional: true`` in the config)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["X", "B"], ["Y"])],
        name,
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("B", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(np.ones(3, dtype=np.float32), "B")],
    )
    config = f"""
name: "{name}"
max_batch_size: 0
input [
  {{ name: "X" data_type: TYPE_FP32 dims: [ 3 ] }},
  {{ name: "B" data_type: TYPE_FP32 dims: [ 3 ] optional: true }}
]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 3 ] }} ]
"""
    return _save(helper.make_model(graph, opset_imports=OPSET), repo, name, 1, config)


def scalar_double(repo: Path, name: str = "scalar") -> Path:
    """A rank-0 FP32 X -> Y = 2 X, described in its config with dims [1] (as Triton's ORT
    backend takes scalars)."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["X", "two"], ["Y"])],
        name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.array(2, dtype=np.float32), "two")],
    )
    config = f"""
name: "{name}"
max_batch_size: 0
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 1 ] }} ]
"""
    return _save(helper.make_model(graph, opset_imports=OPSET), repo, name, 1, config)


def bytes_identity(repo: Path, name: str = "simple_identity") -> Path:
    """Triton's ``simple_identity``: BYTES INPUT0 [-1, -1] -> OUTPUT0, unchanged."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        name,
        [helper.make_tensor_value_info("INPUT0", TensorProto.STRING, ["batch", "n"])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.STRING, ["batch", "n"])],
    )
    config = f"""
name: "{name}"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] }} ]
"""
    return _save(helper.make_model(graph, opset_imports=OPSET), repo, name, 1, config)
