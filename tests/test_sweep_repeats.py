"""``bench/sweep.py --repeat N``: the arithmetic that turns N measurements of each point into a
verdict (median of the per-repeat ratios, their range, "met in k of N repeats"), and
``--only``'s parsing. Pure functions on made-up points: no servers. The sweep itself is a
bench (``bench/README.md``), run for errors only with ``--quick``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))  # the benches import ``harness`` from their own directory

import sweep  # noqa: E402


def point(target: str, model: str, protocol: str, c: int, r: int, **figures: Any) -> dict[str, Any]:
    base = {"throughput": 100.0, "p50_ms": 1.0, "p99_ms": 2.0}
    return {"target": target, "model": model, "protocol": protocol, "concurrency": c,
            "repeat": r, **base, **figures}  # fmt: skip


def pair(model: str, protocol: str, c: int, r: int, tp: float, p99: float) -> list[dict[str, Any]]:
    """A gateway point with ``tp`` and ``p99`` times Triton's, in repeat ``r``."""
    return [
        point("gateway", model, protocol, c, r, throughput=100.0 * tp, p99_ms=2.0 * p99),
        point("triton", model, protocol, c, r),
    ]


def test_spread_is_the_median_and_range_of_the_figures_present() -> None:
    s = sweep.spread([1.2, None, 0.9, 1.1])
    assert s == sweep.Spread(median=1.1, low=0.9, high=1.2, n=3)
    assert sweep.spread([1.0, 2.0, 3.0, 10.0]) == sweep.Spread(2.5, 1.0, 10.0, 4)
    assert sweep.spread([None, None]) is None


def test_a_goal_is_judged_on_the_median_and_counted_repeat_by_repeat() -> None:
    v = sweep.judge([0.2, 0.6, 0.25, None], lambda x: x <= 0.3)
    assert v.figure is not None and v.figure.median == 0.25
    assert (v.met, v.k, v.n) == (True, 2, 3)
    v = sweep.judge([0.31, 0.6, 0.1], lambda x: x <= 0.3)
    assert (v.met, v.k, v.n) == (False, 1, 3)
    assert sweep.judge([None], lambda x: True) == sweep.Verdict(None, False, 0, 0)


def test_ratios_to_triton_are_taken_within_each_repeat() -> None:
    # Gateway and Triton both slow in repeat 1 (the machine, not the gateway): the ratio of
    # that repeat is as good as the others, which a ratio of medians would not show.
    points = [
        point("gateway", "mlp", "http", 4, 0, throughput=110.0, p99_ms=1.5),
        point("triton", "mlp", "http", 4, 0, throughput=100.0),
        point("gateway", "mlp", "http", 4, 1, throughput=55.0, p99_ms=1.5),
        point("triton", "mlp", "http", 4, 1, throughput=50.0),
        point("gateway", "mlp", "http", 4, 2, throughput=121.0, p99_ms=1.5),
        point("triton", "mlp", "http", 4, 2, throughput=100.0),
    ]
    (s,) = sweep.summarize(points)
    assert s.throughput_ratio == sweep.Spread(1.1, 1.1, pytest.approx(1.21), 3)
    assert s.gateway["throughput"] is not None and s.gateway["throughput"].median == 110.0
    assert s.ahead == (True, True, True)


def test_every_point_counts_the_repeats_in_which_all_points_were_ahead() -> None:
    points = [
        # A: behind on throughput in repeat 1 only; B: behind on p99 in repeat 2 only.
        *pair("mlp", "http", 4, 0, 1.10, 0.90),
        *pair("mlp", "http", 4, 1, 0.95, 0.90),
        *pair("mlp", "http", 4, 2, 1.20, 0.90),
        *pair("mlp", "grpc", 4, 0, 1.05, 0.90),
        *pair("mlp", "grpc", 4, 1, 1.05, 0.80),
        *pair("mlp", "grpc", 4, 2, 1.05, 1.05),
    ]
    summaries = sweep.summarize(points)
    assert [s.ahead for s in summaries] == [(True, False, True), (True, True, False)]
    assert [s.ahead_on_medians for s in summaries] == [True, True]
    # Both ahead on their medians, but only in repeat 0 was every point ahead.
    assert sweep.every_point(summaries) == (2, 2, 1, 3)
    (goal,) = sweep.goals(points, {}, [], ["mlp"])
    assert (goal.met, goal.k, goal.n) == (True, 1, 3)
    assert goal.figure.startswith("2/2 points on their medians")


def test_a_failed_point_leaves_its_repeat_out() -> None:
    points = [
        *pair("simple", "shm", 16, 0, 0.9, 1.1),
        point("gateway", "simple", "shm", 16, 1, error="timed out"),
        point("triton", "simple", "shm", 16, 1),
        *pair("simple", "shm", 16, 2, 1.3, 0.7),
    ]
    (s,) = sweep.summarize(points)
    assert s.ahead == (False, None, True)
    assert s.throughput_ratio == sweep.Spread(pytest.approx(1.1), 0.9, 1.3, 2)
    assert sweep.every_point([s]) == (1, 1, 1, 2)


