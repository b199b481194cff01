"""Run an ONNX model on a Triton host that has only the python backend.

Some Triton builds (the one in nvidia-pytriton, slim custom images) ship no onnxruntime
backend, and pushing ``backend: "onnxruntime"`` there fails. The gateway then pushes the same
``model.onnx`` next to a small ``model.py`` (``gateway/backends/triton_model/model.py``, a
package data file linted and type-checked with the rest), with the config rewritten to
``backend: "python"``; the host needs ``onnxruntime`` and ``numpy`` importable by its stub.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from importlib import resources
from typing import Any

from gateway.errors import ModelLoadError

__all__ = ["PYTHON_BACKEND_MODEL_PY", "python_backend_config", "python_backend_files"]

# Read once, at import: a package missing its data fails at start, not at the first push.
PYTHON_BACKEND_MODEL_PY: str = (
    resources.files("gateway.backends.triton_model").joinpath("model.py").read_text("utf-8")
)

_MODEL_PY_BYTES = PYTHON_BACKEND_MODEL_PY.encode()
_ORT_PLATFORMS = (None, "", "onnxruntime_onnx")
_ORT_BACKENDS = (None, "", "onnxruntime")


def python_backend_files(onnx_bytes: bytes, version: int) -> dict[str, bytes]:
    """The ``files`` argument of Triton's repository load for one version of the model."""
    if version < 1:
        raise ValueError(f"model version must be >= 1, got {version}")
    return {
        f"file:{version}/model.py": _MODEL_PY_BYTES,
        f"file:{version}/model.onnx": onnx_bytes,
    }


def python_backend_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The same Triton JSON model config, served by the python backend instead of ORT.

    ``default_model_filename`` is dropped because the python backend would take it as the
    script to run, and ORT's execution accelerators mean nothing to it.
    """
    platform = config.get("platform")
    backend = config.get("backend")
    if platform not in _ORT_PLATFORMS or backend not in _ORT_BACKENDS:
        raise ModelLoadError(
            f"only ONNX Runtime models can move to the python backend "
            f"(platform={platform!r}, backend={backend!r})"
        )
    converted = copy.deepcopy(dict(config))
    converted.pop("platform", None)
    converted.pop("default_model_filename", None)
    converted["backend"] = "python"
    optimization = converted.get("optimization")
    if isinstance(optimization, dict):
        optimization.pop("execution_accelerators", None)
        if not optimization:
            del converted["optimization"]
    return converted
