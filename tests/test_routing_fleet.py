"""Routing at fleet sizes: sampled decisions, round robin in turn, probe schedule and
thresholds, the file-descriptor check, aggregated metrics, paged host table, DNS churn."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from gateway.errors import Overloaded
from gateway.routing import SUCCESS, Router, make_policy
from gateway.routing.policies import Candidate, RoundRobinPolicy
from gateway.routing.router import SCAN_BELOW


class ManualClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def fleet(n: int, policy: str = "latency", *, ready: bool = True, **kw: object) -> Router:
    clock = ManualClock()
    router = Router(make_policy(policy, random.Random(3)), clock=clock, rng=random.Random(4), **kw)  # type: ignore[arg-type]
    for i in range(n):
        router.add_target(f"h{i}", capacity=4)
        if ready:
            router.set_ready(f"h{i}", "m/1", True)
    return router


# -- sampled decisions ----------------------------------------------------------------------


def test_a_decision_on_a_large_pool_looks_at_a_few_targets() -> None:
    router = fleet(1000)
    lease = router.try_acquire("m", "m/1", 1)
    assert lease is not None
    # A full scan would have made an estimate for every target.
    looked_at = sum(1 for t in router.targets.values() if t.estimates)
    assert 1 <= looked_at <= 3


def test_sampled_decisions_spread_over_the_pool_and_prefer_the_faster() -> None:
    router = fleet(50)
    clock = router.clock
    assert isinstance(clock, ManualClock)
    for i in range(50):  # every host measured once: h0..h24 take 10 ms, the rest 40 ms
        router.targets[f"h{i}"].estimates.clear()
        router._estimate(router.targets[f"h{i}"], "m/1").observe(1, 0.010 if i < 25 else 0.040)
    picks: Counter[str] = Counter()
    for _ in range(2000):
        lease = router.try_acquire("m", "m/1", 1)
        assert lease is not None
        picks[lease.name] += 1
        lease.finish("neutral")
    fast = sum(n for name, n in picks.items() if int(name[1:]) < 25)
    assert fast / 2000 > 0.7  # two choices: a slow host wins only against another slow one
    assert len(picks) >= 40  # spread, not one favourite


def test_the_version_loaded_here_is_preferred_to_cold_targets() -> None:
    router = fleet(200, ready=False)
    for name in ("h7", "h99"):
        router.set_ready(name, "m/1", True)
    picks = Counter()
    for _ in range(200):
        lease = router.try_acquire("m", "m/1", 1)
        assert lease is not None
        picks[lease.name] += 1
        lease.finish("neutral")
    # Cold targets cost their load time (5 s by default): drawn, they lose to a warm one.
    assert picks["h7"] + picks["h99"] == 200


def test_sampled_deadline_refusal_is_exact() -> None:
    """Sampling never refuses a batch some target could finish in time."""
    router = fleet(100)
    now = router.clock()
    for target in router.targets.values():
        router._estimate(target, "m/1").observe(1, 1.0)
    router._estimate(router.targets["h42"], "m/1").observe(1, 0.001)
    router.targets["h42"].estimates["m/1"].peak._value_s = 0.001
    for _ in range(50):
        lease = router.try_acquire("m", "m/1", 1, deadline_s=now + 0.1)
        assert lease is not None
        lease.finish("neutral")
    router.targets["h42"].capacity = 0  # the one fast host is full: nobody can make it
    with pytest.raises(Overloaded):
        router.try_acquire("m", "m/1", 1, deadline_s=now + 0.1)


def test_full_targets_fall_back_to_a_scan() -> None:
    router = fleet(300)
    for target in router.targets.values():
        target.capacity = 0
    router.targets["h123"].capacity = 1
    lease = router.try_acquire("m", "m/1", 1)
    assert lease is not None and lease.name == "h123"
    assert router.try_acquire("m", "m/1", 1) is None


def test_serving_predicate_is_honoured_when_sampling() -> None:
    router = fleet(100)
    for _ in range(100):
        lease = router.try_acquire("m", "m/1", 1, serving=lambda name: name == "h5")
        assert lease is not None and lease.name == "h5"
        lease.finish(SUCCESS)


# -- round robin ----------------------------------------------------------------------------


def test_round_robin_in_turn_is_even_and_weighted() -> None:
    router = fleet(30, "round_robin")
    picks = Counter()
    for _ in range(300):
        lease = router.try_acquire("m", "m/1", 1)
        assert lease is not None
        picks[lease.name] += 1
        lease.finish(SUCCESS)
    assert set(picks.values()) == {10}
    router.targets["h0"].weight = 2.0
    router._max_weight = None
    picks.clear()
    for _ in range(310):
        lease = router.try_acquire("m", "m/1", 1)
        assert lease is not None
        picks[lease.name] += 1
        lease.finish(SUCCESS)
    assert picks["h0"] == pytest.approx(2 * picks["h1"], abs=2)


def test_round_robin_state_goes_with_its_targets() -> None:
    router = fleet(SCAN_BELOW * 4, "round_robin")
    for i in range(SCAN_BELOW * 4 - 2):
        router.remove_target(f"h{i}")
    picks = Counter()
    for _ in range(10):
        lease = router.try_acquire("m", "m/1", 1)
        assert lease is not None
        picks[lease.name] += 1
        lease.finish(SUCCESS)
    assert set(picks) == {f"h{SCAN_BELOW * 4 - 2}", f"h{SCAN_BELOW * 4 - 1}"}
    # The policy's own state (small pools) is pruned to the names it is still offered.
    policy = RoundRobinPolicy()
    for generation in range(50):
        names = [f"g{generation}-{i}" for i in range(3)]
        policy.choose([Candidate(n, 0, 4, 0.0, False) for n in names])
    assert len(policy._current) <= 2 * 3 + 16 + 3
