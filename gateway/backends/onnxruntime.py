"""In-process ONNX Runtime execution.

Each model version gets ``instance_group.count`` sessions and as many worker threads, so that
many batches run at once while the event loop stays free.

Where a session runs (:func:`plan_providers`): ``execution_provider = "cpu"`` never uses CUDA;
``"cuda"`` puts every model on CUDA; ``"auto"`` asks CUDA for ``KIND_GPU`` and ``KIND_AUTO``
models (no ``instance_group`` is ``KIND_AUTO``) and the CPU for ``KIND_CPU`` ones. ONNX Runtime
never refuses a CUDA session: it falls back to the CPU when the driver, the CUDA libraries or
the GPU itself are missing, and ``get_available_providers()`` lists CUDA whenever
``onnxruntime-gpu`` is installed. So every session's ``get_providers()`` is compared with what
was asked for: on the CPU against ``"cuda"``, the load fails; against ``KIND_GPU``, an error is
logged and ``gateway_model_cpu_fallback`` says so; against ``KIND_AUTO``, a warning. ORT's
run-time fallback (a failing CUDA run retried on the CPU, for good) is switched off: such a
batch fails with 503.

Why one module of this size: each session's providers are checked as it is made, so the CUDA
placement, pins and fallback checks sit beside session creation; a providers module is the
next split if it grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

from gateway import tracing
from gateway.backends.base import Backend, BackendFactory, Executed, Tensors
from gateway.errors import InvalidInput, ModelLoadError, ModelNotReady, Unavailable
from gateway.protocol.tensors import split_bytes
from gateway.protocol.types import numpy_dtype
from gateway.repository.config import (
    DynamicBatching,
    ModelConfig,
    TensorConfig,
    WarmupSample,
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

# Triton onnxruntime-backend model parameters -> ``SessionOptions`` attributes. The pushed
# python-backend model (``triton_model/model.py``, standalone by necessity) maps the same keys.
THREAD_PARAMETERS = {
    "intra_op_thread_count": "intra_op_num_threads",
    "inter_op_thread_count": "inter_op_num_threads",
}


CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# The newest onnxruntime-gpu on PyPI built for each CUDA major, and the oldest Linux driver that
# runs that major (CUDA minor-version compatibility). 1.27 was the first built for CUDA 13, which
# also dropped GPUs older than Turing (Maxwell, Pascal, Volta). The Dockerfile, the manifests and
# scripts/gpu_check.sh name these pins; tests/test_deploy.py keeps them in step.
CUDA_BUILDS: dict[int, tuple[str, str]] = {12: ("1.26.0", "525.60.13"), 13: ("1.31.1", "580.65.06")}
_ARENA_STRATEGIES = {
    "next_power_of_two": "kNextPowerOfTwo",
    "same_as_requested": "kSameAsRequested",
}
_CONV_SEARCH = {"heuristic": "HEURISTIC", "exhaustive": "EXHAUSTIVE", "default": "DEFAULT"}
# How ORT words a CUDA library error in a run ("CUDA failure 700: an illegal memory access ...;
# GPU=0 ; ...") or an arena that cannot grow: the device's fault, not the request's.
_DEVICE_FAILURE = re.compile(
    r"\b(?:CUDA|CUBLAS|CUDNN|CUFFT|CURAND|CUSPARSE|NCCL) failure \d+|Failed to allocate memory"
)


@dataclass(frozen=True, slots=True)
class ProviderPlan:
    """Where one model version's sessions are to run, decided before any is created.

    ``device_ids``: one CUDA device per session (empty: CPU sessions only). ``need``: what a
    session that ends up on the CPU all the same means: ``required`` (``execution_provider =
    "cuda"``: the load fails), ``expected`` (``KIND_GPU``: an error log, ``cpu_fallback``),
    ``optional`` (``KIND_AUTO``: a warning), ``none`` (the CPU was asked for).
    """

    device_ids: tuple[int, ...]
    need: str

    @property
    def cuda(self) -> bool:
        return bool(self.device_ids)


def build_info() -> str:
    """``onnxruntime-gpu 1.26.0 (CUDA 12.8)``: the ONNX Runtime installed, for messages."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:  # pragma: no cover - present in every release the gateway supports
        return f"onnxruntime {ort.__version__}"
    cuda = getattr(info, "cuda_version", "")
    return f"{info.package_name} {ort.__version__}" + (f" (CUDA {cuda})" if cuda else "")


