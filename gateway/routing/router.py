"""Routing *mechanism*: who is eligible, in-flight accounting, waiting for capacity, predictive
admission, probing, and the numbers behind ``GET /admin/hosts``.

The router knows targets by name only; what a target is (a remote host of any kind, the local
ONNX Runtime) is the caller's business (``gateway.routing.pool``, ``gateway.backends.routed``).
Per target it keeps in-flight counts, a capacity, health (``OutlierDetector``) and per
(target, model version) a ``LatencyEstimate`` and whether the model is ready there; the
``Policy`` picks among the eligible.

Cold start is priced by tier (``gateway.routing.tiers``): a model version ``loaded`` on a target
costs nothing extra, one ``cached`` there its measured load time (``load_s``, else
``default_load_s``), one only at the ``origin`` (or unknown) ``bytes / bandwidth`` plus that load
time, with the bytes from ``set_model_bytes`` (or what a fetch in progress has left) and the
bandwidth measured per target (``observe_transfer``, an edge's fetch progress between probes),
else ``default_bandwidth_bps``. The policy adds it to the expected completion, so a cold target
wins only when that total still beats the warm ones.

Membership changes at run time: a removed or replaced target leaves the pool at once (no new
leases) and stays in ``draining`` until its leases in flight have finished; ``drained`` waits
for that.

Why one module of this size: its parts share per-target state (in-flight, capacity, health,
estimates) kept consistent on the event loop; policy, estimators, pool, probing and discovery
already live outside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import Overloaded, Unavailable
from gateway.routing.budget import RetryBudget
from gateway.routing.estimators import Clock, LatencyEstimate
from gateway.routing.health import OutlierDetector
from gateway.routing.policies import Candidate, Policy
from gateway.routing.tiers import CACHED, LOADED, ORIGIN, HostModel

__all__ = ["FAILURE", "NEUTRAL", "SUCCESS", "Lease", "Router", "TargetState"]

log = logging.getLogger(__name__)

SUCCESS, FAILURE, NEUTRAL = "success", "failure", "neutral"
Probe = Callable[[str], Awaitable[bool]]


@dataclass(slots=True)
class TargetState:
    name: str
    weight: float = 1.0
    capacity: int = 16
    models: frozenset[str] | None = None  # placement; None: every model
    completed: int = 0
    failed: int = 0
    estimates: dict[str, LatencyEstimate] = field(default_factory=dict)
    ready: dict[str, bool] = field(default_factory=dict)  # model key -> ready there
    load_s: dict[str, float] = field(default_factory=dict)  # measured load (prepare) time
    tiers: dict[str, HostModel] = field(default_factory=dict)  # model key -> where it is there
    bandwidth_bps: float | None = None  # measured bytes/s of moving a model there
    fetch_seen: dict[str, tuple[float, int]] = field(default_factory=dict)  # key -> (t, bytes)
    # When each lease in flight there started (by id): how many are out, and the oldest one's
    # age, a floor on the latency estimate (see ``candidates``).
    started: dict[int, float] = field(default_factory=dict)

    @property
    def in_flight(self) -> int:
        return len(self.started)

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


class Lease:
    """One execution slot on one target; ``finish`` exactly once."""

    __slots__ = ("_done", "in_flight", "key", "router", "rows", "started_s", "target")

    def __init__(self, router: Router, target: TargetState, key: str, rows: int) -> None:
        self.router = router
        self.target = target
        self.key = key
        self.rows = rows
        self.in_flight = target.in_flight  # others in flight there when this one started
        self.started_s = router.clock()
        self._done = False

    @property
    def name(self) -> str:
        return self.target.name

    def finish(self, outcome: str) -> None:
        if self._done:
            return
        self._done = True
        self.router._finish(self, outcome)


class Router:
    def __init__(
        self,
        policy: Policy,
        *,
        clock: Clock = time.monotonic,
        outliers: OutlierDetector | None = None,
        budget: RetryBudget | None = None,
        # Peak-EWMA decay: how soon an idle host that was slow is tried again. Finagle's and
        # Linkerd's default; at 2 s a host three times slower was retried about once a second,
        # often enough (1.5-2.3 % of batches) to set the p99 of the whole service.
        decay_s: float = 10.0,
        default_load_s: float = 5.0,
        default_bandwidth_bps: float = 12.5e6,
        max_wait_s: float = 1.0,
        probe_interval_s: float = 2.0,
        probe_timeout_s: float = 1.0,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.outliers = outliers or OutlierDetector(clock=clock)
        self.budget = budget or RetryBudget()
        self.decay_s = decay_s
        self.default_load_s = default_load_s
        if default_bandwidth_bps <= 0:
            raise ValueError("default_bandwidth_bps must be > 0")
        self.default_bandwidth_bps = default_bandwidth_bps
        self.model_bytes: dict[str, int] = {}  # model key -> bytes of its files (when known)
        self.max_wait_s = max_wait_s
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.targets: dict[str, TargetState] = {}
        # Removed or replaced targets with batches still in flight: no new leases, their
        # leases finish normally (drain); dropped from here when the last one finishes.
        self.draining: list[TargetState] = []
        self._freed: asyncio.Event | None = None
        self._prober: asyncio.Task[None] | None = None

    # -- membership -------------------------------------------------------------------------

    def add_target(
        self,
        name: str,
        *,
        weight: float = 1.0,
        capacity: int = 16,
        models: Iterable[str] | None = None,
    ) -> TargetState:
        """A new target; one of the same name is replaced: it takes no new leases and drains
        (``draining``), and the new one starts with fresh health and estimates."""
        self.remove_target(name)
        state = TargetState(
            name, weight, capacity, frozenset(models) if models is not None else None
        )
        self.targets[name] = state
        self.outliers.add(name)
        self._wake()  # waiters for a free slot may take one here
        return state

    def remove_target(self, name: str) -> TargetState | None:
        """Take a target out of the pool at once; its leases in flight still finish (drain).
        Returns its state, None when there is no such target."""
        state = self.targets.pop(name, None)
        self.outliers.remove(name)
        if state is not None and state.in_flight > 0:
            self.draining.append(state)
        self._wake()  # waiters re-check: the model may have no eligible target left
        return state

    def is_current(self, state: TargetState) -> bool:
        """Whether ``state`` is still in the pool (not removed or replaced)."""
        return self.targets.get(state.name) is state

    async def drained(self, state: TargetState, timeout_s: float) -> bool:
        """Wait until no lease is in flight on ``state`` (removed from the pool beforehand, so
        none can start); False if some still are after ``timeout_s``."""
        give_up_s = self.clock() + timeout_s
        while state.in_flight > 0:
            left_s = give_up_s - self.clock()
            if left_s <= 0:
                return False
            freed = self._event()
            freed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left_s, 0.1)):
                    await freed.wait()
        return True

    def set_ready(self, name: str, key: str, ready: bool, load_s: float | None = None) -> None:
        target = self.targets.get(name)
        if target is None:
            return
        target.ready[key] = ready
        tier = target.tiers.get(key)
        if ready:
            target.tiers[key] = HostModel(LOADED)
        elif tier is not None and tier.tier == LOADED:
            target.tiers[key] = HostModel(CACHED)  # not there after all: at best its files are
        if load_s is not None:
            target.load_s[key] = load_s
        self._wake()

    def set_model_bytes(self, key: str, size: int) -> None:
        """The size of a model version's files: what moving it from the origin transfers."""
        self.model_bytes[key] = max(0, int(size))

    def observe_transfer(self, name: str, size: int, seconds: float) -> None:
        """``size`` bytes reached target ``name`` in ``seconds``: a bandwidth sample."""
        target = self.targets.get(name)
        if target is None or size <= 0 or seconds <= 0:
            return
        sample = size / seconds
        if target.bandwidth_bps is None:
            target.bandwidth_bps = sample
        else:
            target.bandwidth_bps = 0.5 * target.bandwidth_bps + 0.5 * sample

    def set_tier(self, name: str, key: str, model: HostModel) -> None:
        """Where model version ``key`` is on target ``name`` (from its repository index); a
        fetch in progress seen twice gives a bandwidth sample. Sets readiness to match."""
        target = self.targets.get(name)
        if target is None:
            return
        now = self.clock()
        if model.fetched_bytes is not None:
            seen = target.fetch_seen.get(key)
            if seen is not None and model.fetched_bytes > seen[1] and now > seen[0]:
                self.observe_transfer(name, model.fetched_bytes - seen[1], now - seen[0])
            target.fetch_seen[key] = (now, model.fetched_bytes)
        else:
            target.fetch_seen.pop(key, None)
        target.tiers[key] = model
        if target.ready.get(key, False) != (model.tier == LOADED):
            target.ready[key] = model.tier == LOADED
            self._wake()

    def bandwidth_bps(self, target: TargetState) -> float:
        return target.bandwidth_bps or self.default_bandwidth_bps

    def cold_cost(self, target: TargetState, key: str) -> tuple[str, float]:
        """The cold-start tier of ``key`` on ``target`` and its cost in seconds."""
        if target.ready.get(key, False):
            return LOADED, 0.0
        model = target.tiers.get(key)
        tier = ORIGIN if model is None else model.tier
        load_s = target.load_s.get(key, self.default_load_s)
        if tier in (LOADED, CACHED):  # LOADED but not ready: stale, price it as cached
            return CACHED, load_s
        left = model.left_bytes if model is not None else None
        if left is None:
            left = self.model_bytes.get(key)
        if left is None and model is not None:
            left = model.size_bytes
        return ORIGIN, (left or 0) / self.bandwidth_bps(target) + load_s

    # -- picking ----------------------------------------------------------------------------

    def _estimate(self, target: TargetState, key: str) -> LatencyEstimate:
        estimate = target.estimates.get(key)
        if estimate is None:
            estimate = target.estimates[key] = LatencyEstimate(self.decay_s, self.clock)
        return estimate

    def candidates(
        self, model: str, key: str, rows: int, exclude: Iterable[str] = ()
    ) -> tuple[list[Candidate], bool]:
        """The eligible candidates with free capacity, and whether any are eligible at all."""
        skip = set(exclude)
        out: list[Candidate] = []
        any_eligible = False
        for target in self.targets.values():
            if target.name in skip or not target.allows(model):
                continue
            if not self.outliers.available(target.name):
                continue
            any_eligible = True
            if target.in_flight >= target.capacity:
                continue
            estimate = self._estimate(target, key)
            _, cold_s = self.cold_cost(target, key)
            service_s = estimate.service_s(rows)
            if target.started:
                # A host idle for a while has a decayed estimate (so it is tried again), but a
                # batch sent there that has not come back in X seconds says its latency is at
                # least X now: without this floor, every batch until the first answer would
                # follow the probe to a slow host.
                service_s = max(service_s, self.clock() - min(target.started.values()))
            out.append(
                Candidate(
                    target.name,
                    target.in_flight,
                    target.capacity,
                    service_s,
                    estimate.samples > 0,
                    cold_s,
                    target.weight,
                    estimate.typical_in_flight,
                )
            )
        return out, any_eligible

    def try_acquire(
        self,
        model: str,
        key: str,
        rows: int,
        deadline_s: float | None = None,
        exclude: Iterable[str] = (),
    ) -> Lease | None:
        """A lease now, None when every eligible target is full; raises when none is eligible
        or (predictive admission) when no target can finish before the deadline."""
        candidates, any_eligible = self.candidates(model, key, rows, exclude)
        if not any_eligible:
            raise Unavailable(
                f"no healthy host for model '{model}'", retry_after_s=self.probe_interval_s
            )
        if not candidates:
            return None
        if deadline_s is not None and all(c.measured for c in candidates):
            best_s = min(c.completion_s() for c in candidates)
            remaining_s = deadline_s - self.clock()
            if best_s > remaining_s:
                raise Overloaded(
                    f"model '{model}': no host can finish within the deadline (best estimate "
                    f"{best_s * 1e3:.1f} ms, {max(0.0, remaining_s) * 1e3:.1f} ms left)",
                    retry_after_s=best_s,
                )
        chosen = self.policy.choose(candidates)
        target = self.targets[chosen.name]
        lease = Lease(self, target, key, rows)
        target.started[id(lease)] = lease.started_s
        return lease

    async def acquire(
        self,
        model: str,
        key: str,
        rows: int,
        deadline_s: float | None = None,
        exclude: Iterable[str] = (),
    ) -> Lease:
        """A lease, waiting (up to the deadline and ``max_wait_s``) while every host is full."""
        exclude = tuple(exclude)
        give_up_s = self.clock() + self.max_wait_s
        if deadline_s is not None:
            give_up_s = min(give_up_s, deadline_s)
        while True:
            lease = self.try_acquire(model, key, rows, deadline_s, exclude)
            if lease is not None:
                return lease
            wait_s = give_up_s - self.clock()
            if wait_s <= 0:
                raise Overloaded(
                    f"model '{model}': every host is at its in-flight limit",
                    retry_after_s=1.0,
                )
            freed = self._event()
            freed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await freed.wait()

    def _event(self) -> asyncio.Event:
        if self._freed is None:
            self._freed = asyncio.Event()
        return self._freed

    def _wake(self) -> None:
        if self._freed is not None:
            self._freed.set()

    def _finish(self, lease: Lease, outcome: str) -> None:
        target = lease.target
        target.started.pop(id(lease), None)
        if not self.is_current(target):
            # Removed or replaced while this lease ran: count it, but the health verdicts
            # belong to whatever has that name now (if anything).
            if outcome == SUCCESS:
                target.completed += 1
            elif outcome == FAILURE:
                target.failed += 1
            if target.in_flight <= 0:
                self.draining = [s for s in self.draining if s is not target]
            self._wake()
            return
        if outcome == SUCCESS:
            target.completed += 1
            target.ready[lease.key] = True
            latency_s = self.clock() - lease.started_s
            self._estimate(target, lease.key).observe(lease.rows, latency_s, lease.in_flight)
            if target.name in self.outliers.hosts:
                self.outliers.record_success(target.name)
        elif outcome == FAILURE:
            target.failed += 1
            if target.name in self.outliers.hosts and self.outliers.record_failure(target.name):
                log.warning("host %s ejected after consecutive failures", target.name)
        self._wake()

    # -- probing ----------------------------------------------------------------------------

    def start(self, probe: Probe) -> None:
        if self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(self._probe_loop(probe))

    async def _probe_one(self, probe: Probe, name: str) -> None:
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                ok = await probe(name)
        except Exception:
            ok = False
        before = self.outliers.hosts.get(name)
        was_up = before.probe_up if before is not None else True
        self.outliers.record_probe(name, ok)
        if ok != was_up:
            log.warning("host %s is %s", name, "up" if ok else "down")
            target = self.targets.get(name)
            if ok and target is not None:
                # Back after being down: most likely a new process (restarted, rescheduled),
                # so what was measured before says little. Unmeasured, it is tried at once,
                # one batch at a time until it answers, as a newly added host is.
                target.estimates.clear()
        self._wake()

    async def _probe_loop(self, probe: Probe) -> None:
        while True:
            await asyncio.gather(*(self._probe_one(probe, n) for n in list(self.targets)))
            await asyncio.sleep(self.probe_interval_s)

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None

    # -- admin ------------------------------------------------------------------------------

    def _model_row(self, target: TargetState, key: str) -> dict[str, Any]:
        tier, cold_s = self.cold_cost(target, key)
        model = target.tiers.get(key)
        row: dict[str, Any] = {
            "ready": target.ready.get(key, False),
            "load_s": target.load_s.get(key),
            "tier": tier,
            "cold_start_s": round(cold_s, 6),
        }
        if model is not None and model.left_bytes is not None:
            row["fetch_left_bytes"] = model.left_bytes
        row.update(self._estimate(target, key).to_dict())
        return row

    def table(self) -> dict[str, Any]:
        hosts = []
        for target in self.targets.values():
            hosts.append(
                {
                    "name": target.name,
                    **self.outliers.to_dict(target.name),
                    "weight": target.weight,
                    "in_flight": target.in_flight,
                    "capacity": target.capacity,
                    "completed": target.completed,
                    "failed": target.failed,
                    "bandwidth_bps": target.bandwidth_bps,
                    "models": {
                        key: self._model_row(target, key)
                        for key in sorted({*target.estimates, *target.ready, *target.tiers})
                    },
                }
            )
        return {
            "policy": self.policy.name,
            "retry_budget": self.budget.to_dict(),
            "hosts": hosts,
            "draining": [
                {
                    "name": t.name,
                    "in_flight": t.in_flight,
                    "completed": t.completed,
                    "failed": t.failed,
                }
                for t in self.draining
            ],
        }
