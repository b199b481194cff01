"""Reading a model's configuration: ``config.pbtxt`` text or Triton's JSON form into a checked
``ModelConfig``.

``config.pbtxt`` is parsed with the protobuf schema that ships in ``tritonclient``
(``model_config_pb2``), so anything Triton would reject as text is rejected here with protobuf's
own line/column message, prefixed by the file path. The parsed message is then turned into a
frozen :class:`~gateway.repository.config.types.ModelConfig` and checked field by field
(``from_message``), fields against each other too (an ensemble's steps against its tensors,
warm-up samples against the inputs).

Why a module of its own: the types (``types.py`` beside it) are read everywhere, the parse and
its checks only where a config is loaded (the repository, edges, the repository load API). The
package (``gateway.repository.config``) offers both. The ensemble checks are the next split if
they grow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway.errors import ModelLoadError
from gateway.repository.config.types import (
    _TRITON_TO_V2,
    DEFAULT_MODEL_FILENAME,
    ENSEMBLE_PLATFORM,
    ONNX_PLATFORM,
    DynamicBatching,
    EnsembleStep,
    ModelConfig,
    QueuePolicyConfig,
    TensorConfig,
    VersionPolicy,
    WarmupInput,
    WarmupSample,
)


def _warmup(pb: Any, source: str, batched: bool) -> tuple[WarmupSample, ...]:
    """Triton's ``model_warmup``, checked: what the model is run with at load time."""
    samples = []
    for sample in pb.model_warmup:
        where = f"model_warmup '{sample.name}'"
        if not sample.name:
            raise _bad(source, "model_warmup: 'name' is required")
        batch = int(sample.batch_size)
        if batch < 1 or (batched and batch > pb.max_batch_size) or (not batched and batch != 1):
            limit = f"1..{pb.max_batch_size}" if batched else "1 (max_batch_size is 0)"
            raise _bad(source, f"{where}: 'batch_size' must be {limit}, got {batch}")
        inputs = []
        for name, item in sorted(sample.inputs.items()):
            type_name = mc.DataType.Name(item.data_type)
            if type_name not in _TRITON_TO_V2:
                raise _bad(source, f"{where} input '{name}': 'data_type' {type_name} unsupported")
            dims = tuple(int(d) for d in item.dims)
            if any(d < 1 for d in dims):
                raise _bad(source, f"{where} input '{name}': 'dims' {list(dims)} must be > 0")
            kind = item.WhichOneof("input_data_type")
            data, file = "zero", ""
            if kind == "random_data":
                data = "random"
            elif kind == "input_data_file":
                data, file = "file", item.input_data_file
                if not _plain_file_name(file):
                    raise _bad(source, f"{where} input '{name}': 'input_data_file' {file!r}")
            inputs.append(WarmupInput(name, _TRITON_TO_V2[type_name], dims, data, file))
        samples.append(WarmupSample(sample.name, batch, tuple(inputs), max(1, int(sample.count))))
    return tuple(samples)


def _bad(source: str, message: str) -> ModelLoadError:
    return ModelLoadError(f"{source}: {message}")


def _tensor(pb: Any, source: str, kind: str, batched: bool) -> TensorConfig:
    where = f"{kind} '{pb.name}'" if pb.name else kind
    if not pb.name:
        raise _bad(source, f"{kind}: 'name' is required")
    type_name = mc.DataType.Name(pb.data_type)
    if type_name not in _TRITON_TO_V2:
        raise _bad(source, f"{where}: 'data_type' {type_name} is not supported")
    dims = tuple(int(d) for d in pb.dims)
    if not dims and not batched:
        raise _bad(source, f"{where}: 'dims' is required when max_batch_size is 0")
    if any(d == 0 or d < -1 for d in dims):
        raise _bad(source, f"{where}: 'dims' {list(dims)} must be positive or -1")
    reshape = None
    if pb.HasField("reshape"):
        reshape = tuple(int(d) for d in pb.reshape.shape)
        if any(d == 0 or d < -1 for d in reshape):
            raise _bad(source, f"{where}: 'reshape.shape' {list(reshape)} is invalid")
    optional = bool(getattr(pb, "optional", False))
    labels = str(getattr(pb, "label_filename", ""))
    if labels and not _plain_file_name(labels):
        raise _bad(source, f"{where}: 'label_filename' {labels!r} must be a plain file name")
    return TensorConfig(pb.name, _TRITON_TO_V2[type_name], dims, reshape, optional, labels)