def _pins() -> str:
    return ", ".join(
        f"onnxruntime-gpu[cuda,cudnn]=={version} for CUDA {major} (driver >= {driver})"
        for major, (version, driver) in sorted(CUDA_BUILDS.items())
    )


def plan_providers(
    settings: Settings, config: ModelConfig, available: Sequence[str]
) -> ProviderPlan:
    """CUDA or CPU sessions for a model, from the setting, its ``instance_group`` and whether
    this ONNX Runtime has the CUDA provider at all. Raises ``ModelLoadError`` when CUDA is
    required and cannot even be tried. ``instance_count`` sessions go on each of the group's
    ``gpus``, as in Triton; without ``gpus``, on ``cuda_device_id``."""
    mode, kind = settings.execution_provider, config.instance_kind
    if mode == "cpu" or (mode == "auto" and kind == "KIND_CPU"):
        return ProviderPlan((), "none")
    need = "required" if mode == "cuda" else "expected" if kind == "KIND_GPU" else "optional"
    if CUDA not in available:
        if need == "required":
            raise ModelLoadError(
                f"model '{config.name}': execution_provider is \"cuda\" but {build_info()} has no "
                f"CUDA execution provider (it has {list(available)}); install {_pins()}"
            )
        return ProviderPlan((), need)
    gpus = config.instance_gpus or (settings.cuda_device_id,)
    return ProviderPlan(tuple(g for g in gpus for _ in range(config.instance_count)), need)


def cuda_options(settings: Settings, device_id: int) -> dict[str, str]:
    """The CUDA execution provider's options for one session (ORT takes them as strings)."""
    options = {
        "device_id": str(device_id),
        "arena_extend_strategy": _ARENA_STRATEGIES[settings.cuda_arena_extend_strategy],
        "cudnn_conv_algo_search": _CONV_SEARCH[settings.cudnn_conv_algo_search],
    }
    if settings.cuda_mem_limit_bytes:
        options["gpu_mem_limit"] = str(settings.cuda_mem_limit_bytes)
    return options


def preload_cuda_libraries() -> str:
    """Load the CUDA and cuDNN libraries that pip's ``nvidia-*`` wheels installed, so the CUDA
    provider finds them outside the image too (where ``ldconfig`` does not know their
    directories). ``onnxruntime.preload_dlls`` (1.21+) prints what it could not load; that text
    is returned, for the log and for the error if CUDA then fails."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return f"{build_info()} has no preload_dlls (1.21+)"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            preload()
    except Exception as exc:  # a bad directory, a library that loads but fails to initialise
        return f"{printed.getvalue()}preload_dlls failed: {exc}".strip()
    return printed.getvalue().strip()


def _missing_libraries(preload_note: str) -> list[str]:
    """``libcublasLt.so.12`` ... from preload_dlls' "Failed to load <path>: ..." lines."""
    names = re.findall(r"Failed to load (\S+?):", preload_note)
    return sorted({Path(name).name for name in names})


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, hyperthread siblings counted once
    (as ONNX Runtime counts its default threads), within a cgroup CPU quota when there is one
    (a container's CPU limit)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            cores.add((package, (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("", str(cpu)))
    count = len(cores) or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return count


def _fit(instances: int, threads: int, cores: int) -> bool:
    """Whether ``instances`` pools of ``threads`` (0: ORT's one per core) fit in ``cores``."""
    return instances * (threads or cores) <= cores


def default_intra_op_threads(cores: int) -> int:
    """ONNX Runtime's intra-op threads per session when neither the setting nor the model says:
    one per usable core, ORT's own count, but within the process's affinity and cgroup quota
    (which ORT itself does not read). Measured quiet on 2 cores
    (bench/results/ort_threads-quiet.md): against one thread less than the cores, ``mlp``
    1.36-1.39x the throughput at 1 and 16 connections, 0.83-1.02x at 64; one thread less won
    everywhere only when other work oversubscribed the cores. Set ``intra_op_threads`` below
    the cores there."""
    return max(1, cores)


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
    # Inputs with an initializer (ORT lists them apart) may be fed or left out: the config names
    # them as ``optional: true`` inputs, as Triton's ORT backend allows.
    overridable = _tensor_meta(session.get_overridable_initializers(), "input", config.name)
    graph = {n: (t, s) for n, t, s in ins + overridable + outs}
    checked: dict[str, tuple[TensorConfig, ...]] = {}
    for kind, tensors in (("input", config.inputs), ("output", config.outputs)):
        kept = []
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
            if not shape and not config.batched and tensor.dims == (1,) and tensor.reshape is None:
                # A scalar (rank 0) in the graph, [1] in the config: the one element, reshaped
                # on the way in and out, as Triton's ORT backend takes it.
                tensor = replace(tensor, reshape=())
            dims = tensor.reshape if tensor.reshape is not None else tensor.dims
            expected = ((-1,) if config.batched else ()) + dims
            if len(shape) != len(expected) or any(
                g != -1 and e != -1 and g != e for g, e in zip(shape, expected, strict=True)
            ):
                raise ModelLoadError(
                    f"model '{config.name}': {kind} '{tensor.name}' has shape {list(shape)} in "
                    f"the graph, config implies {list(expected)}"
                )
            kept.append(tensor)
        checked[kind] = tuple(kept)
    return config.with_changes(inputs=checked["input"], outputs=checked["output"])


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


def _to_ort(array: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], bool]:
    """An input as ORT's Python binding takes it, and whether it went as raw bytes.

    ORT string tensors hold bytes (Triton's ORT backend passes BYTES through as they are), but
    its Python binding only takes ``str``, which it writes as UTF-8. Text that is UTF-8 goes as
    text. Anything else (raw bytes: an image, a serialized record) goes one character per byte
    (latin-1), and the run's string outputs come back the same way (``_from_ort``): a model that
    passes or slices the bytes sees and returns them unchanged."""
    if array.dtype.kind != "O":
        return array, False
    flat = array.ravel()
    try:
        items = [v.decode() if isinstance(v, bytes) else v for v in flat]
        raw = False
    except UnicodeDecodeError:
        items = [v.decode("latin-1") if isinstance(v, bytes) else v for v in flat]
        raw = True
    return np.array(items, dtype=object).reshape(array.shape), raw


