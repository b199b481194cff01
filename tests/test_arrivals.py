"""``gateway.batching.arrivals``: the busy arrival rate and the probe that the batcher's
adaptive delay reads, on made-up times (the batcher's own tests drive them through requests)."""

from __future__ import annotations

import pytest

from gateway.batching.arrivals import MIN_RECHECK_S, Arrivals


def test_the_rate_counts_rows_that_arrive_while_busy_over_the_busy_time() -> None:
    a = Arrivals()
    assert a.rate(0.0) == 0.0
    a.arrived(0.0, 1)  # finds it idle: starts a busy period, counts no row
    assert a.rate(1.0) == 0.0
    a.arrived(0.5, 2)
    assert a.rate(0.5) == 2 / 0.5
    assert a.rate(1.5) == 2 / 1.5  # busy time since the last arrival counts too


def test_a_busy_period_counts_its_time_up_to_its_end_and_no_more() -> None:
    a = Arrivals()
    a.arrived(0.0, 1)
    a.arrived(0.5, 1)
    a.idle(1.5)
    settled = 0.9 * 1 / (0.9 * 0.5 + 1.0)  # one decay step: the end observed with no rows
    assert a.rate(1.5) == pytest.approx(settled)
    assert a.rate(100.0) == pytest.approx(settled)  # idle time is not busy time
    a.idle(200.0)  # ended already: nothing more to count
    assert a.rate(200.0) == pytest.approx(settled)
    a.arrived(300.0, 1)  # a new busy period starts with this arrival
    assert a.rate(300.0) == pytest.approx(settled)


def test_the_gap_between_arrivals_is_smoothed_and_a_probe_waits_two_of_them() -> None:
    a = Arrivals()
    assert a.probe(10.0) is None  # no gap known before two arrivals
    for t in (0.0, 1.0, 2.0):
        a.arrived(t, 1)
    assert a.probe(10.0) == pytest.approx(2 * 1.0)
    a.arrived(2.1, 1)  # one short gap moves the estimate a tenth of the way
    assert a.probe(10.0) == pytest.approx(2 * (1.0 + 0.1 * (0.1 - 1.0)))


def test_a_probe_waits_only_while_two_gaps_fit_in_the_delay_left() -> None:
    a = Arrivals()
    a.arrived(0.0, 1)
    a.arrived(1.0, 1)  # gap 1 s
    assert a.probe(0.5) == 0.5  # half a gap left: it waits, at most what is left
    assert a.probe(0.49) is None


def test_a_probe_waits_at_least_the_recheck_floor() -> None:
    a = Arrivals()
    a.arrived(0.0, 1)
    a.arrived(1e-6, 1)
    assert a.probe(1.0) == MIN_RECHECK_S


def test_failed_probes_back_off_doubling_and_a_joined_one_resets() -> None:
    a = Arrivals()
    a.arrived(0.0, 1)
    a.arrived(0.001, 1)

    def goes() -> list[bool]:
        """Which of the next batches go without a probe, until one probes."""
        went = []
        while a.probe(1.0) is None:
            went.append(True)
        return went

    a.probed(False)
    assert goes() == [True]
    a.probed(False)
    assert goes() == [True, True]
    a.probed(False)
    assert goes() == [True] * 4
    a.probed(True)
    a.probed(False)
    assert goes() == [True]


def test_rows_that_all_arrive_at_one_instant_make_the_rate_infinite() -> None:
    a = Arrivals()
    a.arrived(5.0, 1)
    a.arrived(5.0, 3)
    assert a.rate(5.0) == float("inf")
    assert a.rate(5.5) == 3 / 0.5