def _plain_file_name(name: str) -> bool:
    """A file of the model's directory, never a path out of it."""
    return not ("/" in name or "\\" in name or "\x00" in name or name in (".", ".."))


def _queue_policy(pb: Any) -> QueuePolicyConfig:
    """A ``ModelQueuePolicy`` message (its fields are unsigned: protobuf refuses negatives)."""
    return QueuePolicyConfig(
        max_queue_size=int(pb.max_queue_size),
        default_timeout_us=int(pb.default_timeout_microseconds),
        allow_timeout_override=bool(pb.allow_timeout_override),
        timeout_action=mc.ModelQueuePolicy.TimeoutAction.Name(pb.timeout_action),
    )


def from_message(pb: Any, source: str, default_name: str) -> ModelConfig:
    """Validate a parsed ``ModelConfig`` protobuf and convert it."""
    name = pb.name or default_name
    if name != default_name:
        raise _bad(source, f"'name' is {name!r} but the model directory is {default_name!r}")
    if pb.max_batch_size < 0:
        raise _bad(source, f"'max_batch_size' must be >= 0, got {pb.max_batch_size}")
    platform, backend = pb.platform, pb.backend
    if platform and platform not in (ONNX_PLATFORM, ENSEMBLE_PLATFORM):
        raise _bad(
            source,
            f"'platform' {platform!r} is not supported (only {ONNX_PLATFORM!r} and "
            f"{ENSEMBLE_PLATFORM!r})",
        )
    ensemble = platform == ENSEMBLE_PLATFORM
    if ensemble and backend:
        raise _bad(source, "an ensemble has no 'backend'")
    if pb.HasField("ensemble_scheduling") and not ensemble:
        raise _bad(source, "'ensemble_scheduling' needs platform: \"ensemble\"")
    if backend and backend not in ("onnxruntime", "python"):
        raise _bad(source, f"'backend' {backend!r} is not supported (only 'onnxruntime')")
    batched = pb.max_batch_size > 0
    inputs = tuple(_tensor(t, source, "input", batched) for t in pb.input)
    outputs = tuple(_tensor(t, source, "output", batched) for t in pb.output)
    for kind, tensors in (("input", inputs), ("output", outputs)):
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise _bad(source, f"duplicate {kind} names in {names}")

    policy = VersionPolicy()
    which = pb.version_policy.WhichOneof("policy_choice")
    if which == "latest":
        if pb.version_policy.latest.num_versions < 1:
            raise _bad(source, "'version_policy.latest.num_versions' must be >= 1")
        policy = VersionPolicy("latest", pb.version_policy.latest.num_versions)
    elif which == "all":
        policy = VersionPolicy("all")
    elif which == "specific":
        versions = tuple(int(v) for v in pb.version_policy.specific.versions)
        if not versions or any(v < 1 for v in versions):
            raise _bad(source, "'version_policy.specific.versions' must list versions >= 1")
        policy = VersionPolicy("specific", versions=versions)

    # KIND_AUTO stays KIND_AUTO: only where the model runs can tell (Triton resolves it per
    # server: GPU if it has the listed GPUs, else CPU), so a GPU host gets GPU instances.
    count, kind_name = 1, "KIND_AUTO"
    gpus: tuple[int, ...] = ()
    if len(pb.instance_group) > 1:
        raise _bad(source, "only one 'instance_group' entry is supported")
    for group in pb.instance_group:
        count = group.count or 1
        if count < 1 or count > 64:
            raise _bad(source, f"'instance_group.count' must be 1..64, got {count}")
        kind_name = mc.ModelInstanceGroup.Kind.Name(group.kind)
        if kind_name not in ("KIND_AUTO", "KIND_CPU", "KIND_GPU"):
            raise _bad(source, f"'instance_group.kind' {kind_name} is not supported")
        gpus = tuple(int(g) for g in group.gpus)
        if any(g < 0 or g > 1023 for g in gpus) or len(set(gpus)) != len(gpus):
            raise _bad(source, f"'instance_group.gpus' {list(gpus)} must be distinct ids 0..1023")
        if gpus and kind_name == "KIND_CPU":
            raise _bad(source, "'instance_group.gpus' is set but 'kind' is KIND_CPU")

    batching = None
    if pb.HasField("dynamic_batching"):
        db = pb.dynamic_batching
        preferred = tuple(int(s) for s in db.preferred_batch_size)
        for size in preferred:
            if size < 1 or (batched and size > pb.max_batch_size):
                raise _bad(
                    source,
                    f"'dynamic_batching.preferred_batch_size' {size} must be in "
                    f"1..max_batch_size ({pb.max_batch_size})",
                )
        if db.max_queue_delay_microseconds < 0:
            raise _bad(source, "'dynamic_batching.max_queue_delay_microseconds' must be >= 0")
        queue = _queue_policy(db.default_queue_policy)
        levels = int(db.priority_levels)
        default_level = int(db.default_priority_level)
        # As Triton's model config checks: a default level among the levels, policies only
        # for levels that exist.
        if levels and not 1 <= default_level <= levels:
            raise _bad(
                source,
                f"'dynamic_batching.default_priority_level' must be in 1..{levels} "
                f"(priority_levels), got {default_level}",
            )
        if not levels and default_level:
            raise _bad(source, "'dynamic_batching.default_priority_level' needs priority_levels")
        for level in db.priority_queue_policy:
            if not 1 <= level <= levels:
                raise _bad(
                    source,
                    f"'dynamic_batching.priority_queue_policy' level {level} is not in "
                    f"1..{levels} (priority_levels)",
                )
        batching = DynamicBatching(
            preferred_batch_sizes=preferred,
            max_queue_delay_us=int(db.max_queue_delay_microseconds),
            max_queue_size=queue.max_queue_size,
            default_timeout_us=queue.default_timeout_us,
            allow_timeout_override=queue.allow_timeout_override,
            timeout_action=queue.timeout_action,
            priority_levels=levels,
            default_priority_level=default_level,
            priority_queue_policy=tuple(
                sorted((int(k), _queue_policy(v)) for k, v in db.priority_queue_policy.items())
            ),
        )
    filename = pb.default_model_filename or DEFAULT_MODEL_FILENAME
    if not _plain_file_name(filename):
        raise _bad(source, f"'default_model_filename' {filename!r} must be a plain file name")
    params = tuple(sorted((k, v.string_value) for k, v in pb.parameters.items()))
    steps: tuple[EnsembleStep, ...] = ()
    if ensemble:
        if not inputs or not outputs:
            raise _bad(source, "an ensemble must declare its inputs and outputs")
        if batching is not None:
            raise _bad(source, "an ensemble has no 'dynamic_batching' (its steps batch)")
        steps = _ensemble_steps(pb.ensemble_scheduling, source, inputs, outputs)
    return ModelConfig(
        name=name,
        platform=ENSEMBLE_PLATFORM if ensemble else ONNX_PLATFORM,
        backend="" if ensemble else backend or "onnxruntime",
        ensemble_steps=steps,
        max_batch_size=int(pb.max_batch_size),
        inputs=inputs,
        outputs=outputs,
        version_policy=policy,
        instance_count=count,
        instance_kind=kind_name,
        instance_gpus=gpus,
        dynamic_batching=batching,
        default_model_filename=filename,
        parameters=params,
        model_warmup=_warmup(pb, source, batched),
        response_cache=bool(pb.response_cache.enable),
    )