def _from_ort(array: Any, raw: bool = False) -> np.ndarray[Any, Any]:
    array = np.asarray(array)
    if array.dtype.kind in ("O", "U"):
        items = [_text_bytes(v, raw) if isinstance(v, str) else v for v in array.ravel()]
        return np.array(items, dtype=object).reshape(array.shape)
    return array  # type: ignore[no-any-return]


def _text_bytes(text: str, raw: bool) -> bytes:
    """A string output as bytes: back to the raw bytes when the inputs went as such."""
    if raw:
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError:
            pass
    return text.encode()


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


def warmup_sample_inputs(config: ModelConfig, sample: WarmupSample, files: Path) -> Tensors:
    """A ``model_warmup`` sample's inputs as the backend takes them: ``batch_size`` rows (none
    when the model does not batch) of zeros, random values or a file's bytes (one row, repeated;
    BYTES elements length-prefixed), reshaped where the config says."""
    rng = np.random.default_rng(0)
    feeds: Tensors = {}
    for item in sample.inputs:
        dtype = numpy_dtype(item.datatype)
        count = int(np.prod(item.dims))
        if item.data == "file":
            try:
                raw = (files / item.file).read_bytes()
            except OSError as exc:
                raise ModelLoadError(
                    f"model '{config.name}': model_warmup '{sample.name}' input '{item.name}': "
                    f"warmup/{item.file} cannot be read: {exc.strerror or exc}"
                ) from None
            try:
                if dtype.kind == "O":
                    row = split_bytes(raw, count, item.name)
                else:
                    row = np.frombuffer(raw, dtype=dtype, count=count)
            except (InvalidInput, ValueError) as exc:
                raise ModelLoadError(
                    f"model '{config.name}': model_warmup '{sample.name}' input '{item.name}': "
                    f"warmup/{item.file} does not hold {count} {item.datatype} elements ({exc})"
                ) from None
        elif dtype.kind == "O":
            row = np.full(count, b"", dtype=object)  # Triton's zero (and random) strings
        elif item.data == "random" and dtype.kind == "f":
            row = rng.standard_normal(count).astype(dtype)
        elif item.data == "random" and dtype.kind in "iu":
            row = rng.integers(0, 128, count).astype(dtype)
        elif item.data == "random" and dtype.kind == "b":
            row = rng.integers(0, 2, count).astype(dtype)
        else:
            row = np.zeros(count, dtype)
        spec = config.input(item.name)
        dims = spec.reshape if spec is not None and spec.reshape is not None else item.dims
        if config.batched:
            feeds[item.name] = np.stack([row] * sample.batch_size).reshape(
                (sample.batch_size, *dims)
            )
        else:
            feeds[item.name] = row.reshape(dims)
    return feeds


# A batch for a runner thread: inputs, output names, the caller's loop and its future.
_Job = tuple[Tensors, Sequence[str], asyncio.AbstractEventLoop, "asyncio.Future[Executed]"]


