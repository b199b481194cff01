"""Triton's trace extension: the run-time trace settings, global and per model.

What it owns: ``trace_level``, ``trace_rate``, ``trace_count`` (and the exact
``trace_sample_ratio``) as ``GET/POST /v2[/models/{m}]/trace/setting`` (``gateway.server.
trace_setting``) and gRPC ``TraceSetting`` read and change them: ``TraceSetting`` (one scope's),
``TraceConfig`` (global and per-model, counted down as traces are taken) and the one ``CONFIG``,
``trace_setting`` and ``update_trace_setting`` with the checks of a request's values.

Why a module of its own: this is Triton's protocol state, apart from OpenTelemetry's set-up and
spans (``gateway.tracing``, which imports this and not the other way round). Its sampler reads
``CONFIG`` for each request span; ``tracing`` tells this module when a tracer is installed
(``started``) or removed (``stopped``): with none, the extension reports level OFF and refuses
changes. Nothing here imports OpenTelemetry.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.errors import InvalidInput

LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")


@dataclass(frozen=True, slots=True)
class TraceSetting:
    """One scope's trace settings as Triton names them (global, or a model's overrides: a
    ``None`` field there falls back to the global one)."""

    level: tuple[str, ...] | None = None  # ("OFF",) | ("TIMESTAMPS",) | ("TENSORS", ...)
    ratio: float | None = None  # trace_rate N is 1/N
    count: int | None = None  # traces left to take; -1: no limit


@dataclass(slots=True)
class TraceConfig:
    """Global and per-model sampling, changed at run time by the trace extension."""

    glob: TraceSetting = field(default_factory=lambda: TraceSetting(("TIMESTAMPS",), 1.0, -1))
    models: dict[str, TraceSetting] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def effective(self, model: str | None) -> TraceSetting:
        own = self.models.get(model) if model is not None else None
        if own is None:
            return self.glob
        glob = self.glob
        return TraceSetting(
            own.level if own.level is not None else glob.level,
            own.ratio if own.ratio is not None else glob.ratio,
            own.count if own.count is not None else glob.count,
        )

    def take(self, model: str | None) -> bool:
        """One more trace taken in ``model``'s scope: False when its ``trace_count`` is spent
        (counted down where it is set: the model's own, else the global one)."""
        with self.lock:
            own = self.models.get(model) if model is not None else None
            scoped = own is not None and own.count is not None
            setting = own if scoped and own is not None else self.glob
            if setting.count is None or setting.count < 0:
                return True
            if setting.count == 0:
                return False
            taken = replace(setting, count=setting.count - 1)
            if scoped and model is not None:
                self.models[model] = taken
            else:
                self.glob = taken
            return True


CONFIG = TraceConfig()
_startup: TraceSetting | None = None  # what a global ``null`` goes back to; None: tracing off


def started(ratio: float) -> None:
    """A tracer was installed sampling ``ratio`` (``tracing.setup`` / ``install``): the global
    settings start there (and a global ``null`` goes back there), no model keeps its own."""
    global _startup
    CONFIG.glob = _startup = TraceSetting(("TIMESTAMPS",), ratio, -1)
    CONFIG.models.clear()


def stopped() -> None:
    """The tracer was removed (``tracing.shutdown``): the settings stay as they are, reported
    with level OFF; changes are refused until a tracer is installed again."""
    global _startup
    _startup = None


def configured() -> bool:
    """Whether a tracer is installed (the extension can only sample when one is)."""
    return _startup is not None


# The largest trace_rate reported: a ratio whose inverse is beyond it (or not finite: 1e-320)
# is reported as this (one trace in 2**63 - 1 requests is none, as near as matters).
MAX_RATE = 2**63 - 1


def _rate_of(ratio: float) -> str:
    if ratio <= 0:
        return "0"
    inverse = 1 / ratio
    return str(round(inverse)) if inverse < MAX_RATE else str(MAX_RATE)


def trace_setting(model: str | None = None) -> dict[str, Any]:
    """The settings in force for ``model`` (global when None), as Triton's trace extension
    reports them: strings, ``trace_level`` a list. Off (no tracer installed): level OFF."""
    setting = CONFIG.effective(model)
    ratio = setting.ratio if setting.ratio is not None else 0.0
    level = list(setting.level or ("OFF",)) if configured() else ["OFF"]
    return {
        "trace_level": level,
        "trace_rate": _rate_of(ratio),
        "trace_count": str(setting.count if setting.count is not None else -1),
        "trace_mode": "opentelemetry",
        "trace_sample_ratio": format(ratio, "g"),  # the exact ratio (trace_rate is rounded)
    }


def _int_value(key: str, value: object, least: int) -> int:
    text = value[0] if isinstance(value, list) and len(value) == 1 else value
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise InvalidInput(f"trace setting '{key}' must be a string holding an integer")
    try:
        number = int(text)
    except ValueError:
        raise InvalidInput(f"trace setting '{key}': {str(text)[:32]!r} is not an integer") from None
    if number < least:
        raise InvalidInput(f"trace setting '{key}' must be >= {least}, got {number}")
    return number


def _level_value(value: object) -> tuple[str, ...]:
    levels = [value] if isinstance(value, str) else value
    if not isinstance(levels, list) or not levels or not all(isinstance(v, str) for v in levels):
        raise InvalidInput("trace setting 'trace_level' must be a string or a list of strings")
    unknown = [str(v)[:32] for v in levels if str(v).upper() not in LEVELS]
    if unknown:
        raise InvalidInput(f"trace_level {unknown[0]!r} is not one of {', '.join(LEVELS)}")
    return tuple(str(v).upper() for v in levels)


def _ratio_value(value: object) -> float:
    text = value[0] if isinstance(value, list) and len(value) == 1 else value
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise InvalidInput("trace setting 'trace_sample_ratio' must be a number in 0..1")
    try:
        ratio = float(text)
    except ValueError:
        raise InvalidInput("trace setting 'trace_sample_ratio' must be a number in 0..1") from None
    if not 0 <= ratio <= 1:
        raise InvalidInput(f"trace_sample_ratio must be in 0..1, got {ratio:g}")
    return ratio


NOT_HERE = ("trace_file", "log_frequency")  # Triton's file output: spans go to OTLP here


def update_trace_setting(model: str | None, body: Mapping[str, object]) -> dict[str, Any]:
    """Triton's ``POST /v2[/models/{m}]/trace/setting``: change what ``body`` names (a JSON
    ``null`` clears it: a model's falls back to the global one, the global one to its start-up
    value); a model with an empty body loses all its own settings. Returns ``trace_setting``.

    Mapping: ``trace_level`` OFF stops sampling, TIMESTAMPS (and TENSORS, whose tensor dumps
    are not recorded) samples; ``trace_rate`` N samples 1/N of requests (by trace id, not
    every N-th); ``trace_count`` as Triton's; ``trace_file`` and ``log_frequency`` refused."""
    startup = _startup
    if startup is None:
        raise InvalidInput("tracing is off on this gateway: start it with a trace_endpoint")
    changes: dict[str, Any] = {}
    for key, value in body.items():
        if key in NOT_HERE:
            raise InvalidInput(
                f"trace setting '{key}' does not apply: spans are exported over OTLP "
                "(trace_endpoint), not written to files"
            )
        if key == "trace_level":
            changes["level"] = None if value is None else _level_value(value)
        elif key == "trace_rate":
            changes["ratio"] = None if value is None else 1 / _int_value(key, value, 1)
        elif key == "trace_sample_ratio":
            changes["ratio"] = None if value is None else _ratio_value(value)
        elif key == "trace_count":
            changes["count"] = None if value is None else _int_value(key, value, -1)
        elif key != "trace_mode":
            raise InvalidInput(f"unknown trace setting '{key[:64]}'")
    with CONFIG.lock:
        if model is None:
            glob = CONFIG.glob
            for name, value in changes.items():
                fallback = getattr(startup, name)
                glob = replace(glob, **{name: fallback if value is None else value})
            CONFIG.glob = glob
        elif not changes and not body:
            CONFIG.models.pop(model, None)
        else:
            own = replace(CONFIG.models.get(model) or TraceSetting(), **changes)
            if own == TraceSetting():
                CONFIG.models.pop(model, None)
            else:
                CONFIG.models[model] = own
    return trace_setting(model)


__all__ = [
    "CONFIG",
    "LEVELS",
    "TraceConfig",
    "TraceSetting",
    "configured",
    "started",
    "stopped",
    "trace_setting",
    "update_trace_setting",
]
