"""Model configuration: the subset of Triton's ``config.pbtxt`` the gateway honours, as types.

What it owns: the frozen dataclasses that mirror the protobuf messages the gateway honours
(tensors, dynamic batching and its priority queue policies, warm-up, ensemble steps, version
policy) and ``ModelConfig``, with Triton's JSON form of it (``to_dict``: ``GET .../config``,
repository-API loads), and the Triton ``TYPE_*`` <-> v2 datatype names both directions use.

Why a module of its own: most of the gateway reads a model's config and none of it needs the
parser; reading ``config.pbtxt`` or Triton's JSON into a checked ``ModelConfig`` is
``parser.py``'s (which imports this; the package, ``gateway.repository.config``, offers both);
the auto-complete from the ONNX graph is ``backends/onnxruntime.py``'s (``complete_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

DEFAULT_MODEL_FILENAME = "model.onnx"
ONNX_PLATFORM = "onnxruntime_onnx"
ENSEMBLE_PLATFORM = "ensemble"

# Triton's TYPE_* names <-> v2 datatype names.
_TRITON_TO_V2 = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
}
_V2_TO_TRITON = {v: k for k, v in _TRITON_TO_V2.items()}


@dataclass(frozen=True, slots=True)
class TensorConfig:
    """One input or output: v2 datatype and dims without the batch dimension."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None
    optional: bool = False
    label_filename: str = ""  # an output's class labels, one a line (classification)


@dataclass(frozen=True, slots=True)
class QueuePolicyConfig:
    """Triton's ``ModelQueuePolicy`` (a ``priority_queue_policy`` entry)."""

    max_queue_size: int = 0  # 0: the gateway's default bound
    default_timeout_us: int = 0
    allow_timeout_override: bool = False
    timeout_action: str = "REJECT"  # REJECT | DELAY

    def to_dict(self) -> dict[str, Any]:
        return {
            "timeout_action": self.timeout_action,
            "default_timeout_microseconds": self.default_timeout_us,
            "allow_timeout_override": self.allow_timeout_override,
            "max_queue_size": self.max_queue_size,
        }


@dataclass(frozen=True, slots=True)
class DynamicBatching:
    """Triton's ``dynamic_batching`` block."""

    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    max_queue_size: int = 0  # 0: the gateway's default bound
    default_timeout_us: int = 0
    # The rest of default_queue_policy, and Triton's priorities (0 levels: none).
    allow_timeout_override: bool = False
    timeout_action: str = "REJECT"
    priority_levels: int = 0
    default_priority_level: int = 0
    priority_queue_policy: tuple[tuple[int, QueuePolicyConfig], ...] = ()

    @property
    def default_queue_policy(self) -> QueuePolicyConfig:
        return QueuePolicyConfig(
            self.max_queue_size,
            self.default_timeout_us,
            self.allow_timeout_override,
            self.timeout_action,
        )


@dataclass(frozen=True, slots=True)
class EnsembleStep:
    """One step of an ensemble (Triton's ``ModelEnsembling.Step``): which model runs, and how
    its tensors are named in the ensemble. ``model_version`` -1: the newest."""

    model_name: str
    model_version: int
    input_map: tuple[tuple[str, str], ...]  # (the step model's input, the ensemble's tensor)
    output_map: tuple[tuple[str, str], ...]  # (the step model's output, the ensemble's tensor)