def _settle(
    done: asyncio.Future[Executed], result: Executed | None, error: BaseException | None
) -> None:
    """On the caller's loop: answer its future, unless the caller stopped waiting."""
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
    else:
        assert result is not None
        done.set_result(result)


def _name_os_thread(name: str) -> None:
    """Give this thread ``name`` (its first 15 bytes) in the OS too, where ``top -H``, ``perf``
    and ``/proc/<pid>/task/*/comm`` show it (Linux; elsewhere nothing): runner threads then
    stand apart from the event loop and ORT's pool threads (``bench/thread_split.py``)."""
    with contextlib.suppress(Exception):  # no libc prctl (not Linux): only a name
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def _entry_of(session: Any, key: str) -> str | None:
    """A session's config entry (None: a stand-in session, or one without the entry)."""
    try:
        return str(session.get_session_options().get_session_config_entry(key))
    except Exception:  # ORT raises when the entry is not there
        return None


def _spinning(session: Any) -> bool | None:
    """Whether a session's intra-op threads may spin (None: a session that does not say; ORT's
    default then is to spin)."""
    entry = _entry_of(session, "session.intra_op.allow_spinning")
    return None if entry is None else entry != "0"


@dataclass(frozen=True, slots=True)
class Instance:
    """One session: the provider it really runs on (``get_providers()[0]``) and, on CUDA, the
    device it was asked for."""

    provider: str
    device_id: int | None = None


