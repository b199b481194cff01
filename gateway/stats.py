"""Per model-version statistics in the shape of Triton's statistics extension.

Plain counters, updated on the event loop only (no locks). Durations are nanoseconds, as Triton
reports them.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Any

# Upper bounds (seconds) of the request-latency histogram exported to Prometheus.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


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
    cache_hit: _Duration = field(default_factory=_Duration)  # lookup time of hits
    cache_miss: _Duration = field(default_factory=_Duration)  # lookup + insertion of misses
    batches: dict[int, _BatchStat] = field(default_factory=dict)
    fail_reasons: dict[str, int] = field(default_factory=dict)
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))

    def record_execution(
        self,
        batch_size: int,
        requests: int,
        compute_ns: int,
        input_ns: int = 0,
        output_ns: int = 0,
    ) -> None:
        """One backend execution of ``batch_size`` items merged from ``requests`` requests that
        took ``compute_ns``, ``input_ns`` and ``output_ns`` of it preparing inputs and reading
        outputs. As Triton counts them: each request of the batch adds the whole execution's
        durations to the model's totals (Triton 2.51: a batch of two running 0.6 s adds 1.2 s
        of compute_infer), each execution once to its batch size's."""
        input_ns = max(0, min(input_ns, compute_ns))
        output_ns = max(0, min(output_ns, compute_ns - input_ns))
        infer_ns = compute_ns - input_ns - output_ns
        self.execution_count += 1
        self.inference_count += batch_size
        # (``_Duration.add`` spelled out here and below: these run per batch and per request,
        # and each call is interpreter time on the event loop.)
        total = self.compute_infer
        total.count += requests
        total.ns += infer_ns * requests
        total = self.compute_input
        total.count += requests
        total.ns += input_ns * requests
        total = self.compute_output
        total.count += requests
        total.ns += output_ns * requests
        stat = self.batches.get(batch_size)
        if stat is None:
            stat = self.batches[batch_size] = _BatchStat()
        one = stat.compute_infer
        one.count += 1
        one.ns += infer_ns
        one = stat.compute_input
        one.count += 1
        one.ns += input_ns
        one = stat.compute_output
        one.count += 1
        one.ns += output_ns
        self.last_inference_ms = int(time.time() * 1000)

    def record_queue(self, ns: int, count: int = 1) -> None:
        """``count=0`` adds time to requests already counted."""
        queue = self.queue
        queue.count += count
        queue.ns += ns

    def record_request(self, ok: bool, ns: int, reason: str = "") -> None:
        """One finished request; ``reason`` names the failure class (Triton's label values)."""
        duration = self.success if ok else self.fail
        duration.count += 1
        duration.ns += ns
        if not ok:
            self.fail_reasons[reason or "OTHER"] = self.fail_reasons.get(reason or "OTHER", 0) + 1
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, ns / 1e9)] += 1

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
                "cache_hit": self.cache_hit.to_dict(),
                "cache_miss": self.cache_miss.to_dict(),
            },
            "response_stats": {},  # Triton's, for decoupled models (none here)
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": s.compute_input.to_dict(),
                    "compute_infer": s.compute_infer.to_dict(),
                    "compute_output": s.compute_output.to_dict(),
                }
                for size, s in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }
