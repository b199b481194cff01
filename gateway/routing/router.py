"""Routing *mechanism*: who is eligible, in-flight accounting, waiting for capacity, predictive
admission, probing, and the numbers behind ``GET /admin/hosts``. (Over 450 lines on purpose:
these read and write the same per-target state, on the event loop; the
policies, tiers, estimates and outlier detection are modules of their own already.)

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

At fleet sizes (hundreds to thousands of targets) nothing per decision or per probe round is
O(targets): a decision draws a few targets at random (``try_acquire``), round robin hands them
out in turn, each target is probed on its own jittered schedule within ``probe_rate``, and a
target that just answered traffic is not probed at all. Decisions draw within the aperture
(``gateway.routing.aperture``: a stable, load-sized subset, so connections are reused), and
outside it only for what the aperture lacks: a version loaded only there, a cold placement,
free slots when all of its hosts are full.

Why one module of this size: its parts share per-target state (in-flight, capacity, health,
estimates) kept consistent on the event loop; policy, estimators, pool, probing and discovery
already live outside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import Overloaded, Unavailable
from gateway.routing.aperture import Aperture
from gateway.routing.budget import RetryBudget
from gateway.routing.estimators import Clock, LatencyEstimate
from gateway.routing.health import OutlierDetector
from gateway.routing.members import Members
from gateway.routing.policies import Candidate, Policy
from gateway.routing.schedule import ProbeSchedule
from gateway.routing.tiers import CACHED, LOADED, ORIGIN, HostModel

__all__ = ["FAILURE", "NEUTRAL", "SCAN_BELOW", "SUCCESS", "Lease", "Router", "TargetState"]

log = logging.getLogger(__name__)

SUCCESS, FAILURE, NEUTRAL = "success", "failure", "neutral"
Probe = Callable[[str], Awaitable[bool]]
Serving = Callable[[str], bool]  # whether a target serves the model now (no I/O)

# Up to this many targets a decision looks at every one (exact, and cheap at that size); above
# it, it samples (``Router.try_acquire``).
SCAN_BELOW = 8
# Random draws per sample before falling back to a full scan (most targets full, down or not
# placed for the model: the rare case a scan is worth its cost).
SAMPLE_DRAWS = 8
_SETS = (set, frozenset)


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
    rr_credit: float = 0.0  # round robin: picks owed to it in the current turn (weighted)
    last_success_s: float = float("-inf")  # when a batch there last succeeded (probes skip it)

    @property
    def in_flight(self) -> int:
        return len(self.started)

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


class Lease:
    """One execution slot on one target; ``finish`` exactly once."""

    __slots__ = ("_done", "in_flight", "key", "router", "rows", "started_s", "target")

    def __init__(
        self,
        router: Router,
        target: TargetState,
        key: str,
        rows: int,
        started_s: float | None = None,
    ) -> None:
        self.router = router
        self.target = target
        self.key = key
        self.rows = rows
        self.in_flight = len(target.started)  # others in flight there when this one started
        self.started_s = router.clock() if started_s is None else started_s
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
        probe_idle_interval_s: float = 60.0,
        probe_timeout_s: float = 1.0,
        probe_jitter: float = 0.2,
        probe_rate: float = 100.0,
        probe_concurrency: int = 64,
        rng: random.Random | None = None,
        aperture: Aperture | None = None,
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
        # Hosts outside the aperture take no traffic from this front: probed this often
        # (Envoy's ``no_traffic_interval``), what they are matters only when the aperture
        # reaches them, a version is loaded only there, or a cold placement picks one.
        self.probe_idle_interval_s = max(probe_idle_interval_s, probe_interval_s)
        self.probe_timeout_s = probe_timeout_s
        if not 0 <= probe_jitter < 1 or probe_rate <= 0 or probe_concurrency < 1:
            raise ValueError("probe_jitter in [0, 1), probe_rate > 0, probe_concurrency >= 1")
        self.probe_jitter = probe_jitter  # fraction of the period a probe moves at random
        self.probe_rate = probe_rate  # probes per second over all hosts, at most (about)
        self.probe_concurrency = probe_concurrency
        self.probes_sent = 0
        self.probes_skipped = 0  # the host had answered real traffic just before
        self.targets: dict[str, TargetState] = {}
        self.changes = 0  # counts targets added and removed
        self._ring = Members()  # every target, for random draws and rotation
        self._loaded: dict[str, Members] = {}  # model key -> targets where it is ready
        self._rng = rng or random.Random()
        # The hosts this front sends its traffic to on a large pool (``gateway.routing.aperture``);
        # off (every host) unless given.
        self.aperture = aperture or Aperture(0, 1.0, 0.0)
        self.leases_out = 0  # leases in flight over all targets: the aperture's load
        self._rr_at = 0  # round robin: index into the ring
        self._max_weight: float | None = None  # of the targets (round robin); None: recompute
        # Removed or replaced targets with batches still in flight: no new leases, their
        # leases finish normally (drain); dropped from here when the last one finishes.
        self.draining: list[TargetState] = []
        self._freed: asyncio.Event | None = None
        self._prober: asyncio.Task[None] | None = None
        self._schedule = ProbeSchedule()  # when each target is probed next

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
        self.changes += 1
        self._ring.add(state)
        self.aperture.add(state)
        self._max_weight = None
        self.outliers.add(name)
        self._wake()  # waiters for a free slot may take one here
        return state

    def remove_target(self, name: str) -> TargetState | None:
        """Take a target out of the pool at once; its leases in flight still finish (drain).
        Returns its state, None when there is no such target."""
        state = self.targets.pop(name, None)
        self.outliers.remove(name)
        if state is not None:
            self.changes += 1
            self._ring.discard(name)
            self.aperture.discard(name)
            self._max_weight = None
            for key, ready in state.ready.items():
                members = self._loaded.get(key)
                if ready and members is not None:
                    members.discard(name)
                    if not members:
                        del self._loaded[key]
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
        self._set_ready(target, key, ready)
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
            self._set_ready(target, key, model.tier == LOADED)
            self._wake()

    def _set_ready(self, target: TargetState, key: str, ready: bool) -> None:
        """``target.ready[key]``, and the index of where each key is ready (a current target's)."""
        target.ready[key] = ready
        if not self.is_current(target):
            return
        self.aperture.note_ready(target, key, ready)
        if ready:
            self._loaded.setdefault(key, Members()).add(target)
        else:
            members = self._loaded.get(key)
            if members is not None:
                members.discard(target.name)
                if not members:
                    del self._loaded[key]

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

    def _usable(
        self, target: TargetState, model: str, skip: Collection[str], serving: Serving | None
    ) -> bool:
        """Eligible: placed for the model, not excluded, serving it, healthy."""
        return (
            (target.models is None or model in target.models)
            and target.name not in skip
            and (serving is None or serving(target.name))
            and self.outliers.available(target.name)
        )

    def _candidate(self, target: TargetState, key: str, rows: int, now: float) -> Candidate:
        estimate = self._estimate(target, key)
        cold_s = 0.0 if target.ready.get(key, False) else self.cold_cost(target, key)[1]
        service_s = estimate.service_s(rows, now)
        if target.started:
            # A host idle for a while has a decayed estimate (so it is tried again), but a
            # batch sent there that has not come back in X seconds says its latency is at
            # least X now: without this floor, every batch until the first answer would
            # follow the probe to a slow host. (Leases are kept in start order: the first
            # one is the oldest.)
            service_s = max(service_s, now - next(iter(target.started.values())))
        return Candidate(
            target.name,
            target.in_flight,
            target.capacity,
            service_s,
            estimate.samples > 0,
            cold_s,
            target.weight,
            estimate.typical_in_flight,
        )

    def candidates(
        self,
        model: str,
        key: str,
        rows: int,
        exclude: Iterable[str] = (),
        serving: Serving | None = None,
    ) -> tuple[list[Candidate], bool]:
        """Every eligible candidate with free capacity (a full scan), and whether any are
        eligible at all."""
        skip = exclude if isinstance(exclude, set | frozenset) else set(exclude)
        out: list[Candidate] = []
        any_eligible = False
        now = self.clock()
        for target in self.targets.values():
            if not self._usable(target, model, skip, serving):
                continue
            any_eligible = True
            if target.in_flight < target.capacity:
                out.append(self._candidate(target, key, rows, now))
        return out, any_eligible

    def _draw(
        self,
        members: Members,
        want: int,
        picked: list[TargetState],
        model: str,
        skip: Collection[str],
        serving: Serving | None,
    ) -> bool:
        """Add up to ``want`` distinct eligible targets with free capacity to ``picked``, drawn
        at random from ``members`` (at most ``SAMPLE_DRAWS`` draws); whether one of those
        drawn was full."""
        items = members.items
        n = len(items)
        full = False
        if n == 0:
            return full
        draw = self._rng.random
        for _ in range(SAMPLE_DRAWS):
            if want <= 0:
                return full
            target = items[int(draw() * n)]
            if len(target.started) >= target.capacity:
                full = True
                continue
            for other in picked:
                if other is target:
                    break
            else:
                if self._usable(target, model, skip, serving):
                    picked.append(target)
                    want -= 1
        return full

    def _sampled(
        self,
        model: str,
        key: str,
        rows: int,
        skip: Collection[str],
        serving: Serving | None,
        aperture: Aperture | None,
        now: float,
    ) -> tuple[list[Candidate], bool]:
        """The candidates of a sampled decision, in the order the policy should see them: two
        drawn among the targets where the version is loaded (in the aperture when there is
        one, else or when it has too few free: among all), then one (two when none is
        loaded) from all, so a cold target can still win when it is worth its start. Empty
        when the draws found none (the caller scans). And whether the draws in the aperture
        found too few because its hosts were full (it should grow)."""
        picked: list[TargetState] = []
        pressure = False
        if aperture is not None:
            near = aperture.loaded.get(key)
            if near is not None:
                full = self._draw(near, 2, picked, model, skip, serving)
                pressure = full and len(picked) < 2
        loaded = self._loaded.get(key)
        if len(picked) < 2 and loaded is not None:
            self._draw(loaded, 2 - len(picked), picked, model, skip, serving)
        warm = len(picked)
        if warm < 2 or len(loaded or ()) < len(self._ring):  # else every target is warm
            self._draw(self._ring, 2 - warm if warm < 2 else 1, picked, model, skip, serving)
        if warm == 2 and len(picked) == 3 and picked[2].ready.get(key, False):
            picked.pop()  # a third warm one adds nothing to the two drawn among them
        return [self._candidate(t, key, rows, now) for t in picked], pressure

    def _rotate(
        self, members: Members, model: str, skip: Collection[str], serving: Serving | None
    ) -> TargetState | None:
        """Weighted round robin over ``members`` (the ring, or the aperture) in O(1) per pick:
        a target's turn lasts while it has credit (its weight over the largest weight, added
        each time its turn comes, so a target of half the weight is picked every other round).
        None when a full turn found none eligible with a free slot (the caller scans)."""
        items = members.items
        n = len(items)
        if n == 0:
            return None
        if self._max_weight is None:
            self._max_weight = max(t.weight for t in self._ring.items)
        top = self._max_weight
        for _ in range(2 * n + 1):
            self._rr_at %= n
            target = items[self._rr_at]
            if target.rr_credit >= 1.0:
                target.rr_credit -= 1.0
                if target.in_flight < target.capacity and self._usable(
                    target, model, skip, serving
                ):
                    return target
            self._rr_at = (self._rr_at + 1) % n
            following = items[self._rr_at]
            following.rr_credit = min(2.0, following.rr_credit + following.weight / top)
        return None

    def _deadline_check(
        self,
        model: str,
        key: str,
        rows: int,
        deadline_s: float,
        sampled: Sequence[Candidate],
        skip: Collection[str],
        serving: Serving | None,
    ) -> None:
        """Predictive admission: ``Overloaded`` when every eligible target is measured and
        none is expected to finish before the deadline. The sampled candidates settle it
        when one of them can (or is unmeasured); only otherwise are all looked at."""
        remaining_s = deadline_s - self.clock()
        for c in sampled:
            if not c.measured or c.completion_s() <= remaining_s:
                return
        self._refuse_late(model, self.candidates(model, key, rows, skip, serving)[0], deadline_s)

    def _refuse_late(self, model: str, candidates: Sequence[Candidate], deadline_s: float) -> None:
        """``Overloaded`` when every candidate (all of them) is measured and none is expected
        to finish before the deadline."""
        if not candidates or not all(c.measured for c in candidates):
            return
        best_s = min(c.completion_s() for c in candidates)
        remaining_s = deadline_s - self.clock()
        if best_s > remaining_s:
            raise Overloaded(
                f"model '{model}': no host can finish within the deadline (best estimate "
                f"{best_s * 1e3:.1f} ms, {max(0.0, remaining_s) * 1e3:.1f} ms left)",
                retry_after_s=best_s,
            )

    def _choose(self, candidates: Sequence[Candidate]) -> Candidate:
        """The policy's pick of the first two (drawn at random already), then the winner
        against any further one."""
        winner = candidates[0]
        for other in candidates[1:]:
            winner = self.policy.pick(winner, other)
        return winner

    def try_acquire(
        self,
        model: str,
        key: str,
        rows: int,
        deadline_s: float | None = None,
        exclude: Iterable[str] = (),
        serving: Serving | None = None,
    ) -> Lease | None:
        """A lease now, None when every eligible target is full; raises when none is eligible
        or (predictive admission) when no target can finish before the deadline.

        Up to ``SCAN_BELOW`` targets, the policy sees every eligible one. Above, a decision
        costs the same at any pool size: power-of-two-choices policies see a few drawn at
        random (``_sampled``), round robin takes the next in turn (``_rotate``); a full scan
        happens only when the draws find nothing (most targets full or down), or to confirm
        that no target at all can meet the deadline."""
        skip = exclude if isinstance(exclude, _SETS) else set(exclude)
        chosen: TargetState | None = None
        now = self.clock()
        if len(self._ring) >= SCAN_BELOW:
            aperture = self.aperture if self.aperture.active(len(self._ring)) else None
            if aperture is not None and now >= aperture.due_s:
                aperture.refresh(now, self.outliers.available)
            if self.policy.rotates:
                members = self._ring if aperture is None else aperture.members
                chosen = self._rotate(members, model, skip, serving)
                pressure = chosen is None and any(  # rare: the aperture's hosts are full
                    len(t.started) >= t.capacity for t in members.items
                )
                if chosen is not None and deadline_s is not None:
                    candidate = self._candidate(chosen, key, rows, now)
                    self._deadline_check(model, key, rows, deadline_s, [candidate], skip, serving)
            else:
                sampled, pressure = self._sampled(model, key, rows, skip, serving, aperture, now)
                if sampled:
                    if deadline_s is not None:
                        self._deadline_check(model, key, rows, deadline_s, sampled, skip, serving)
                    chosen = self.targets[self._choose(sampled).name]
            if aperture is not None:
                out = self.leases_out + 1
                if pressure or out > aperture.grow_above or out < aperture.shrink_below:
                    aperture.resize(out, len(self._ring), now, pressure)
        if chosen is None:
            candidates, any_eligible = self.candidates(model, key, rows, skip, serving)
            if not any_eligible:
                raise Unavailable(
                    f"no healthy host for model '{model}'", retry_after_s=self.probe_interval_s
                )
            if not candidates:
                return None
            if deadline_s is not None:
                self._refuse_late(model, candidates, deadline_s)
            chosen = self.targets[self.policy.choose(candidates).name]
        lease = Lease(self, chosen, key, rows, now)
        chosen.started[id(lease)] = now
        self.leases_out += 1
        return lease

    async def acquire(
        self,
        model: str,
        key: str,
        rows: int,
        deadline_s: float | None = None,
        exclude: Iterable[str] = (),
        serving: Serving | None = None,
    ) -> Lease:
        """A lease, waiting (up to the deadline and ``max_wait_s``) while every host is full."""
        exclude = frozenset(exclude)
        give_up_s = self.clock() + self.max_wait_s
        if deadline_s is not None:
            give_up_s = min(give_up_s, deadline_s)
        while True:
            lease = self.try_acquire(model, key, rows, deadline_s, exclude, serving)
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
        self.leases_out -= 1
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
            target.last_success_s = self.clock()
            if not target.ready.get(lease.key, False):
                self._set_ready(target, lease.key, True)
            latency_s = self.clock() - lease.started_s
            self._estimate(target, lease.key).observe(lease.rows, latency_s, lease.in_flight)
            if target.name in self.outliers.hosts:
                self.outliers.record_success(target.name)
        elif outcome == FAILURE:
            target.failed += 1
            if target.name in self.outliers.hosts and self.outliers.record_failure(target.name):
                log.warning("host %s ejected after consecutive failures", target.name)
                self.aperture.changed()  # the next host along the ring takes its place
                # Its next probe was planned while it was well (outside the aperture: up to
                # a minute away); the probe that can re-admit it is due when the time is up.
                self._schedule.sooner(target, self._next_probe_s(target, self.clock()))
        self._wake()

    # -- probing ----------------------------------------------------------------------------

    def start(self, probe: Probe) -> None:
        if self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(self._probe_loop(probe))

    def probe_period_s(self) -> float:
        """Time between two probes of a healthy host: ``probe_interval_s``, stretched so that
        the probes of all hosts stay within ``probe_rate`` per second (passive detection
        watches the hosts that take traffic in between)."""
        return max(self.probe_interval_s, len(self.targets) / self.probe_rate)

    def _next_probe_s(self, target: TargetState, now: float) -> float:
        """When to probe ``target`` next: a host down or ejected every ``probe_interval_s``
        (it is waiting for a probe to come back), one outside the aperture every
        ``probe_idle_interval_s``, any other every ``probe_period_s``; each moved by up to
        ``probe_jitter`` of it at random, so probes do not come in waves. An ejected host is
        probed no later than when its ejection ends: only a probe from then on re-admits it."""
        health = self.outliers.hosts.get(target.name)
        away = health is not None and (not health.probe_up or health.ejected_until_s is not None)
        if away:
            period_s = self.probe_interval_s
        elif self.aperture.active(len(self._ring)) and target not in self.aperture.members:
            period_s = max(self.probe_idle_interval_s, self.probe_period_s())
        else:
            period_s = self.probe_period_s()
        at_s = now + period_s * (1.0 + self.probe_jitter * (2.0 * self._rng.random() - 1.0))
        if health is not None and health.ejected_until_s is not None:
            at_s = min(at_s, max(now, health.ejected_until_s))
        return at_s

    def _busy_and_well(self, target: TargetState, now: float) -> bool:
        """A host that answered real traffic within the last period and is up: its own answers
        (passive detection) say what a probe would (Envoy's ``no_traffic_interval`` idea,
        turned round: probe the hosts traffic does not)."""
        health = self.outliers.hosts.get(target.name)
        return (
            health is not None
            and health.probe_up
            and health.ejected_until_s is None
            and now - target.last_success_s < self.probe_period_s()
        )

    async def _probe_one(self, probe: Probe, name: str) -> None:
        """Probe ``name`` and record the answer as of when the probe was sent: an answer that
        left the host before a failure seen since (a kill under load) must not undo it
        (``OutlierDetector.record_probe``)."""
        sent_s = self.clock()
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                ok = await probe(name)
        except Exception:
            ok = False
        self.probes_sent += 1
        if name not in self.outliers.hosts:
            return  # removed while the probe was out
        was = self.outliers.state(name)
        self.outliers.record_probe(name, ok, sent_s)
        now = self.outliers.state(name)
        if now != was:
            self.aperture.changed()  # in or out of the aperture
        if (was == "down") != (now == "down"):
            log.warning("host %s is %s", name, "down" if now == "down" else "up")
            target = self.targets.get(name)
            if now != "down" and target is not None:
                # Back after being down: most likely a new process (restarted, rescheduled),
                # so what was measured before says little. Unmeasured, it is tried at once,
                # one batch at a time until it answers, as a newly added host is.
                target.estimates.clear()
        self._wake()

    async def _probe_loop(self, probe: Probe) -> None:
        """Each target on its own jittered schedule (``ProbeSchedule``), at most
        ``probe_concurrency`` probes at once and ``probe_rate`` per second; a target that
        joins later has its first probe at a random point of its first period, so a thousand
        hosts added together are not probed together."""
        # A fresh schedule per start: plans of probes cancelled by ``close`` are not carried.
        schedule = self._schedule = ProbeSchedule()
        running: set[asyncio.Task[None]] = set()

        async def run(target: TargetState) -> None:
            try:
                await self._probe_one(probe, target.name)
            finally:
                if self.is_current(target):
                    schedule.plan(target, self._next_probe_s(target, self.clock()))
                else:
                    schedule.forget(target)

        seen = -1  # ``self.changes`` when the targets were last looked at
        # A token bucket holds the probes sent to ``probe_rate`` per second whatever the
        # schedule says: the first round (every target due at once) and rounds that drift
        # together are spread out instead of sent in a burst.
        burst = max(1.0, self.probe_rate * 0.1)
        tokens, filled_s = burst, self.clock()
        try:
            while True:
                now = self.clock()
                tokens = min(burst, tokens + (now - filled_s) * self.probe_rate)
                filled_s = now
                if seen != self.changes:
                    # The first look at a small pool probes it at once. A large one (whose
                    # load asked every host already) and hosts that join later get their first
                    # probe at a random point of the period; with an aperture, of the idle
                    # interval (most of them will be outside it).
                    at_once = seen < 0 and self.probe_period_s() <= self.probe_interval_s
                    first_s = self.probe_period_s()
                    if self.aperture.active(len(self._ring)):
                        first_s = max(first_s, self.probe_idle_interval_s)
                    for target in self.targets.values():
                        if target not in schedule:
                            spread = 0.0 if at_once else self._rng.random()
                            schedule.plan(target, now + first_s * spread)
                    seen = self.changes
                while len(running) < self.probe_concurrency and tokens >= 1.0:
                    popped = schedule.pop_due(now)
                    if popped is None:
                        break
                    if not self.is_current(popped):
                        continue  # removed or replaced: its successor has its own plan
                    if self._busy_and_well(popped, now):
                        self.probes_skipped += 1
                        schedule.plan(popped, self._next_probe_s(popped, now))
                        continue
                    schedule.start(popped)  # planned again when its probe is done
                    tokens -= 1.0
                    task = asyncio.get_running_loop().create_task(run(popped))
                    running.add(task)
                    task.add_done_callback(running.discard)
                next_s = schedule.next_at_s()
                wait_s = 0.05 if next_s is None else min(0.05, max(0.0, next_s - self.clock()))
                if next_s is not None and tokens < 1.0:
                    wait_s = max(wait_s, (1.0 - tokens) / self.probe_rate)
                await asyncio.sleep(max(wait_s, 0.001))
        finally:
            for task in running:
                task.cancel()

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

    def table(self, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        """The host table (``GET /admin/hosts``), one page: ``limit`` hosts from ``offset`` (all
        when None); ``total`` and ``next_offset`` (None on the last page) say what is left."""
        total = len(self.targets)
        end = total if limit is None else min(total, offset + limit)
        hosts = []
        whole = not self.aperture.active(len(self._ring))  # no aperture: every host is in it
        for target in itertools.islice(self.targets.values(), offset, end):
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
                    "in_aperture": whole or target in self.aperture.members,
                    "models": {
                        key: self._model_row(target, key)
                        for key in sorted({*target.estimates, *target.ready, *target.tiers})
                    },
                }
            )
        return {
            "policy": self.policy.name,
            "retry_budget": self.budget.to_dict(),
            "aperture": self.aperture.to_dict(len(self._ring)),
            "total": total,
            "offset": offset,
            "next_offset": end if end < total else None,
            "probes": {
                "period_s": round(self.probe_period_s(), 3),
                "sent": self.probes_sent,
                "skipped": self.probes_skipped,
            },
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