class OnnxRuntimeBackend(Backend):
    """``instance_count`` ONNX Runtime sessions of one model version."""

    def __init__(
        self,
        config: ModelConfig,
        sessions: list[Any],
        providers: list[str],
        path: str,
        instances: Sequence[Instance] = (),
        cpu_fallback: bool = False,
        inline: bool = True,
        lone: Any = None,
    ):
        """``inline``: whether ``execute_now`` may run a batch on the caller's thread.
        ``lone``: a session of its own for those batches (``ort_lone_spin_us``)."""
        self._config = config
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for session in sessions:
            self._free.put(session)
        # The spinning session for lone batches: taken while one runs, so a second loop
        # (another front end's) falls back to the shared sessions.
        self._lone: queue.SimpleQueue[Any] | None = None
        if lone is not None:
            self._lone = queue.SimpleQueue()
            self._lone.put(lone)
        # Batches go to threads of our own, one per session, each answering its caller's
        # event loop straight from the thread (``call_soon_threadsafe``): half the round trip of
        # ``run_in_executor``, whose two futures chained across the threads cost the loop as
        # much again (measured: a no-op job 25 us against 50 us, bench/results/lone_request.md).
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._providers = providers
        self._path = path
        self._count = len(sessions)
        self._instances = tuple(instances) or tuple(Instance(providers[0]) for _ in sessions)
        self._cpu_fallback = cpu_fallback
        self._on_gpu = any(i.provider == CUDA for i in self._instances)
        self._device_failures = 0
        self.inline = inline
        self.spinning = _spinning(sessions[0]) if sessions else None
        bound = _entry_of(sessions[0], "session.intra_op.spin_duration_us") if sessions else None
        # how long a pool thread spins at most before it sleeps (ort_long_spin_us), if bounded
        self.spin_duration_us = int(bound) if self.spinning and bound else None

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def instance_count(self) -> int:
        return self._count

    def _run(
        self,
        inputs: Tensors,
        outputs: Sequence[str],
        session: Any = None,
        home: queue.SimpleQueue[Any] | None = None,
    ) -> Executed:
        """One run (on ``session``, taken from ``home``, else the next free one): the outputs,
        and how long it took (of which, handing the inputs over and reading the outputs back:
        Triton's compute_input and compute_output)."""
        home = self._free if home is None else home
        if session is None:
            session = self._free.get()
        started = time.perf_counter()
        try:
            feeds, raw = {}, False
            for name, array in inputs.items():
                feeds[name], as_bytes = _to_ort(array)
                raw = raw or as_bytes
            fed = time.perf_counter()
            results = session.run(list(outputs), feeds)
        finally:
            home.put(session)
        ran = time.perf_counter()
        named = {name: _from_ort(value, raw) for name, value in zip(outputs, results, strict=True)}
        done = time.perf_counter()
        return Executed(named, "", done - started, fed - started, done - ran)

    def run_sync(self, inputs: Tensors, outputs: Sequence[str], lone: bool = False) -> Tensors:
        """Blocking execution, for warm-up and benchmarks (``lone``: on the session for lone
        batches where there is one, as ``execute_now`` runs)."""
        if lone and self._lone is not None:
            return self._run(inputs, outputs, self._lone.get(), self._lone).outputs
        return self._run(inputs, outputs).outputs

    @property
    def lone_session(self) -> bool:
        """Whether lone batches run on a spinning session of their own."""
        return self._lone is not None

    async def execute(
        self, inputs: Tensors, outputs: Sequence[str], deadline_s: float | None = None
    ) -> Executed:
        loop = asyncio.get_running_loop()
        if not self._threads:
            if self._closed:
                raise ModelNotReady(f"model '{self._config.name}' is unloading")
            self._start_threads()
        done: asyncio.Future[Executed] = loop.create_future()
        self._jobs.put((inputs, outputs, loop, done))
        try:
            with tracing.span(tracing.ORT_RUN):
                ran = await done
        except Exception as exc:  # ORT raises its own exception types
            failure = self._failure(exc)
            if failure is exc:
                raise
            raise failure from None
        return ran

    def execute_now(self, inputs: Tensors, outputs: Sequence[str]) -> Executed | None:
        """``Backend.execute_now``: the run on this thread, if a session is free."""
        if not self.inline:
            return None
        home, session = self._free, None
        if self._lone is not None:  # the spinning session for lone batches, when free
            with contextlib.suppress(queue.Empty):
                session, home = self._lone.get_nowait(), self._lone
        if session is None:
            try:
                session, home = self._free.get_nowait(), self._free
            except queue.Empty:
                return None
        try:
            with tracing.span(tracing.ORT_RUN):
                return self._run(inputs, outputs, session, home)
        except Exception as exc:
            failure = self._failure(exc)
            if failure is exc:
                raise
            raise failure from None

    def _failure(self, exc: Exception) -> Exception:
        """What a failed run raises: the device's fault (503), the input's (400), or as is."""
        if isinstance(exc, EPFail) or (self._on_gpu and _DEVICE_FAILURE.search(str(exc))):
            return self._device_failed(exc)
        if type(exc).__module__.startswith("onnxruntime"):
            return InvalidInput(f"model '{self._config.name}' rejected the input: {exc}")
        return exc

    def _device_failed(self, exc: Exception) -> Unavailable:
        """A run the execution provider failed (fallback is off): the server's fault (503),
        logged at error level, the 1st time and every 1000th after."""
        self._device_failures += 1
        if self._device_failures % 1000 == 1:
            log.error(
                "model %s: execution provider failure (%d so far): %s",
                self._config.name,
                self._device_failures,
                exc,
            )
        return Unavailable(f"model '{self._config.name}': the execution provider failed: {exc}")

    def _start_threads(self) -> None:
        for number in range(self._count):
            thread = threading.Thread(
                target=self._serve, name=f"ort-{self._config.name}-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _serve(self) -> None:
        """One runner thread: take a batch, run it, hand the result to its caller's loop. A
        batch whose caller went away while it was queued is skipped."""
        _name_os_thread(threading.current_thread().name)
        while (job := self._jobs.get()) is not None:
            inputs, outputs, loop, done = job
            if done.cancelled():
                continue
            result: Executed | None = None
            error: BaseException | None = None
            try:
                result = self._run(inputs, outputs)
            except BaseException as exc:  # answered on the loop, as run_in_executor would
                error = exc
            del job, inputs  # hold no request's tensors while waiting for the next batch
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_settle, done, result, error)
            done = result = error = None  # type: ignore[assignment]

    async def close(self) -> None:
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        threads, self._threads = self._threads, []
        for thread in threads:
            await asyncio.to_thread(thread.join)

    def describe(self) -> dict[str, Any]:
        # The file as the repository names it (``1/model.onnx``), not where it lies on disk.
        model_file = "/".join(Path(self._path).parts[-2:])
        facts: dict[str, Any] = {
            "backend": "onnxruntime",
            "providers": self._providers,
            "model_file": model_file,
            # Sessions per provider they really run on: gateway_model_execution_provider.
            "instance_providers": dict(Counter(i.provider for i in self._instances)),
            # A GPU was asked for (cuda, KIND_GPU) and some session runs on the CPU.
            "cpu_fallback": self._cpu_fallback,
        }
        devices = sorted({i.device_id for i in self._instances if i.device_id is not None})
        if devices:
            facts["cuda_device_ids"] = devices
        if self.spinning is not None:  # whether ORT's intra-op threads busy-wait (README)
            facts["ort_spinning"] = self.spinning
            if self.spin_duration_us is not None:  # each wait at most this long
                facts["ort_spin_duration_us"] = self.spin_duration_us
        if self._lone is not None:  # lone batches on a spinning session (ort_lone_spin_us)
            facts["ort_lone_session"] = True
        return facts


