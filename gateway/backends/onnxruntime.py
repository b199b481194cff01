"""In-process ONNX Runtime execution.

Each model version gets ``instance_group.count`` sessions and as many worker threads, so that
many batches run at once while the event loop stays free. The CUDA execution provider is used
when it is installed and asked for (``KIND_GPU`` or ``execution_provider = "cuda"``); otherwise,
and always on a CPU-only host, the CPU provider — never a crash.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from gateway import context
from gateway.backends.base import Tensors
from gateway.errors import InvalidInput, ModelLoadError
from gateway.protocol.types import numpy_dtype
from gateway.repository.config import (
    DynamicBatching,
    ModelConfig,
    TensorConfig,
)
from gateway.repository.local import ModelSource
from gateway.settings import Settings

log = logging.getLogger(__name__)

_ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# Triton onnxruntime-backend model parameters -> ``SessionOptions`` attributes. The generated
# python-backend model (``triton_python_model.py``, standalone by necessity) maps the same keys.
THREAD_PARAMETERS = {
    "intra_op_thread_count": "intra_op_num_threads",
    "inter_op_thread_count": "inter_op_num_threads",
}


def choose_providers(settings: Settings, config: ModelConfig) -> list[str]:
    """CUDA first when wanted and present, CPU always as the fallback."""
    available = ort.get_available_providers()
    want_gpu = settings.execution_provider == "cuda" or (
        settings.execution_provider == "auto" and config.instance_kind == "KIND_GPU"
    )
    if want_gpu and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if want_gpu:
        log.warning("model %s asks for a GPU but CUDA is not available; using CPU", config.name)
    return ["CPUExecutionProvider"]


def _dims(shape: Sequence[Any]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape)


def _tensor_meta(
    nodes: Sequence[Any], kind: str, model: str
) -> list[tuple[str, str, tuple[int, ...]]]:
    out = []
    for node in nodes:
        datatype = _ORT_TO_V2.get(node.type)
        if datatype is None:
            raise ModelLoadError(
                f"model '{model}': {kind} '{node.name}' has unsupported type {node.type}"
            )
        out.append((node.name, datatype, _dims(node.shape)))
    return out


def complete_config(config: ModelConfig, session: Any, default_max_batch_size: int) -> ModelConfig:
    """Fill in what ``config.pbtxt`` left out from the ONNX graph, as Triton's auto-complete does,
    and check what it did say against the graph."""
    ins = _tensor_meta(session.get_inputs(), "input", config.name)
    outs = _tensor_meta(session.get_outputs(), "output", config.name)
    if not config.inputs and not config.outputs:
        batchable = all(shape and shape[0] == -1 for _, _, shape in ins + outs)
        max_bs = config.max_batch_size or (default_max_batch_size if batchable else 0)
        cut = 1 if max_bs > 0 else 0
        config = config.with_changes(
            max_batch_size=max_bs,
            inputs=tuple(TensorConfig(n, t, s[cut:]) for n, t, s in ins),
            outputs=tuple(TensorConfig(n, t, s[cut:]) for n, t, s in outs),
            dynamic_batching=config.dynamic_batching or (DynamicBatching() if max_bs else None),
        )
        return config
    if not config.outputs:
        cut = 1 if config.batched else 0
        config = config.with_changes(outputs=tuple(TensorConfig(n, t, s[cut:]) for n, t, s in outs))
    graph = {n: (t, s) for n, t, s in ins + outs}
    for kind, tensors in (("input", config.inputs), ("output", config.outputs)):
        for tensor in tensors:
            if tensor.name not in graph:
                raise ModelLoadError(
                    f"model '{config.name}': config {kind} '{tensor.name}' is not in the ONNX "
                    f"graph (which has {sorted(graph)})"
                )
            datatype, shape = graph[tensor.name]
            if datatype != tensor.datatype:
                raise ModelLoadError(
                    f"model '{config.name}': {kind} '{tensor.name}' is {datatype} in the graph "
                    f"but {tensor.datatype} in the config"
                )
            dims = tensor.reshape if tensor.reshape is not None else tensor.dims
            expected = ((-1,) if config.batched else ()) + dims
            if len(shape) != len(expected) or any(
                g != -1 and e != -1 and g != e for g, e in zip(shape, expected, strict=True)
            ):
                raise ModelLoadError(
                    f"model '{config.name}': {kind} '{tensor.name}' has shape {list(shape)} in "
                    f"the graph, config implies {list(expected)}"
                )
    return config


def inspect_config(source: ModelSource, version: int, default_max_batch_size: int) -> ModelConfig:
    """The completed, checked config of a version that runs elsewhere (a Triton host, another
    gateway): the graph is only read, with optimisations off, and nothing runs here."""
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(
            str(source.version_paths[version]), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise _load_error(source, version, exc) from None
    return complete_config(source.config, session, default_max_batch_size)


def _load_error(source: ModelSource, version: int, exc: Exception) -> ModelLoadError:
    """ORT's message names the file by where it lies on disk; clients see it as the repository
    names it (``1/model.onnx``)."""
    path = source.version_paths[version]
    message = str(exc).replace(str(path), "/".join(path.parts[-2:]))
    return ModelLoadError(f"model '{source.name}' version {version}: {message}")


def _to_ort(array: np.ndarray[Any, Any], name: str) -> np.ndarray[Any, Any]:
    """ORT string tensors hold text: BYTES elements must be UTF-8."""
    if array.dtype.kind != "O":
        return array
    try:
        items = [v.decode() if isinstance(v, bytes) else v for v in array.ravel()]
    except UnicodeDecodeError:
        raise InvalidInput(
            f"input '{name}': ONNX Runtime string tensors must be valid UTF-8"
        ) from None
    return np.array(items, dtype=object).reshape(array.shape)


def _from_ort(array: Any) -> np.ndarray[Any, Any]:
    array = np.asarray(array)
    if array.dtype.kind in ("O", "U"):
        items = [v.encode() if isinstance(v, str) else v for v in array.ravel()]
        return np.array(items, dtype=object).reshape(array.shape)
    return array  # type: ignore[no-any-return]


def warmup_inputs(config: ModelConfig, batch: int) -> Tensors:
    """Zero-filled inputs of a concrete shape, used to pay ORT's first-run cost at load time."""
    feeds: Tensors = {}
    for tensor in config.inputs:
        dims = tensor.reshape if tensor.reshape is not None else tensor.dims
        shape = ((batch,) if config.batched else ()) + tuple(1 if d == -1 else d for d in dims)
        dtype = numpy_dtype(tensor.datatype)
        feeds[tensor.name] = (
            np.full(shape, b"", dtype=object) if dtype.kind == "O" else np.zeros(shape, dtype)
        )
    return feeds


