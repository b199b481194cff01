"""Per model-version statistics in the shape of Triton's statistics extension.

Plain counters, updated on the event loop only (no locks). Durations are nanoseconds, as Triton
reports them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class _BatchStat:
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)


@dataclass(slots=True)
class ModelStats:
    """Counters for one model version."""

    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)
    batches: dict[int, _BatchStat] = field(default_factory=dict)

    def record_execution(self, batch_size: int, requests: int, infer_ns: int) -> None:
        """One backend execution of ``batch_size`` items merged from ``requests`` requests."""
        self.execution_count += 1
        self.inference_count += batch_size
        self.compute_infer.add(infer_ns, requests)
        self.compute_input.add(0, requests)
        self.compute_output.add(0, requests)
        stat = self.batches.get(batch_size)
        if stat is None:
            stat = self.batches[batch_size] = _BatchStat()
        stat.compute_infer.add(infer_ns)
        stat.compute_input.add(0)
        stat.compute_output.add(0)
        self.last_inference_ms = int(time.time() * 1000)

    def record_queue(self, ns: int) -> None:
        self.queue.add(ns)

    def record_request(self, ok: bool, ns: int) -> None:
        (self.success if ok else self.fail).add(ns)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.to_dict(),
                "fail": self.fail.to_dict(),
                "queue": self.queue.to_dict(),
                "compute_input": self.compute_input.to_dict(),
                "compute_infer": self.compute_infer.to_dict(),
                "compute_output": self.compute_output.to_dict(),
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": s.compute_input.to_dict(),
                    "compute_infer": s.compute_infer.to_dict(),
                    "compute_output": s.compute_output.to_dict(),
                }
                for size, s in sorted(self.batches.items())
            ],
        }
