"""Pins of routing policies and estimators by value, so the redesign cannot change them unseen.

Each test names the behaviour it pins; mutation testing (scripts/mutation.sh) is what found the
gaps. Time comes from a manual clock and randomness from a scripted source, so every expected
number follows from the formulas in the module docstrings.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, TypeVar

import pytest

from gateway.routing import BatchCostFit, Candidate, LatencyEstimate, PeakEwma, make_policy
from gateway.routing.policies import LatencyPolicy, LeastRequestPolicy

T = TypeVar("T")


class FixedClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


class ScriptedRng(random.Random):
    """Hands out the given index pairs and draws in order, and fails when asked for more."""

    def __init__(self, pairs: Sequence[tuple[int, int]] = (), draws: Sequence[float] = ()) -> None:
        super().__init__(0)
        self.pairs = list(pairs)
        self.draws = list(draws)

    def sample(self, population: Sequence[T], k: int, *, counts: Any = None) -> list[T]:
        assert k == 2 and self.pairs, "unexpected sample()"
        first, second = self.pairs.pop(0)
        return [population[first], population[second]]

    def random(self) -> float:
        assert self.draws, "unexpected random()"
        return self.draws.pop(0)


def host(name: str, in_flight: int = 0, cost_s: float = 0.01, weight: float = 1.0) -> Candidate:
    """A measured candidate whose latency-policy cost (completion / weight) is ``cost_s``."""
    return Candidate(name, in_flight, 16, cost_s * weight / (in_flight + 1), True, weight=weight)


# -- PeakEwma -------------------------------------------------------------------------------


def test_peak_ewma_defaults_and_validation() -> None:
    clock = FixedClock()
    ewma = PeakEwma(clock=clock)
    assert ewma.decay_s == 2.0 and ewma.samples == 0 and ewma.value_s == 0.0
    ewma.observe(1.0)
    clock.advance(2.0)  # one default time constant
    assert ewma.value_s == pytest.approx(math.exp(-1.0), rel=1e-12)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"^decay_s must be > 0$"):
            PeakEwma(decay_s=bad, clock=clock)


def test_peak_ewma_pull_down_formula_by_value() -> None:
    """Decay ``exp(-dt / decay_s)``; a lower sample blends with the old value's weight
    ``min(exp(-dt / decay_s), 0.9)``; samples are counted."""
    clock = FixedClock()
    ewma = PeakEwma(decay_s=2.0, clock=clock)
    ewma.observe(0.100)
    assert ewma.samples == 1 and ewma.value_s == 0.100
    clock.advance(1.0)
    decay = math.exp(-0.5)
    assert ewma.value_s == pytest.approx(0.100 * decay, rel=1e-12)
    ewma.observe(0.020)  # below the decayed value: pulled down, not replaced
    expected = 0.100 * decay * decay + 0.020 * (1.0 - decay)
    assert ewma.value_s == pytest.approx(expected, rel=1e-12)
    ewma.observe(0.010)  # no time since the last sample: the old value keeps 0.9 at most
    expected = 0.9 * expected + 0.1 * 0.010
    assert ewma.value_s == pytest.approx(expected, rel=1e-12)
    ewma.observe(0.500)  # above: believed at once
    assert ewma.value_s == 0.500 and ewma.samples == 4
    clock.advance(3.0)
    assert ewma.value_s == pytest.approx(0.500 * math.exp(-1.5), rel=1e-12)


# -- BatchCostFit ---------------------------------------------------------------------------


def test_batch_cost_fit_forgets_with_keep_0_98() -> None:
    fit = BatchCostFit()
    assert fit.keep == 0.98 and fit.samples == 0 and fit.coefficients() is None
    assert fit.predict_s(4) is None
    fit.observe(4, 1.0)
    fit.observe(4, 2.0)
    assert fit.samples == 2
    # One batch size: no slope, the forgotten mean (0.98 * 1 + 2) / (0.98 + 1).
    a, b = fit.coefficients() or (-1.0, -1.0)
    assert a == 0.0 and b == pytest.approx((0.98 + 2.0) / 1.98, rel=1e-12)
    fit.observe(4, 3.0)
    assert fit.samples == 3


def test_batch_cost_fit_degenerate_threshold_is_relative() -> None:
    """Sizes 100000 and 100001 are one size (spread 1 against 1e-9 * s0 * snn = 40): no slope."""
    fit = BatchCostFit(keep=1.0)
    fit.observe(100_000, 1.0)
    fit.observe(100_001, 2.0)
    assert fit.coefficients() == (0.0, 1.5)


def test_batch_cost_fit_degenerate_threshold_has_an_absolute_floor() -> None:
    """With tiny sums the threshold is 1e-9 absolute: a spread of 1.5e-9 is fitted, 0.5e-9 not."""
    fitted = BatchCostFit(keep=1.5e-9)
    fitted.observe(1, 0.5)
    fitted.observe(0, 0.1)
    a, b = fitted.coefficients() or (-1.0, -1.0)
    assert a == pytest.approx(0.4, rel=1e-6) and b == pytest.approx(0.1, rel=1e-6)
    flat = BatchCostFit(keep=0.5e-9)
    flat.observe(1, 0.5)
    flat.observe(0, 0.1)
    a, b = flat.coefficients() or (-1.0, -1.0)
    assert a == 0.0 and b == pytest.approx((0.5e-9 * 0.5 + 0.1) / (1 + 0.5e-9), rel=1e-12)


# -- LatencyEstimate ------------------------------------------------------------------------


def test_latency_estimate_defaults() -> None:
    clock = FixedClock()
    est = LatencyEstimate(clock=clock)
    assert est.samples == 0 and est.typical_in_flight == 0.0 and est.service_s() == 0.0
    assert est.to_dict() == {
        "peak_ewma_s": 0.0,
        "fit_a_s_per_row": None,
        "fit_b_s": None,
        "typical_in_flight": 0.0,
        "samples": 0,
    }
    est.observe(1, 1.0)
    clock.advance(2.0)  # default decay_s is 2 s
    assert est.peak.value_s == pytest.approx(math.exp(-1.0), rel=1e-12)


def test_latency_estimate_typical_in_flight_running_average() -> None:
    """First sample sets it; later ones blend 0.9 old + 0.1 new."""
    est = LatencyEstimate(clock=FixedClock())
    est.observe(1, 0.01, in_flight=5)
    assert est.typical_in_flight == 5.0
    est.observe(1, 0.01, in_flight=15)
    assert est.typical_in_flight == pytest.approx(6.0, rel=1e-12)
    est.observe(1, 0.01, in_flight=0)
    assert est.typical_in_flight == pytest.approx(5.4, rel=1e-12)
    assert est.samples == 3


def test_latency_estimate_rescales_from_the_typical_batch_size() -> None:
    """Rows 10, 20, 30 give a typical size of 10 -> 11 -> 12.9 (rounds to 13): a batch of 13 is
    priced at the level itself, other sizes by the fit's ratio; the default is one row."""
    est = LatencyEstimate(clock=FixedClock())
    for rows in (10, 20, 30):
        est.observe(rows, 0.001 * rows + 0.004)
    level = est.peak.value_s
    assert level == 0.034  # each sample was higher: the peak
    assert est.service_s(13) == pytest.approx(level, rel=1e-9)
    assert est.service_s(12) == pytest.approx(level * 0.016 / 0.017, rel=1e-9)
    assert est.service_s(1) == pytest.approx(level * 0.005 / 0.017, rel=1e-9)
    assert est.service_s() == est.service_s(1)


