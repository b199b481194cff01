"""Structured logging: JSON lines, one access-log line per inference request."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from gateway import context

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


def configure(level: str, fmt: str) -> None:
    """Root logging for ``gateway serve``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def log_inference(
    model: str, version: str | None, status: int, started_ns: int, request_id: str | None
) -> None:
    """The access-log line: who asked, what ran, how it was batched, where the time went."""
    if not access.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "request_id": request_id,
        "model": model,
        "version": version or "",
        "status": status,
        "duration_ms": round((time.perf_counter_ns() - started_ns) / 1e6, 3),
    }
    run = context.execution.get()
    if run is not None:
        fields.update(
            batch_size=run.batch_size,
            queue_ms=round(run.queue_ns / 1e6, 3),
            compute_ms=round(run.compute_ns / 1e6, 3),
            host=run.host or "local",
        )
    access.info("infer", extra={"fields": fields})
