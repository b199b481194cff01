"""Triton python-backend model: runs the model.onnx of this version with ONNX Runtime (CPU).

Pushed by the gateway to hosts without the onnxruntime backend. Triton loads this file by path
inside its python-backend stub, on the host's Python (possibly older than the gateway's): it
imports nothing from the gateway, and its syntax stays valid for Python 3.8.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# onnxruntime-backend parameters honoured here too, so one config serves both backends.
_THREAD_PARAMETERS = {
    "intra_op_thread_count": "intra_op_num_threads",
    "inter_op_thread_count": "inter_op_num_threads",
}
_NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        parameters = config.get("parameters") or {}
        for key, attribute in _THREAD_PARAMETERS.items():
            value = parameters.get(key, {}).get("string_value")
            if value:
                setattr(options, attribute, int(value))
        # ORT session config entries ("session.*" keys) pass through. Spinning is off unless
        # asked for: the stub shares the host's cores with Triton's front end, and idle ORT
        # threads spinning between batches took CPU from both (see bench/README.md).
        entries = dict(_NO_SPINNING)
        for key, value in parameters.items():
            if key.startswith("session.") and value.get("string_value") is not None:
                entries[key] = value["string_value"]
        for key, value in entries.items():
            options.add_session_config_entry(key, value)
        self._session: Any = ort.InferenceSession(
            path, sess_options=options, providers=["CPUExecutionProvider"]
        )
        model_inputs = {i.name: i for i in self._session.get_inputs()}
        self._inputs: list[str] = [i["name"] for i in config.get("input") or []] or list(
            model_inputs
        )
        self._string_inputs = {
            name
            for name in self._inputs
            if name in model_inputs and model_inputs[name].type == "tensor(string)"
        }
        outputs = config.get("output") or []
        self._outputs: list[str] = [o["name"] for o in outputs] or [
            o.name for o in self._session.get_outputs()
        ]
        self._batching = int(config.get("max_batch_size") or 0) > 0

    def execute(self, requests: list[Any]) -> list[Any]:
        if self._batching and len(requests) > 1:
            try:
                return self._execute_together(requests)
            except Exception:
                pass  # run them one by one, so a bad request fails alone
        return [self._execute_one(request) for request in requests]

    def finalize(self) -> None:
        self._session = None

    def _execute_one(self, request: Any) -> Any:
        try:
            return self._response(request, self._run(self._feeds(request)))
        except Exception as exc:
            return pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            )

    def _execute_together(self, requests: list[Any]) -> list[Any]:
        """One session run over the requests concatenated along the batch axis."""
        feeds = [self._feeds(request) for request in requests]
        names = list(feeds[0])
        sizes: list[int] = []
        for feed in feeds:
            if list(feed) != names or len({a.shape[0] for a in feed.values()}) != 1:
                raise ValueError("requests differ in inputs or batch sizes")
            sizes.append(next(iter(feed.values())).shape[0])
        merged = {name: np.concatenate([feed[name] for feed in feeds]) for name in names}
        outputs = self._run(merged)
        if any(a.ndim == 0 or a.shape[0] != sum(sizes) for a in outputs.values()):
            raise ValueError("outputs are not batched along the first axis")
        splits = np.cumsum(sizes)[:-1]
        parts = {name: np.split(array, splits) for name, array in outputs.items()}
        return [
            self._response(request, {name: parts[name][i] for name in parts})
            for i, request in enumerate(requests)
        ]

    def _feeds(self, request: Any) -> dict[str, np.ndarray[Any, Any]]:
        feeds = {}
        for name in self._inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                continue  # optional input; ONNX Runtime reports it if it is required
            array = tensor.as_numpy()
            if name in self._string_inputs:
                # ORT string tensors take str; it would turn bytes into "b'...'" silently.
                array = np.vectorize(_text, otypes=[object])(array) if array.size else array
            feeds[name] = array
        return feeds

    def _run(self, feeds: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        # zip without strict=: this runs on the host's Python, which may predate 3.10
        return dict(zip(self._outputs, self._session.run(self._outputs, feeds)))  # noqa: B905

    def _response(self, request: Any, outputs: dict[str, np.ndarray[Any, Any]]) -> Any:
        requested = request.requested_output_names()
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(name, np.ascontiguousarray(array))
                for name, array in outputs.items()
                if not requested or name in requested
            ]
        )


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
