"""Model configuration: the subset of Triton's ``config.pbtxt`` the gateway honours.

Two modules: ``types`` (``ModelConfig`` and its parts, frozen, with Triton's JSON form), read
everywhere, and ``parser`` (``config.pbtxt`` text or Triton's JSON into a checked
``ModelConfig``), used where a config is loaded. Both are offered here, so callers import from
``gateway.repository.config`` whichever they need.
"""

from gateway.repository.config.parser import from_message, load_config, parse_json, parse_pbtxt
from gateway.repository.config.types import (
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

__all__ = [
    "DEFAULT_MODEL_FILENAME",
    "ENSEMBLE_PLATFORM",
    "ONNX_PLATFORM",
    "DynamicBatching",
    "EnsembleStep",
    "ModelConfig",
    "QueuePolicyConfig",
    "TensorConfig",
    "VersionPolicy",
    "WarmupInput",
    "WarmupSample",
    "from_message",
    "load_config",
    "parse_json",
    "parse_pbtxt",
]