def test_ahead_needs_both_higher_throughput_and_lower_p99() -> None:
    points = [
        p for r, p99 in enumerate((0.9, 1.1, 1.2)) for p in pair("mlp", "shm", 4, r, 1.2, p99)
    ]
    (s,) = sweep.summarize(points)
    assert s.ahead == (True, False, False)
    assert s.ahead_on_medians is False  # throughput 1.2x, but p99 1.1x on the median
    assert sweep.every_point([s]) == (0, 1, 1, 3)


def test_lone_request_goal_subtracts_each_repeats_own_in_process_p50() -> None:
    gateway_p50, in_process_p50 = (2.3, 2.9, 2.5), (2.1, 2.0, 2.4)
    points = [
        point("gateway", "mlp", "http", 1, r, p50_ms=g, in_process_b1_p50_ms=ref)
        for r, (g, ref) in enumerate(zip(gateway_p50, in_process_p50, strict=True))
    ]
    ort = {"mlp": {"batch1_p50_ms": 1.0, "best_items_per_s": 1000.0}}
    (goal,) = sweep.goals(points, ort, [], ["mlp"])
    # Per repeat +0.2, +0.9, +0.1 ms: median +0.2 (met) in 2 of 3. The medians' difference,
    # 2.5 - 2.1 = +0.4, would miss; the run's own passes (1.0 ms) would miss by far.
    assert goal.goal.endswith(", paired")
    assert (goal.met, goal.k, goal.n) == (True, 2, 3)
    assert goal.figure.startswith("+0.20 ms [+0.10, +0.90]")


def test_best_concurrency_goal_takes_each_repeats_best_against_its_paired_reference() -> None:
    # (concurrency, gateway items/s, in-process items/s right before) per repeat.
    runs = [
        [(4, 18.0, 20.0), (8, 17.0, 17.5)],  # best 0.971 at c=8
        [(4, 18.0, 22.0), (8, 19.0, 21.0)],  # best 0.905 at c=8
        [(4, 16.0, 20.0), (8, 15.0, 20.0)],  # best 0.800 at c=4
    ]
    points = [
        point("gateway", "resnet50", "grpc", c, r, throughput=tp, in_process_paired=ref)
        for r, run in enumerate(runs)
        for c, tp, ref in run
    ]
    ort = {"resnet50": {"batch1_p50_ms": 50.0, "best_items_per_s": 100.0}}
    (goal,) = sweep.goals(points, ort, [], ["resnet50"])
    assert goal.goal == "`resnet50` grpc best >= 0.9x in-process best batch, paired"
    assert (goal.met, goal.k, goal.n) == (True, 2, 3)
    assert goal.figure == "0.90x [0.80, 0.97] (best at c=8,8,4)"


def test_without_paired_figures_the_runs_own_passes_are_the_reference() -> None:
    points = [point("gateway", "mlp", "http", 64, 0, throughput=590.0)]
    ort = {"mlp": {"batch1_p50_ms": 2.0, "best_items_per_s": 1000.0}}
    (goal,) = sweep.goals(points, ort, [], ["mlp"])
    assert goal.goal == "`mlp` c=64 binary >= 0.55x in-process best"
    assert (goal.figure, goal.met, goal.k, goal.n) == ("0.59x", True, 1, 1)


def test_the_report_shows_medians_ranges_and_k_of_n(tmp_path: Path) -> None:
    points = [
        *pair("mlp", "http", 4, 0, 1.10, 0.90),
        *pair("mlp", "http", 4, 1, 0.95, 0.90),
        *pair("mlp", "http", 4, 2, 1.20, 0.90),
    ]
    data = {
        "command": "python bench/sweep.py --repeat 3", "date": "today",
        "machine": {"nproc": 2, "cpu": "test", "loadavg_at_start": [0.5, 0.5, 0.5]},
        "window_ms": 500, "models": ["mlp"], "protocols": ["http"], "levels": {"mlp": [4]},
        "repeat": 3, "points": points, "memory": [], "in_process": {},
    }  # fmt: skip
    text = sweep.render(data)
    assert "| `mlp` vs Triton: higher throughput and lower p99 at every point |" in text
    assert "| yes | 2 of 3 |" in text  # the goal: met on the medians, in 2 of 3 repeats
    assert "| 1.10x [0.95, 1.20] | 0.90x [0.90, 0.90] | yes (2 of 3) |" in text
    # One repeat (the default): the tables as they were, no ranges and no counts.
    one = {**data, "repeat": 1, "points": [p for p in points if p["repeat"] == 0]}
    text = sweep.render(one)
    assert "| goal | figure | met |" in text and " of 1" not in text
    assert "| 1.10x | 0.90x | yes |" in text


def test_only_names_points_to_measure_again() -> None:
    assert sweep._only("mlp:http:4, resnet50:shm:16,mlp:http:4") == [
        ("mlp", "http", 4),
        ("resnet50", "shm", 16),
    ]
    for bad in ("mlp:http", "nope:http:4", "mlp:udp:4", "mlp:http:x", "mlp:http:0", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            sweep._only(bad)
    plan = sweep.plan(["mlp"], ["http"], {"mlp": [1, 4]}, [("mlp", "http", 4), ("mlp", "shm", 1)])
    assert plan == [("mlp", "http", 4)]  # shm served by neither target: left out
    assert sweep.plan(["mlp"], ["http", "grpc"], {"mlp": [1, 4]}) == [
        ("mlp", "http", 1), ("mlp", "http", 4), ("mlp", "grpc", 1), ("mlp", "grpc", 4),
    ]  # fmt: skip