class OnnxRuntimeFactory(BackendFactory):
    """Loads model versions into in-process ONNX Runtime sessions."""

    def __init__(
        self,
        settings: Settings,
        *,
        available_providers: Callable[[], Sequence[str]] = ort.get_available_providers,
        new_session: Callable[..., Any] = ort.InferenceSession,
        preload: Callable[[], str] = preload_cuda_libraries,
        cores: Callable[[], int] = usable_cores,
    ) -> None:
        """The ONNX Runtime seams are parameters so tests can stand in for a CUDA build on a
        machine without one: what the build offers, how a session is made, the CUDA
        library preload (run once, before the first CUDA session), the usable core count."""
        self._settings = settings
        self._available = available_providers
        self._new_session = new_session
        self._preload = preload
        self._cores = cores
        self._preload_lock = threading.Lock()
        self._preload_note: str | None = None

    def _preloaded(self) -> str:
        with self._preload_lock:
            if self._preload_note is None:
                self._preload_note = self._preload()
                if self._preload_note:
                    log.info("CUDA library preload: %s", self._preload_note)
            return self._preload_note

    def session_options(
        self, config: ModelConfig, spin: bool | None = None, lone_us: int = 0
    ) -> Any:
        """The gateway's thread settings, then the model's own: Triton's onnxruntime-backend
        thread parameters and ``session.*`` config parameters (ONNX Runtime session config
        entries), as the python-backend model on Triton honours them, so one ``config.pbtxt``
        means the same wherever the model runs. Raises ``ValueError`` on a bad thread count.
        ``spin=False``: no spinning where the rule below would spin while a run goes (what
        :meth:`spin_probe` decides at load). ``lone_us`` > 0: a session for lone batches
        (``ort_lone_spin_us``), whose pool spins while a run goes and that long after."""
        options = ort.SessionOptions()
        cores = self._cores()
        options.intra_op_num_threads = self._settings.intra_op_threads or (
            default_intra_op_threads(cores)
        )
        if self._settings.inter_op_threads:
            options.inter_op_num_threads = self._settings.inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        given = set()
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
                given.add(key)
        # Spinning between a run's ops keeps its threads in step (measured: a batch of 64 of
        # mlp 6 % faster) while each has a core of its own; a thread that spins waiting for a
        # preempted one wastes the core the other needs (measured on 2 oversubscribed cores:
        # lone requests 1.5-3x slower, bench/results/ort_threads.md), and spinning after the
        # run returns takes a core from the event loop while it answers that batch. So: spin
        # while a run goes, stop when it returns, only while every instance's pool fits in the
        # cores; never otherwise. ``ort_spinning``: ORT's own default.
        fits = _fit(config.instance_count, options.intra_op_num_threads, cores)
        while_running = fits and not self._settings.ort_spinning and spin is not False
        spinning = "1" if self._settings.ort_spinning or while_running else "0"
        entries = {
            "session.intra_op.allow_spinning": spinning,
            "session.inter_op.allow_spinning": spinning,
        }
        if while_running:
            entries["session.force_spinning_stop"] = "1"
        bound_us = self._settings.ort_long_spin_us
        if spin is False and fits and not self._settings.ort_spinning and bound_us > 0:
            # Runs too long to spin freely still spin while a run goes, each wait at most
            # ``ort_long_spin_us``: the next op finds its threads awake, and a thread that
            # waits on a preempted one burns that much at most.
            entries = {
                "session.intra_op.allow_spinning": "1",
                "session.inter_op.allow_spinning": "1",
                "session.intra_op.spin_duration_us": str(bound_us),
                "session.force_spinning_stop": "1",
            }
        if lone_us > 0:
            entries = {
                "session.intra_op.allow_spinning": "1",
                "session.inter_op.allow_spinning": "1",
                "session.intra_op.spin_duration_us": str(lone_us),
            }
        for key, value in entries.items():
            if key not in given:  # the model's own word wins
                options.add_session_config_entry(key, value)
        return options

    def spin_probe(self, config: ModelConfig) -> bool:
        """Whether spinning while a run goes is left to the run's length, timed at load
        (``ort_spin_max_run_ms``): where the pools fit in the cores (else nothing spins),
        ``ort_spinning`` is off (else ORT spins as it likes), the pool has threads of its own
        beside the caller's and the model says nothing itself."""
        with contextlib.suppress(Exception):  # a bad thread count (the load says), no entry
            options = self.session_options(config)
            if options.get_session_config_entry("session.force_spinning_stop") != "1":
                return False
            if options.intra_op_num_threads == 1:
                return False
            return not any(key == "session.intra_op.allow_spinning" for key, _ in config.parameters)
        return False

    def _batch1_cpu_ms(self, session: Any, config: ModelConfig, where: str) -> float | None:
        """The CPU a batch-1 run of a session that does not spin takes on its calling thread
        (made-up inputs; the least of two to five runs after a first one, within 0.2 s: the
        caller's CPU includes its waits for a preempted pool thread, which the least run has
        least of). None: the model refuses made-up inputs."""
        try:
            full = complete_config(config, session, self._settings.default_max_batch_size)
            feeds = warmup_inputs(full, 1)
            outputs = [t.name for t in full.outputs]
            session.run(outputs, feeds)
            taken: list[float] = []
            until = time.monotonic() + 0.2
            while len(taken) < 2 or (len(taken) < 5 and time.monotonic() < until):
                started = time.thread_time()
                session.run(outputs, feeds)
                taken.append(time.thread_time() - started)
        except Exception as exc:
            log.info("%s: batch-1 run not timed (%s); ORT's threads do not spin", where, exc)
            return None
        return min(taken) * 1e3

    def _short_runs(self, cpu_ms: float | None, where: str) -> bool:
        """Whether a batch-1 run (:meth:`_batch1_cpu_ms`) takes at most ``ort_spin_max_run_ms``.
        A model that refuses made-up inputs does not spin: the choice that costs least where
        the cores are shared."""
        limit = self._settings.ort_spin_max_run_ms
        if cpu_ms is None or limit <= 0:
            return False
        short = cpu_ms <= limit
        log.info(
            "%s: a batch-1 run takes %.1f ms of its thread's CPU (ort_spin_max_run_ms %g): "
            "ORT's threads %s",
            where,
            cpu_ms,
            limit,
            "spin while a run goes" if short else "do not spin",
        )
        return short

    def _load_sync(self, source: ModelSource, version: int) -> OnnxRuntimeBackend:
        path = source.version_paths[version]
        plan = plan_providers(self._settings, source.config, self._available())
        note = self._preloaded() if plan.cuda else ""
        wanted: list[int | None] = list(plan.device_ids) or [None] * source.config.instance_count
        # CPU sessions whose pools may spin: the first is made without spinning and timed;
        # only a model whose runs are short makes its sessions spin (``ort_spin_max_run_ms``).
        probe = not plan.cuda and self.spin_probe(source.config)
        spin: bool | None = False if probe else None
        lone_us = self._settings.ort_lone_spin_us if self._settings.inline_max_ms > 0 else 0
        timed = probe and (self._settings.ort_spin_max_run_ms > 0 or lone_us > 0)
        where = f"model '{source.name}' version {version}"
        sessions: list[Any] = []
        lone: Any = None
        try:
            for device_id in wanted:
                providers: list[Any] = [CPU]
                if device_id is not None:
                    providers = [(CUDA, cuda_options(self._settings, device_id)), CPU]
                session = self._new_session(
                    str(path), self.session_options(source.config, spin), providers=providers
                )
                if timed and not sessions:
                    cpu_ms = self._batch1_cpu_ms(session, source.config, where)
                    if self._short_runs(cpu_ms, where):
                        spin = None
                        session = self._new_session(
                            str(path), self.session_options(source.config), providers=providers
                        )
                    elif lone_us > 0 and cpu_ms is not None:
                        # Too long to spin under load, short enough to run inline when alone:
                        # a second session, spinning, for lone batches only.
                        if cpu_ms <= self._settings.inline_max_ms:
                            lone = self._new_session(
                                str(path),
                                self.session_options(source.config, lone_us=lone_us),
                                providers=providers,
                            )
                            lone.disable_fallback()
                            log.info("%s: a spinning session for lone batches", where)
                # ORT retries a run whose provider failed on the CPU, and keeps the session on
                # the CPU from then on: a GPU that fails would turn into a slow success.
                session.disable_fallback()
                sessions.append(session)
        except Exception as exc:
            raise _load_error(source, version, exc) from None
        instances = []
        for session, device_id in zip(sessions, wanted, strict=True):
            provider = session.get_providers()[0]
            instances.append(Instance(provider, device_id if provider == CUDA else None))
        cpu_fallback = self._check_placement(source, version, plan, instances, note)
        config = complete_config(source.config, sessions[0], self._settings.default_max_batch_size)
        # A lone batch may run on the loop's thread whatever the pool's size: the loop's
        # thread then is the run's calling thread, as the runner's would be, and nothing else
        # is outstanding. (Gated on the pool fitting beside the loop until issue 21's third
        # session, that kept it off on every machine of 2+ cores with the default thread
        # count; measured on 2 cores with a pool of 2, bench/results/lone_request-inline.md:
        # the ORT run inline 0.92-1.01x the runner's, lone `simple` p50 0.46-0.60x.)
        backend = OnnxRuntimeBackend(
            config,
            sessions,
            sessions[0].get_providers(),
            str(path),
            instances,
            cpu_fallback,
            lone=lone,
        )
        outputs = [t.name for t in config.outputs]
        if config.model_warmup:  # Triton's: the config's samples, and a failure fails the load
            for sample in config.model_warmup:
                feeds = warmup_sample_inputs(config, sample, source.directory / "warmup")
                for i in range(sample.count * (len(sessions) + (lone is not None))):
                    try:
                        backend.run_sync(feeds, outputs, lone=i >= sample.count * len(sessions))
                    except Exception as exc:
                        raise ModelLoadError(
                            f"{where}: model_warmup '{sample.name}' failed: {exc}"
                        ) from None
        elif self._settings.warmup:
            # The gateway's own: made-up inputs, which a model may rightly refuse (a BYTES input
            # it parses as numbers): then it only logs, and the first request pays ORT's start.
            sizes = {1, config.max_batch_size} if config.batched else {1}
            if plan.cuda and config.batched and config.dynamic_batching is not None:
                # CUDA picks kernels (cuDNN's convolution search) per input shape, at its first
                # run: pay that now for the batch sizes the batcher aims at.
                sizes |= set(config.dynamic_batching.preferred_batch_sizes)
            try:
                for size in sorted(sizes):
                    for i in range(len(sessions) + (lone is not None)):
                        backend.run_sync(
                            warmup_inputs(config, size), outputs, lone=i == len(sessions)
                        )
            except Exception as exc:
                log.warning("%s: warm-up with made-up inputs skipped: %s", where, exc)
        return backend

    def _check_placement(
        self,
        source: ModelSource,
        version: int,
        plan: ProviderPlan,
        instances: Sequence[Instance],
        preload_note: str,
    ) -> bool:
        """Compare where the sessions run with the plan; True when a GPU was asked for (cuda
        or KIND_GPU) and some session runs on the CPU. Raises ``ModelLoadError`` for cuda."""
        where = f"model '{source.name}' version {version}"
        if plan.need == "none":
            return False
        on_cpu = [i for i, instance in enumerate(instances) if instance.provider != CUDA]
        if not on_cpu:
            log.info(
                "%s runs on CUDA devices %s",
                where,
                sorted({i.device_id for i in instances if i.device_id is not None}),
            )
            return False
        if not plan.cuda:  # this ONNX Runtime has no CUDA provider (the CPU package)
            if plan.need == "expected":
                log.error(
                    "%s: instance_group asks for KIND_GPU but %s has no CUDA execution "
                    "provider; running on the CPU (install %s)",
                    where,
                    build_info(),
                    _pins(),
                )
            return plan.need == "expected"
        devices = sorted({plan.device_ids[i] for i in on_cpu})
        missing = _missing_libraries(preload_note)
        why = (
            f"{build_info()} could not use CUDA device(s) {devices} and ONNX Runtime fell back to "
            f"the CPU ({len(on_cpu)} of {len(instances)} sessions); ONNX Runtime's own log says "
            "why. Usual causes: no GPU visible to the process (nvidia-smi, "
            "NVIDIA_VISIBLE_DEVICES, the nvidia.com/gpu request), a driver too old for the "
            "CUDA major the package was built for, missing CUDA/cuDNN libraries"
            + (f" (not found: {', '.join(missing)})" if missing else "")
            + f". Builds: {_pins()}"
        )
        if plan.need == "required":
            raise ModelLoadError(f'{where}: execution_provider is "cuda" but {why}')
        if plan.need == "expected":
            log.error("%s: instance_group asks for KIND_GPU but %s", where, why)
            return True
        log.warning("%s (KIND_AUTO) runs on the CPU: %s", where, why)
        return False

    async def load(self, source: ModelSource, version: int) -> OnnxRuntimeBackend:
        return await asyncio.to_thread(self._load_sync, source, version)
