"""Structured logging: JSON lines, and one access-log line per inference request.

The access log is the busiest log there is and it is written on the event loop, so it does not
go through ``logging`` record by record. ``AccessLog`` keeps each line's fields in a list (a
tuple per inference request) and formats and writes them out together at most ``interval_s``
later (or once ``max_lines`` pile up). Through ``logging`` every line cost a ``LogRecord``, a
handler lock, a formatter and a write system call: about a quarter of the loop's CPU per
request. The lines keep their own timestamps; only the write is late. The ``gateway.access``
logger's level still switches them off (above INFO), as does ``access_log = false``.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
import time
from typing import Any, TextIO

import orjson

from gateway import context
from gateway.errors import InvalidInput

access = logging.getLogger("gateway.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={"fields": {...}}`` adds structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            data.update(fields)
        rid = context.request_id.get()
        if rid is not None and "request_id" not in data:
            data["request_id"] = rid
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


class AccessLog:
    """Access-log lines, buffered and written in batches (see the module docstring)."""

    def __init__(self, interval_s: float = 0.05, max_lines: int = 512) -> None:
        self.interval_s = interval_s
        self.max_lines = max_lines
        self.stream: TextIO | None = None  # None: whatever sys.stderr is when writing
        self.text = False  # the plain-text format of ``log_format = "text"``
        # (time, fields): a dict, or an inference request's ``_Inference`` tuple, turned into
        # text when written out: a request pays for a tuple, not for the formatting
        self._lines: list[tuple[float, dict[str, Any] | _Inference]] = []
        self._lock = threading.Lock()
        self._timer: asyncio.TimerHandle | None = None

    def write(self, fields: dict[str, Any] | _Inference) -> None:
        with self._lock:
            self._lines.append((time.time(), fields))
            full = len(self._lines) >= self.max_lines
        if full:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on an event loop: nothing would flush later
                self.flush()
                return
            self._timer = loop.call_later(self.interval_s, self.flush)

    def _line(self, now: float, fields: dict[str, Any] | _Inference) -> str:
        if isinstance(fields, tuple):
            fields = _inference_fields(*fields)
        if self.text:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            pairs = " ".join(f"{k}={v}" for k, v in fields.items())
            return f"{stamp},{int(now % 1 * 1000):03d} INFO gateway.access: infer {pairs}\n"
        head = {"ts": round(now, 6), "level": "info", "logger": access.name, "msg": "infer"}
        return orjson.dumps(head | fields, option=orjson.OPT_APPEND_NEWLINE).decode()

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        if not lines:
            return
        stream = self.stream or sys.stderr
        try:
            stream.write("".join([self._line(now, fields) for now, fields in lines]))
            stream.flush()
        except (OSError, ValueError):  # stderr closed or full: drop them, as logging would
            pass


# request id, model, version, status, duration in ns, how it was executed
_Inference = tuple[str | None, str, str | None, int, int, "context.Execution | None"]


def _inference_fields(
    request_id: str | None,
    model: str,
    version: str | None,
    status: int,
    duration_ns: int,
    run: context.Execution | None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "request_id": request_id,
        "model": model,
        "version": version or "",
        "status": status,
        "duration_ms": round(duration_ns / 1e6, 3),
    }
    if run is not None:
        fields.update(
            batch_size=run.batch_size,
            queue_ms=round(run.queue_ns / 1e6, 3),
            compute_ms=round(run.compute_ns / 1e6, 3),
            host=run.host or "local",
        )
    return fields


ACCESS = AccessLog()
atexit.register(ACCESS.flush)


_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "ISO8601":
        return logging.Formatter(_TEXT, datefmt="%Y-%m-%dT%H:%M:%S%z")
    return logging.Formatter(_TEXT)


def configure(level: str, fmt: str) -> None:
    """Root logging for ``gateway serve``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    ACCESS.stream = handler.stream
    ACCESS.text = fmt != "json"
    number = logging.getLevelName(level.upper())
    CONTROL.reset(
        info=number <= logging.INFO,
        warning=number <= logging.WARNING,
        error=number <= logging.ERROR,
        verbose=1 if number <= logging.DEBUG else 0,
        fmt="json" if fmt == "json" else "default",
    )