def _ensemble_steps(
    pb: Any, source: str, inputs: tuple[TensorConfig, ...], outputs: tuple[TensorConfig, ...]
) -> tuple[EnsembleStep, ...]:
    """The steps, checked as Triton checks them: every tensor made by one step only, every
    step's inputs available, every ensemble output made, every input used, no cycle."""
    if not pb.step:
        raise _bad(source, "'ensemble_scheduling' needs at least one 'step'")
    steps: list[EnsembleStep] = []
    made: dict[str, int] = {}
    ensemble_inputs = {t.name for t in inputs}
    for index, step in enumerate(pb.step):
        where = f"ensemble step {index} ('{step.model_name}')"
        if not step.model_name:
            raise _bad(source, f"ensemble step {index}: 'model_name' is required")
        if step.model_version < -1 or step.model_version == 0:
            raise _bad(source, f"{where}: 'model_version' must be -1 (newest) or >= 1")
        if not step.input_map or not step.output_map:
            raise _bad(source, f"{where}: 'input_map' and 'output_map' must not be empty")
        for tensor in step.output_map.values():
            if tensor in ensemble_inputs or tensor in made:
                raise _bad(source, f"{where}: tensor '{tensor}' is made by more than one source")
            made[tensor] = index
        steps.append(
            EnsembleStep(
                step.model_name,
                int(step.model_version),
                tuple(sorted(step.input_map.items())),
                tuple(sorted(step.output_map.items())),
            )
        )
    used = {tensor for step in steps for _, tensor in step.input_map}
    for index, step in enumerate(steps):
        for _, tensor in step.input_map:
            if tensor not in ensemble_inputs and tensor not in made:
                raise _bad(
                    source,
                    f"ensemble step {index} ('{step.model_name}'): input tensor '{tensor}' is "
                    "neither an ensemble input nor any step's output",
                )
    for t in outputs:
        if t.name not in made:
            raise _bad(source, f"ensemble output '{t.name}' is not made by any step")
    for name in sorted(ensemble_inputs - used):
        raise _bad(source, f"ensemble input '{name}' is not used by any step")
    # No cycle: every step must become runnable from the ensemble's inputs alone.
    available, pending = set(ensemble_inputs), list(range(len(steps)))
    while pending:
        runnable = [i for i in pending if all(t in available for _, t in steps[i].input_map)]
        if not runnable:
            names = ", ".join(f"'{steps[i].model_name}'" for i in pending)
            raise _bad(source, f"ensemble steps {names} form a cycle")
        for i in runnable:
            available.update(t for _, t in steps[i].output_map)
            pending.remove(i)
    return tuple(steps)


def parse_pbtxt(text: str, source: str, default_name: str) -> ModelConfig:
    """Parse ``config.pbtxt`` text; errors name the file and the field."""
    message = mc.ModelConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise _bad(source, str(exc)) from None
    return from_message(message, source, default_name)


def parse_json(data: str | bytes, source: str, default_name: str) -> ModelConfig:
    """Parse Triton's JSON form of a config (as sent to the repository ``load`` API)."""
    message = mc.ModelConfig()
    try:
        json_format.Parse(data, message)
    except json_format.ParseError as exc:
        raise _bad(source, str(exc)) from None
    return from_message(message, source, default_name)


def load_config(model_dir: Path) -> ModelConfig:
    """The config of a model directory: ``config.pbtxt`` if present, else an empty one."""
    path = model_dir / "config.pbtxt"
    if not path.exists():
        return ModelConfig(name=model_dir.name)
    source = f"{model_dir.name}/config.pbtxt"  # named as in the repository, not where on disk
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad(source, f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_pbtxt(text, source, model_dir.name)
