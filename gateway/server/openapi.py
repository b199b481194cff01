"""The gateway's OpenAPI 3 document (served at ``/openapi.json``, used to fuzz the HTTP API)."""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.protocol.types import DATATYPES

_ERROR = {
    "description": "error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            }
        }
    },
}
_JSON_OK = {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}
_NAME = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}

_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": list(DATATYPES)},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "data": {},
        "parameters": {"type": "object"},
    },
}
_INFER = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": _TENSOR},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
            },
        },
    },
}


def _op(summary: str, params: list[Any], body: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": params,
        "responses": {"200": _JSON_OK, "400": _ERROR, "404": _ERROR, "503": _ERROR},
    }
    if body is not None:
        op["requestBody"] = {"content": {"application/json": {"schema": body}}}
    return op


def _model_paths(prefix: str, params: list[Any]) -> dict[str, Any]:
    return {
        prefix: {"get": _op("model metadata", params)},
        prefix + "/ready": {"get": _op("model readiness", params)},
        prefix + "/config": {"get": _op("model configuration (Triton JSON)", params)},
        prefix + "/stats": {"get": _op("model statistics", params)},
        prefix + "/infer": {"post": _op("inference", params, _INFER)},
    }


_TRACE_SETTING = {
    "type": "object",
    "properties": {
        "trace_level": {"type": "array", "items": {"type": "string"}},
        "trace_rate": {"type": "string"},
        "trace_count": {"type": "string"},
        "trace_sample_ratio": {"type": "string"},
    },
}


def _trace_paths(path: str, params: list[Any]) -> dict[str, Any]:
    """Triton's trace extension (gateway.server.trace_setting)."""
    return {
        path: {
            "get": _op("trace settings", params),
            "post": _op("change trace settings", params, _TRACE_SETTING),
        }
    }


_REGION = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def _shared_memory_paths(prefix: str, kind: str, register: dict[str, Any]) -> dict[str, Any]:
    """Triton's shared-memory extension (``gateway/server/shared_memory.py``)."""
    return {
        prefix + "/status": {"get": _op(f"every {kind} shared-memory region", [])},
        prefix + "/region/{name}/status": {"get": _op(f"one {kind} region", [_REGION])},
        prefix + "/region/{name}/register": {
            "post": _op(f"register a {kind} shared-memory region", [_REGION], register)
        },
        prefix + "/region/{name}/unregister": {
            "post": _op(f"unregister a {kind} region", [_REGION])
        },
        prefix + "/unregister": {"post": _op(f"unregister every {kind} region", [])},
    }


_SYSTEM_REGISTER = {
    "type": "object",
    "required": ["key", "byte_size"],
    "properties": {
        "key": {"type": "string"},
        "offset": {"type": "integer"},
        "byte_size": {"type": "integer"},
    },
}
_CUDA_REGISTER = {  # refused: not supported
    "type": "object",
    "properties": {
        "raw_handle": {"type": "object", "properties": {"b64": {"type": "string"}}},
        "device_id": {"type": "integer"},
        "byte_size": {"type": "integer"},
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "gateway: Open Inference Protocol (KServe v2)", "version": __version__},
    "paths": {
        "/v2/health/live": {"get": _op("liveness", [])},
        "/v2/health/ready": {"get": _op("readiness", [])},
        "/v2": {"get": _op("server metadata", [])},
        "/v2/models/stats": {"get": _op("statistics of every model", [])},
        **_model_paths("/v2/models/{model}", [_NAME]),
        **_model_paths("/v2/models/{model}/versions/{version}", [_NAME, _VERSION]),
        "/v2/repository/index": {
            "post": _op(
                "repository index",
                [],
                {"type": "object", "properties": {"ready": {"type": "boolean"}}},
            )
        },
        "/v2/repository/models/{model}/load": {
            "post": _op(
                "load or reload a model",
                [_NAME],
                {
                    "type": "object",
                    "properties": {
                        "parameters": {
                            "type": "object",
                            "properties": {"config": {"type": "string"}},
                        }
                    },
                },
            )
        },
        "/v2/repository/models/{model}/unload": {
            "post": _op("unload a model", [_NAME], {"type": "object"})
        },
        **_trace_paths("/v2/trace/setting", []),
        **_trace_paths("/v2/models/{model}/trace/setting", [_NAME]),
        **_shared_memory_paths("/v2/systemsharedmemory", "system", _SYSTEM_REGISTER),
        **_shared_memory_paths("/v2/cudasharedmemory", "CUDA", _CUDA_REGISTER),
        "/v2/logging": {
            "get": _op("log settings (Triton's logging extension)", []),
            "post": _op(
                "change log settings now",
                [],
                {
                    "type": "object",
                    "properties": {
                        "log_info": {"type": "boolean"},
                        "log_warning": {"type": "boolean"},
                        "log_error": {"type": "boolean"},
                        "log_verbose_level": {"type": "integer", "minimum": 0},
                        "log_format": {"type": "string", "enum": ["default", "ISO8601", "json"]},
                    },
                },
            ),
        },
    },
}