class OnnxRuntimeBackend:
    """``instance_count`` ONNX Runtime sessions of one model version."""

    def __init__(self, config: ModelConfig, sessions: list[Any], providers: list[str], path: str):
        self._config = config
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for session in sessions:
            self._free.put(session)
        self._pool = ThreadPoolExecutor(len(sessions), thread_name_prefix=f"ort-{config.name}")
        self._providers = providers
        self._path = path
        self._count = len(sessions)

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def instance_count(self) -> int:
        return self._count

    def _run(self, inputs: Tensors, outputs: Sequence[str]) -> tuple[Tensors, float]:
        session = self._free.get()
        started = time.perf_counter()
        try:
            feeds = {name: _to_ort(array, name) for name, array in inputs.items()}
            results = session.run(list(outputs), feeds)
        finally:
            self._free.put(session)
        named = {name: _from_ort(value) for name, value in zip(outputs, results, strict=True)}
        return named, time.perf_counter() - started

    def run_sync(self, inputs: Tensors, outputs: Sequence[str]) -> Tensors:
        """Blocking execution, for warm-up and benchmarks."""
        return self._run(inputs, outputs)[0]

    async def execute(
        self, inputs: Tensors, outputs: Sequence[str], deadline_s: float | None = None
    ) -> Tensors:
        loop = asyncio.get_running_loop()
        try:
            result, seconds = await loop.run_in_executor(self._pool, self._run, inputs, outputs)
        except Exception as exc:  # ORT raises its own exception types
            if type(exc).__module__.startswith("onnxruntime"):
                raise InvalidInput(
                    f"model '{self._config.name}' rejected the input: {exc}"
                ) from None
            raise
        context.compute_s.set(seconds)
        return result

    async def close(self) -> None:
        self._pool.shutdown(wait=True)

    def describe(self) -> dict[str, Any]:
        # The file as the repository names it (``1/model.onnx``), not where it lies on disk.
        model_file = "/".join(Path(self._path).parts[-2:])
        return {"backend": "onnxruntime", "providers": self._providers, "model_file": model_file}