def test_latency_estimate_typical_size_below_half_a_row_counts_as_one() -> None:
    est = LatencyEstimate(clock=FixedClock())
    est.observe(4, 0.008)
    for _ in range(21):  # typical rows 4 * 0.9 ** 21 = 0.44: rounds to 0, priced as 1
        est.observe(0, 0.004)
    level = est.peak.value_s
    assert est.service_s(1) == pytest.approx(level, rel=1e-9)
    assert est.service_s(0) == pytest.approx(level * 0.004 / 0.005, rel=1e-9)


def test_latency_estimate_to_dict_by_value() -> None:
    est = LatencyEstimate(clock=FixedClock())
    a_s, b_s = 0.00123456789, 0.00987654321
    for rows, in_flight in [(1, 5), (3, 7), (1, 3), (3, 0)]:
        est.observe(rows, a_s * rows + b_s, in_flight)
    # peak 0.01358024688, fit exact, typical in flight 5 -> 5.2 -> 4.98 -> 4.482
    assert est.to_dict() == {
        "peak_ewma_s": 0.01358,
        "fit_a_s_per_row": 0.001235,
        "fit_b_s": 0.009877,
        "typical_in_flight": 4.48,
        "samples": 4,
    }


# -- Candidate and costs --------------------------------------------------------------------


def test_completion_scales_by_typical_in_flight() -> None:
    busy = Candidate("h", 7, 16, 0.01, True, cold_start_s=0.5, typical_in_flight=3.0)
    assert busy.completion_s() == pytest.approx((7 + 1) / (3 + 1) * 0.01 + 0.5, rel=1e-12)
    assert Candidate("h", 0, 16, 0.01, True).completion_s() == pytest.approx(0.01)
    assert Candidate("n", 0, 16, 0.0, False, cold_start_s=0.25).completion_s() == 0.25
    assert Candidate("n", 2, 16, 0.0, False, cold_start_s=0.25).completion_s() == 60.25


def test_costs_divide_by_weight() -> None:
    least = LeastRequestPolicy(random.Random(0))
    assert least.cost(host("x", 3, weight=2.0)) == 2.0
    assert least.cost(host("x", 0, weight=0.5)) == 2.0
    latency = LatencyPolicy(random.Random(0))
    assert latency.tolerance == 0.05
    weighted = Candidate("w", 1, 16, 0.02, True, weight=4.0)
    assert latency.cost(weighted) == pytest.approx(0.04 / 4.0, rel=1e-12)