class LogControl(logging.Filter):
    """Triton's logging extension (``GET/POST /v2/logging``, gRPC ``LogSettings``) over the
    gateway's logging, changed at run time.

    Triton switches info, warning and error lines on and off one by one and has verbose levels;
    here the root logger's level is the lowest switched on (DEBUG for any verbose level) and
    this filter, on the root's handlers, drops the levels switched off above it. The access log
    (INFO) follows ``log_info``. ``log_format`` is Triton's ``default`` or ``ISO8601`` (text
    lines) or the gateway's ``json``. ``log_file`` stays where ``gateway serve`` writes (standard
    error): a request never makes the server open a file."""

    FORMATS = ("default", "ISO8601", "json")

    def __init__(self) -> None:
        super().__init__()
        self.info, self.warning, self.error, self.verbose = True, True, True, 0
        self.format = "json"

    def reset(self, *, info: bool, warning: bool, error: bool, verbose: int, fmt: str) -> None:
        self.info, self.warning, self.error, self.verbose = info, warning, error, verbose
        self.format = fmt

    def filter(self, record: logging.LogRecord) -> bool:
        level = record.levelno
        if level >= logging.ERROR:
            return self.error
        if level >= logging.WARNING:
            return self.warning
        if level >= logging.INFO:
            return self.info
        return self.verbose > 0

    def settings(self) -> dict[str, Any]:
        """Triton's fields, as ``GET /v2/logging`` answers them."""
        return {
            "log_file": "",
            "log_info": self.info,
            "log_warning": self.warning,
            "log_error": self.error,
            "log_verbose_level": self.verbose,
            "log_format": self.format,
        }

    def update(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply Triton's fields (others are ignored, as Triton does); every value is checked
        before any is applied. Raises ``InvalidInput`` naming the field."""
        new = self.settings()
        for key in ("log_info", "log_warning", "log_error"):
            if key in changes:
                if not isinstance(changes[key], bool):
                    raise InvalidInput(f"'{key}' must be true or false")
                new[key] = changes[key]
        if "log_verbose_level" in changes:
            verbose = changes["log_verbose_level"]
            if not isinstance(verbose, int) or isinstance(verbose, bool) or not 0 <= verbose:
                raise InvalidInput("'log_verbose_level' must be a non-negative integer")
            new["log_verbose_level"] = verbose
        if "log_format" in changes:
            if changes["log_format"] not in self.FORMATS:
                raise InvalidInput(f"'log_format' must be one of {', '.join(self.FORMATS)}")
            new["log_format"] = changes["log_format"]
        if "log_file" in changes and changes["log_file"] != "":
            raise InvalidInput("'log_file' cannot be changed at run time (logs go to stderr)")
        self.info, self.warning, self.error = new["log_info"], new["log_warning"], new["log_error"]
        self.verbose = new["log_verbose_level"]
        self.format = new["log_format"]
        self._apply()
        return self.settings()

    def _apply(self) -> None:
        switched_on = [
            level
            for level, on in (
                (logging.DEBUG, self.verbose > 0),
                (logging.INFO, self.info),
                (logging.WARNING, self.warning),
                (logging.ERROR, self.error),
            )
            if on
        ]
        root = logging.getLogger()
        root.setLevel(min(switched_on, default=logging.CRITICAL + 1))
        for handler in root.handlers:
            if self not in handler.filters:
                handler.addFilter(self)
            handler.setFormatter(_formatter(self.format))
        access.setLevel(logging.INFO if self.info else logging.WARNING)
        ACCESS.text = self.format != "json"


CONTROL = LogControl()


def log_inference(
    model: str,
    version: str | None,
    status: int,
    started_ns: int,
    request_id: str | None,
    run: context.Execution | None = None,
) -> None:
    """The access-log line: who asked, what ran, how it was batched, where the time went
    (``run``)."""
    if access.isEnabledFor(logging.INFO):
        duration_ns = time.perf_counter_ns() - started_ns
        ACCESS.write((request_id, model, version, status, duration_ns, run))
