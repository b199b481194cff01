"""Retry budget (Envoy's ``retry_budget``): retries in flight are capped at a fraction of the
requests in flight, with a floor so a quiet gateway can still retry. It bounds the extra load a
failing host can cause: a retry storm cannot multiply traffic beyond ``1 + ratio``."""

from __future__ import annotations

__all__ = ["RetryBudget"]


class RetryBudget:
    def __init__(self, ratio: float = 0.2, min_concurrency: int = 3) -> None:
        if ratio < 0 or min_concurrency < 0:
            raise ValueError("ratio and min_concurrency must be >= 0")
        self.ratio = ratio
        self.min_concurrency = min_concurrency
        self.active_requests = 0
        self.active_retries = 0
        self.granted = 0
        self.denied = 0

    def start_request(self) -> None:
        self.active_requests += 1

    def end_request(self) -> None:
        self.active_requests -= 1

    def limit(self) -> int:
        return max(self.min_concurrency, int(self.ratio * self.active_requests))

    def try_retry(self) -> bool:
        """Take a retry slot if the budget allows; pair with ``end_retry``."""
        if self.active_retries >= self.limit():
            self.denied += 1
            return False
        self.active_retries += 1
        self.granted += 1
        return True

    def end_retry(self) -> None:
        self.active_retries -= 1

    def to_dict(self) -> dict[str, int | float]:
        return {
            "ratio": self.ratio,
            "active_requests": self.active_requests,
            "active_retries": self.active_retries,
            "granted": self.granted,
            "denied": self.denied,
        }
