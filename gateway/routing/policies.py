"""Routing *policies*: given the eligible candidates, pick one. Nothing else.

Eligibility (health, ejection, in-flight caps, placement) and bookkeeping live in
``gateway.routing.router``; a policy only sees a snapshot per candidate and returns one of them.
Policies are chosen by name (``POLICIES``), like uvicorn's protocol implementations.

- ``round_robin``: smooth weighted round robin (nginx's), blind to load and latency; on a large
  pool the router hands out targets in turn itself (``rotates``), in O(1) per pick.
- ``least_request``: power of two choices on in-flight / weight.
- ``latency``: power of two choices on expected completion time,
  ``expected_service_s * (in_flight + 1) / (typical_in_flight + 1) + cold_start_s``, divided by
  weight: Finagle/Linkerd's peak-EWMA balancer (which is the ``typical_in_flight = 0`` case),
  with the latency measured at the host's usual load scaled by how much busier it is now, a
  batch-aware service time and a cold-start term. Costs within ``tolerance`` of each other count
  as equal and the one with fewer in flight wins, so equally fast hosts share evenly instead of
  drifting apart (the normalised cost is indifferent to where the load sits among equals).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "POLICIES",
    "Candidate",
    "LatencyPolicy",
    "LeastRequestPolicy",
    "Policy",
    "RoundRobinPolicy",
    "make_policy",
]

# Cost of a candidate with requests in flight but no latency sample yet (Finagle's "penalty"):
# high enough that an unmeasured host gets one request at a time until it reports back.
UNMEASURED_PENALTY_S = 60.0


@dataclass(slots=True)
class Candidate:
    """What a policy may know about one eligible target for one request. (A snapshot, not
    frozen only because a frozen dataclass takes four times as long to build, and a decision
    builds one per target it looks at.)"""

    name: str
    in_flight: int
    capacity: int
    service_s: float  # expected service time of this batch; 0.0 when unmeasured
    measured: bool
    cold_start_s: float = 0.0  # extra when the model is not ready there
    weight: float = 1.0
    typical_in_flight: float = 0.0  # in flight (others) when the latency samples were taken

    def completion_s(self) -> float:
        """Expected time until this request would complete there."""
        if not self.measured:
            return self.cold_start_s + (UNMEASURED_PENALTY_S if self.in_flight else 0.0)
        load = (self.in_flight + 1) / (self.typical_in_flight + 1)
        return load * self.service_s + self.cold_start_s


class Policy(Protocol):
    name: str
    # True: the router hands out targets in turn (``Router._rotate``) on large pools instead of
    # sampling candidates for ``choose``.
    rotates: bool

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        """Pick one of a non-empty sequence."""

    def pick(self, a: Candidate, b: Candidate) -> Candidate:
        """The better of two candidates already drawn at random (``Router`` on large pools)."""


class RoundRobinPolicy:
    """Smooth weighted round robin: each pick adds every weight, takes the largest, subtracts
    the total; equal weights degrade to plain rotation."""

    name = "round_robin"
    rotates = True

    def __init__(self, rng: random.Random | None = None) -> None:
        self._current: dict[str, float] = {}

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        if len(self._current) > 2 * len(candidates) + 16:
            # Targets gone (DNS members churn): keep only the state of those still offered.
            names = {c.name for c in candidates}
            self._current = {n: v for n, v in self._current.items() if n in names}
        total = 0.0
        best: Candidate | None = None
        for c in candidates:
            value = self._current.get(c.name, 0.0) + c.weight
            self._current[c.name] = value
            total += c.weight
            if best is None or value > self._current[best.name]:
                best = c
        assert best is not None
        self._current[best.name] -= total
        return best

    def pick(self, a: Candidate, b: Candidate) -> Candidate:
        return self.choose((a, b))


class _PowerOfTwo:
    """Sample two distinct candidates at random and keep the cheaper one."""

    name = ""
    rotates = False

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def cost(self, c: Candidate) -> float:
        raise NotImplementedError

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(range(len(candidates)), 2)
        return self.pick(candidates[first], candidates[second])

    def pick(self, a: Candidate, b: Candidate) -> Candidate:
        cost_a, cost_b = self.cost(a), self.cost(b)
        if cost_a == cost_b:
            return a if self._rng.random() < 0.5 else b
        return a if cost_a < cost_b else b


class LeastRequestPolicy(_PowerOfTwo):
    name = "least_request"

    def cost(self, c: Candidate) -> float:
        return (c.in_flight + 1) / c.weight


class LatencyPolicy(_PowerOfTwo):
    name = "latency"

    def __init__(self, rng: random.Random | None = None, tolerance: float = 0.05) -> None:
        super().__init__(rng)
        self.tolerance = tolerance

    def cost(self, c: Candidate) -> float:
        return c.completion_s() / c.weight

    def pick(self, a: Candidate, b: Candidate) -> Candidate:
        cost_a, cost_b = self.cost(a), self.cost(b)
        if abs(cost_a - cost_b) <= self.tolerance * max(cost_a, cost_b):
            load_a, load_b = (a.in_flight + 1) / a.weight, (b.in_flight + 1) / b.weight
            if load_a != load_b:
                return a if load_a < load_b else b
        if cost_a == cost_b:
            return a if self._rng.random() < 0.5 else b
        return a if cost_a < cost_b else b


POLICIES: dict[str, Callable[[random.Random | None], Policy]] = {
    "latency": LatencyPolicy,
    "least_request": LeastRequestPolicy,
    "round_robin": RoundRobinPolicy,
}


def make_policy(name: str, rng: random.Random | None = None) -> Policy:
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown routing policy {name!r}; expected one of {sorted(POLICIES)}"
        ) from None
    return factory(rng)