@dataclass(frozen=True, slots=True)
class WarmupInput:
    """One input of a ``model_warmup`` sample: dims without the batch dimension, and its data:
    ``zero``, ``random`` or ``file`` (``<model>/warmup/<file>``, raw little-endian bytes)."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    data: str = "zero"
    file: str = ""


@dataclass(frozen=True, slots=True)
class WarmupSample:
    """One entry of Triton's ``model_warmup``: run ``count`` times (at least once) at load."""

    name: str
    batch_size: int
    inputs: tuple[WarmupInput, ...]
    count: int = 1


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which on-disk versions to serve: ``latest`` N, ``all``, or ``specific`` ones."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.num_versions :] if ordered else []


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A model's configuration after parsing, auto-complete and validation."""

    name: str
    platform: str = ONNX_PLATFORM
    backend: str = "onnxruntime"
    max_batch_size: int = 0
    inputs: tuple[TensorConfig, ...] = ()
    outputs: tuple[TensorConfig, ...] = ()
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    instance_count: int = 1
    # KIND_AUTO (also what no instance_group means, as in Triton): the GPU where one is usable,
    # else the CPU; KIND_GPU / KIND_CPU: that device. ``instance_gpus``: the GPU device ids an
    # instance group names; Triton starts ``instance_count`` instances on each of them.
    instance_kind: str = "KIND_AUTO"
    instance_gpus: tuple[int, ...] = ()
    dynamic_batching: DynamicBatching | None = None
    default_model_filename: str = DEFAULT_MODEL_FILENAME
    parameters: tuple[tuple[str, str], ...] = ()
    model_warmup: tuple[WarmupSample, ...] = ()
    response_cache: bool = False  # ``response_cache { enable: true }``: answers are cached
    ensemble_steps: tuple[EnsembleStep, ...] = ()  # platform "ensemble": its DAG
    # Derived once per config, read per request as plain attributes (a method or property
    # is a Python call each time): tensors by name, and whether requests carry a batch
    # dimension (``max_batch_size`` > 0).
    inputs_by_name: dict[str, TensorConfig] = field(init=False, repr=False, compare=False)
    outputs_by_name: dict[str, TensorConfig] = field(init=False, repr=False, compare=False)
    batched: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs_by_name", {t.name: t for t in self.inputs})
        object.__setattr__(self, "outputs_by_name", {t.name: t for t in self.outputs})
        object.__setattr__(self, "batched", self.max_batch_size > 0)

    @property
    def is_ensemble(self) -> bool:
        return self.platform == ENSEMBLE_PLATFORM

    def input(self, name: str) -> TensorConfig | None:
        return self.inputs_by_name.get(name)

    def output(self, name: str) -> TensorConfig | None:
        return self.outputs_by_name.get(name)

    def with_changes(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def instance_group(self) -> dict[str, Any]:
        """The one ``instance_group`` entry in Triton's JSON form."""
        group: dict[str, Any] = {"count": self.instance_count, "kind": self.instance_kind}
        if self.instance_gpus:
            group["gpus"] = list(self.instance_gpus)
        return group

    def to_dict(self) -> dict[str, Any]:
        """Triton's JSON form of the config (``GET .../config``, repository-API loads)."""

        def tensor(t: TensorConfig) -> dict[str, Any]:
            out: dict[str, Any] = {
                "name": t.name,
                "data_type": _V2_TO_TRITON[t.datatype],
                "dims": list(t.dims),
            }
            if t.reshape is not None:
                out["reshape"] = {"shape": list(t.reshape)}
            if t.optional:
                out["optional"] = True
            if t.label_filename:
                out["label_filename"] = t.label_filename
            return out

        policy: dict[str, Any]
        if self.version_policy.kind == "all":
            policy = {"all": {}}
        elif self.version_policy.kind == "specific":
            policy = {"specific": {"versions": list(self.version_policy.versions)}}
        else:
            policy = {"latest": {"num_versions": self.version_policy.num_versions}}
        result: dict[str, Any] = {
            "name": self.name,
            "platform": self.platform,
            "backend": self.backend,
            "version_policy": policy,
            "max_batch_size": self.max_batch_size,
            "input": [tensor(t) for t in self.inputs],
            "output": [tensor(t) for t in self.outputs],
            "instance_group": [self.instance_group()],
            "default_model_filename": self.default_model_filename,
            "parameters": {k: {"string_value": v} for k, v in self.parameters},
        }
        db = self.dynamic_batching
        if db is not None:
            batching: dict[str, Any] = {
                "preferred_batch_size": list(db.preferred_batch_sizes),
                "max_queue_delay_microseconds": db.max_queue_delay_us,
            }
            if db.max_queue_size or db.default_timeout_us:
                batching["default_queue_policy"] = {
                    "max_queue_size": db.max_queue_size,
                    "default_timeout_microseconds": db.default_timeout_us,
                }
            if db.allow_timeout_override or db.timeout_action != "REJECT":
                batching["default_queue_policy"] = db.default_queue_policy.to_dict()
            if db.priority_levels:
                batching["priority_levels"] = db.priority_levels
                batching["default_priority_level"] = db.default_priority_level
                batching["priority_queue_policy"] = {
                    str(level): policy.to_dict() for level, policy in db.priority_queue_policy
                }
            result["dynamic_batching"] = batching
        if self.model_warmup:
            result["model_warmup"] = [_warmup_dict(w) for w in self.model_warmup]
        if self.response_cache:
            result["response_cache"] = {"enable": True}
        if self.is_ensemble:
            result["backend"] = ""
            for key in ("instance_group", "default_model_filename"):
                del result[key]
            result["ensemble_scheduling"] = {
                "step": [
                    {
                        "model_name": step.model_name,
                        "model_version": step.model_version,
                        "input_map": dict(step.input_map),
                        "output_map": dict(step.output_map),
                    }
                    for step in self.ensemble_steps
                ]
            }
        return result


def _warmup_dict(sample: WarmupSample) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for item in sample.inputs:
        entry: dict[str, Any] = {"data_type": _V2_TO_TRITON[item.datatype], "dims": list(item.dims)}
        if item.data == "file":
            entry["input_data_file"] = item.file
        else:
            entry[f"{item.data}_data"] = True
        inputs[item.name] = entry
    return {
        "name": sample.name,
        "batch_size": sample.batch_size,
        "inputs": inputs,
        "count": sample.count,
    }