@pytest.mark.parametrize("pair", [(0, 1), (1, 0)])
def test_least_request_weighs_hosts(pair: tuple[int, int]) -> None:
    """3 in flight on weight 4 (cost 1) beats 1 in flight on weight 1 (cost 2), either order."""
    policy = make_policy("least_request", ScriptedRng([pair]))
    heavy, light = host("heavy", 3, weight=4.0), host("light", 1)
    assert policy.choose([heavy, light]).name == "heavy"


@pytest.mark.parametrize("pair", [(0, 1), (1, 0)])
def test_latency_policy_divides_cost_by_weight(pair: tuple[int, int]) -> None:
    """40 ms on weight 4 (cost 10 ms) beats 20 ms on weight 1, either order."""
    policy = make_policy("latency", ScriptedRng([pair]))
    heavy = Candidate("heavy", 0, 16, 0.04, True, weight=4.0)
    light = Candidate("light", 0, 16, 0.02, True)
    assert policy.choose([heavy, light]).name == "heavy"


# -- power of two choices: the random source ------------------------------------------------


@pytest.mark.parametrize("name", ["least_request", "latency", "round_robin"])
def test_single_host_is_chosen_without_randomness(name: str) -> None:
    policy = make_policy(name, ScriptedRng())  # any sample() or random() call would fail
    only = host("only", 5)
    assert [policy.choose([only]).name for _ in range(3)] == ["only"] * 3


@pytest.mark.parametrize("name", ["least_request", "latency"])
def test_the_given_random_source_picks_the_pair(name: str) -> None:
    """The pair comes from the injected source (make_policy passes it on): of costs 1..4, the
    scripted pairs pick the cheaper of each pair, never the global best."""
    rng = ScriptedRng([(3, 2), (1, 3), (2, 3), (3, 1)])
    policy = make_policy(name, rng)
    hosts = [host(f"h{i}", i, cost_s=0.01 * (i + 1)) for i in range(4)]
    assert [policy.choose(hosts).name for _ in range(4)] == ["h2", "h1", "h2", "h1"]
    assert rng.pairs == []


@pytest.mark.parametrize("name", ["least_request", "latency"])
def test_equal_costs_split_on_a_draw_below_one_half(name: str) -> None:
    """A draw < 0.5 keeps the first sampled host; 0.5 and above the second."""
    rng = ScriptedRng([(0, 1)] * 5, [0.0, 0.49, 0.5, 0.51, 0.99])
    policy = make_policy(name, rng)
    twins = [host("a", 1), host("b", 1)]
    assert [policy.choose(twins).name for _ in range(5)] == ["a", "a", "b", "b", "b"]
    assert rng.draws == []


def test_same_seed_same_choices() -> None:
    def picks(seed: int) -> list[str]:
        policy = make_policy("latency", random.Random(seed))
        hosts = [host(n, 1) for n in "abcdef"]
        return [policy.choose(hosts).name for _ in range(40)]

    assert picks(11) == picks(11)
    assert len(set(picks(11))) > 1


# -- latency policy: tolerance and tie-break -------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "winner"),
    [
        # costs 1 % apart count as equal: fewer in flight (per weight) wins
        (host("a", 2, 0.0100), host("b", 1, 0.0101), "b"),
        (host("a", 0, 0.0101), host("b", 1, 0.0100), "a"),
        (host("a", 1, 0.0100), host("b", 1, 0.0101, weight=2.0), "b"),  # loads 2 vs 1
        (host("a", 3, 0.0101, weight=4.0), host("b", 1, 0.0100), "a"),  # loads 1 vs 2
        (host("a", 1, 0.0100), host("b", 2, 0.0101), "a"),
        (host("a", 1, 0.0100), host("b", 0, 0.0101), "b"),
        # equal load: the cheaper one, with no draw
        (host("a", 1, 0.0101), host("b", 1, 0.0100), "b"),
        (host("a", 1, 0.0100), host("b", 1, 0.0101), "a"),
        # 10 % apart: the cheaper one even with more in flight
        (host("a", 3, 0.0110), host("b", 1, 0.0100), "b"),
        (host("a", 1, 0.0100), host("b", 3, 0.0110), "a"),
    ],
)
def test_latency_tie_break_by_load(a: Candidate, b: Candidate, winner: str) -> None:
    rng = ScriptedRng([(0, 1)])
    assert make_policy("latency", rng).choose([a, b]).name == winner


def test_latency_tolerance_boundary_is_inclusive() -> None:
    """Costs 2 and 1 with tolerance 0.5: |2 - 1| == 0.5 * 2 counts as equal, so the host with
    fewer in flight wins although it is slower; just past the boundary the faster one wins."""
    slow_idle = Candidate("slow_idle", 0, 16, 2.0, True)
    fast_busy = Candidate("fast_busy", 1, 16, 0.5, True)  # (1 + 1) * 0.5 = 1.0
    policy = LatencyPolicy(ScriptedRng([(0, 1), (0, 1)]), tolerance=0.5)
    assert policy.choose([slow_idle, fast_busy]).name == "slow_idle"
    faster_busy = Candidate("faster_busy", 1, 16, 0.49, True)
    assert policy.choose([slow_idle, faster_busy]).name == "faster_busy"