class OnnxRuntimeFactory:
    """Loads model versions into in-process ONNX Runtime sessions."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def session_options(self, config: ModelConfig) -> Any:
        """The gateway's thread settings, then the model's own: Triton's onnxruntime-backend
        thread parameters and ``session.*`` config parameters (ONNX Runtime session config
        entries), as the python-backend model on Triton honours them, so one ``config.pbtxt``
        means the same wherever the model runs. Raises ``ValueError`` on a bad thread count."""
        options = ort.SessionOptions()
        if self._settings.intra_op_threads:
            options.intra_op_num_threads = self._settings.intra_op_threads
        if self._settings.inter_op_threads:
            options.inter_op_num_threads = self._settings.inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning between a run's ops keeps its threads in step (measured: a batch of 64 of
        # mlp 6 % faster); spinning after the run returns takes a core from the event loop
        # while it answers that batch. So: spin while a run goes, stop when it returns, unless
        # several instances share the cores (a spinning thread would wait on a preempted one).
        runs_alone = config.instance_count == 1
        spin = "1" if self._settings.ort_spinning or runs_alone else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if not self._settings.ort_spinning and runs_alone:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        for key, value in config.parameters:
            if key in THREAD_PARAMETERS:
                try:
                    count = int(value)
                except ValueError:
                    count = -1
                if count < 0:
                    raise ValueError(
                        f"parameters '{key}' must be a whole number >= 0 (0: ONNX Runtime's "
                        f"default), got {value!r}"
                    )
                setattr(options, THREAD_PARAMETERS[key], count)
            elif key.startswith("session."):
                options.add_session_config_entry(key, value)
        return options

    def _load_sync(self, source: ModelSource, version: int) -> OnnxRuntimeBackend:
        path = source.version_paths[version]
        providers = choose_providers(self._settings, source.config)
        sessions = []
        try:
            for _ in range(source.config.instance_count):
                sessions.append(
                    ort.InferenceSession(
                        str(path), self.session_options(source.config), providers=providers
                    )
                )
        except Exception as exc:
            raise _load_error(source, version, exc) from None
        providers = sessions[0].get_providers()
        config = complete_config(source.config, sessions[0], self._settings.default_max_batch_size)
        backend = OnnxRuntimeBackend(config, sessions, providers, str(path))
        if self._settings.warmup:
            outputs = [t.name for t in config.outputs]
            sizes = {1, config.max_batch_size} if config.batched else {1}
            for size in sorted(sizes):
                for _ in range(len(sessions)):
                    try:
                        backend.run_sync(warmup_inputs(config, size), outputs)
                    except Exception as exc:
                        raise ModelLoadError(
                            f"model '{source.name}' version {version}: warm-up failed: {exc}"
                        ) from None
        return backend

    async def load(self, source: ModelSource, version: int) -> OnnxRuntimeBackend:
        return await asyncio.to_thread(self._load_sync, source, version)
