"""Latency estimates per (host, model): peak-EWMA level + online batch-cost shape.

``PeakEwma`` is Finagle's / Linkerd's estimator: a sample above the estimate replaces it at once
(slowness is believed immediately), a sample below pulls it down with time constant
``decay_s``; reading it decays it toward zero with the time since the last sample, so a host
that was slow and then left alone is eventually tried again.

``BatchCostFit`` fits service time ``a * rows + b`` by exponentially forgotten least squares,
so a batch of 32 rows is not priced like a batch of 1.

``LatencyEstimate`` combines them: the level comes from the peak-EWMA of observed latency, the
fit rescales it from the typical batch size seen to the batch at hand. It also keeps the typical
number of requests in flight when the samples were taken: a remote gateway serves many batches at
once, so its latency at its usual load is already in the samples; the policy scales it by how
much busier the host is *now* than usual, not by the raw in-flight count (which would price a
parallel host as a serial queue and push traffic onto a slow, idle one).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

Clock = Callable[[], float]

__all__ = ["BatchCostFit", "Clock", "LatencyEstimate", "PeakEwma"]


class PeakEwma:
    """Peak-sensitive exponentially weighted moving average of a latency, in seconds."""

    def __init__(self, decay_s: float = 2.0, clock: Clock = time.monotonic) -> None:
        if decay_s <= 0:
            raise ValueError("decay_s must be > 0")
        self.decay_s = decay_s
        self._clock = clock
        self._value_s = 0.0
        self._stamp_s = clock()
        self.samples = 0

    def observe(self, latency_s: float) -> None:
        now = self._clock()
        current = self.decayed(now)
        if latency_s > current:
            self._value_s = latency_s
        else:
            # Weight of the old value: how much of it survives the gap since the last sample,
            # but never more than one sample's worth of smoothing at high rates.
            weight = min(math.exp(-(now - self._stamp_s) / self.decay_s), 0.9)
            self._value_s = current * weight + latency_s * (1.0 - weight)
        self._stamp_s = now
        self.samples += 1

    def decayed(self, now: float) -> float:
        """The estimate at clock reading ``now`` (one clock reading for many estimates)."""
        return self._value_s * math.exp(-max(0.0, now - self._stamp_s) / self.decay_s)

    @property
    def value_s(self) -> float:
        """The estimate now (decayed toward zero with idle time)."""
        return self.decayed(self._clock())


class BatchCostFit:
    """Online least squares of ``latency_s = a * rows + b`` with forgetting factor ``keep``."""

    def __init__(self, keep: float = 0.98) -> None:
        self.keep = keep
        self._s0 = self._sn = self._sy = self._snn = self._sny = 0.0
        self.samples = 0
        self._coefficients: tuple[float, float] | None = None  # cached until the next sample

    def observe(self, rows: int, latency_s: float) -> None:
        k = self.keep
        self._s0 = self._s0 * k + 1.0
        self._sn = self._sn * k + rows
        self._sy = self._sy * k + latency_s
        self._snn = self._snn * k + rows * rows
        self._sny = self._sny * k + rows * latency_s
        self.samples += 1
        self._coefficients = None

    def coefficients(self) -> tuple[float, float] | None:
        """``(a, b)``; ``a`` is 0 until batch sizes vary. None before any sample."""
        if self._coefficients is None:
            self._coefficients = self._solve()
        return self._coefficients

    def _solve(self) -> tuple[float, float] | None:
        if self._s0 <= 0:
            return None
        mean_y = self._sy / self._s0
        det = self._s0 * self._snn - self._sn * self._sn
        if det <= 1e-9 * max(1.0, self._s0 * self._snn):
            return 0.0, max(0.0, mean_y)
        a = (self._s0 * self._sny - self._sn * self._sy) / det
        a = max(0.0, a)
        b = max(0.0, (self._sy - a * self._sn) / self._s0)
        return a, b

    def predict_s(self, rows: int) -> float | None:
        coef = self.coefficients()
        if coef is None:
            return None
        return coef[0] * rows + coef[1]


class LatencyEstimate:
    """Expected service time of a batch of ``rows`` on one host for one model."""

    def __init__(self, decay_s: float = 2.0, clock: Clock = time.monotonic) -> None:
        self.peak = PeakEwma(decay_s, clock)
        self.fit = BatchCostFit()
        self._mean_rows = 1.0
        self._mean_in_flight = 0.0
        # (a, b, cost of the typical batch) of the fit, cached until the next sample: a
        # decision prices a few candidates, each with its own estimate.
        self._shape: tuple[float, float, float] | None = None

    @property
    def samples(self) -> int:
        return self.peak.samples

    @property
    def typical_in_flight(self) -> float:
        """EWMA of the other requests in flight on the host when each sample started."""
        return self._mean_in_flight

    def observe(self, rows: int, latency_s: float, in_flight: int = 0) -> None:
        self.peak.observe(latency_s)
        self.fit.observe(rows, latency_s)
        self._shape = None
        if self.samples > 1:
            self._mean_rows = 0.9 * self._mean_rows + 0.1 * rows
            self._mean_in_flight = 0.9 * self._mean_in_flight + 0.1 * in_flight
        else:
            self._mean_rows, self._mean_in_flight = float(rows), float(in_flight)

    def service_s(self, rows: int = 1, now: float | None = None) -> float:
        """``now``: the clock reading, when the caller has one (a decision reads it once)."""
        level = self.peak.value_s if now is None else self.peak.decayed(now)
        shape = self._shape
        if shape is None:
            coef = self.fit.coefficients()
            if coef is None:
                return level
            a, b = coef
            shape = self._shape = (a, b, a * (round(self._mean_rows) or 1) + b)
        a, b, typical = shape
        if typical <= 0:
            return level
        return level * (a * rows + b) / typical

    def to_dict(self) -> dict[str, float | int | None]:
        coef = self.fit.coefficients()
        return {
            "peak_ewma_s": round(self.peak.value_s, 6),
            "fit_a_s_per_row": round(coef[0], 6) if coef else None,
            "fit_b_s": round(coef[1], 6) if coef else None,
            "typical_in_flight": round(self._mean_in_flight, 2),
            "samples": self.samples,
        }
