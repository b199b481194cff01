"""The aperture: a large pool's traffic goes to a bounded, stable, load-sized subset of the
hosts (``gateway.routing.aperture``), and hosts outside it still serve what only they can."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from gateway.backends.placement import RoutedFactory
from gateway.routing import FAILURE, SUCCESS, Router
from gateway.routing.aperture import MAX_POINTS, Aperture, ring_points, ring_position
from gateway.routing.hosts import LOCAL
from gateway.routing.report import host_metric_families
from gateway.routing.router import TargetState
from gateway.settings import Settings, SettingsError
from tests.routing_setup import ManualClock, fleet


def apertured(n: int, policy: str = "latency", *, coordinate: float = 0.3, **kw: object) -> Router:
    return fleet(n, policy, aperture=Aperture(12, 2.0, coordinate), **kw)


def members(router: Router) -> set[str]:
    return {t.name for t in router.aperture.members.items}


@pytest.mark.parametrize("policy", ["latency", "least_request", "round_robin"])
def test_light_traffic_stays_within_the_least_aperture(policy: str) -> None:
    router = apertured(1000, policy)
    chosen = set()
    for _ in range(500):
        lease = router.try_acquire("m", "m/1", 1)
        assert lease is not None
        chosen.add(lease.name)
        lease.finish(SUCCESS)
    assert router.aperture.size == 12 and len(members(router)) == 12
    # Every host of the aperture takes its share, none outside it.
    assert chosen == members(router)


def test_the_aperture_grows_with_the_load_and_shrinks_back() -> None:
    router = apertured(1000)
    clock = router.clock
    assert isinstance(clock, ManualClock)
    leases = [router.try_acquire("m", "m/1", 1) for _ in range(100)]
    assert all(lease is not None for lease in leases)
    # 100 batches in flight at 2 per host: 50 hosts, every one of them used.
    assert router.aperture.size == 50 and len(members(router)) == 50
    assert {lease.name for lease in leases if lease} <= members(router)
    for lease in leases:
        assert lease is not None
        lease.finish(SUCCESS)
    sizes = []
    for _ in range(60):  # light traffic again: one host fewer per second, down to the least
        clock.advance(1.0)
        lease = router.try_acquire("m", "m/1", 1)
        assert lease is not None
        lease.finish(SUCCESS)
        sizes.append(router.aperture.size)
    assert sizes[0] == 49 and sizes[-1] == 12 and sizes == sorted(sizes, reverse=True)
    assert len(members(router)) == 12


def test_the_aperture_never_outgrows_the_pool_and_small_pools_have_none() -> None:
    router = apertured(20)
    leases = [router.try_acquire("m", "m/1", 1) for _ in range(80)]  # 20 hosts x 4: all full
    assert all(lease is not None for lease in leases)
    assert router.aperture.size == 20 and len({lease.name for lease in leases if lease}) == 20
    small = apertured(12)  # no more hosts than the least aperture: every host, as before
    assert not small.aperture.active(12)
    chosen = set()
    for _ in range(300):
        lease = small.try_acquire("m", "m/1", 1)
        assert lease is not None
        chosen.add(lease.name)
        lease.finish(SUCCESS)
    assert len(chosen) == 12
    assert all(row["in_aperture"] for row in small.table()["hosts"])


def test_full_hosts_in_the_aperture_make_it_grow() -> None:
    router = apertured(1000, capacity=1)
    leases = [router.try_acquire("m", "m/1", 1) for _ in range(12)]  # at 1 in flight per host
    assert router.aperture.size > 12  # the draws found the aperture full: it took more hosts
    for lease in leases:
        assert lease is not None
        lease.finish(SUCCESS)


def test_a_version_loaded_only_outside_the_aperture_is_still_reachable() -> None:
    router = apertured(1000)
    router.try_acquire("m", "m/1", 1).finish(SUCCESS)  # type: ignore[union-attr]
    outside = next(f"h{i}" for i in range(1000) if f"h{i}" not in members(router))
    router.set_ready(outside, "only/1", True)
    for _ in range(20):
        lease = router.try_acquire("only", "only/1", 1)
        assert lease is not None and lease.name == outside
        lease.finish(SUCCESS)
    # A cold placement (loaded nowhere) may go anywhere: all hosts are candidates.
    picked = {router.try_acquire("cold", "cold/1", 1).name for _ in range(200)}  # type: ignore[union-attr]
    assert picked - members(router)


def test_hosts_ejected_or_down_leave_the_aperture_and_are_replaced() -> None:
    router = apertured(1000)
    clock = router.clock
    assert isinstance(clock, ManualClock)
    router.try_acquire("m", "m/1", 1).finish(SUCCESS)  # type: ignore[union-attr]
    before = members(router)
    ejected, down = sorted(before)[:2]
    others = [f"h{i}" for i in range(1000) if f"h{i}" != ejected]
    for _ in range(3):  # three failures in a row eject it
        lease = router.try_acquire("m", "m/1", 1, exclude=others)
        assert lease is not None and lease.name == ejected
        lease.finish(FAILURE)
    assert router.outliers.state(ejected) == "ejected"

    async def fails(name: str) -> bool:
        return False

    for _ in range(2):  # two failed probes in a row mark it down
        asyncio.run(router._probe_one(fails, down))
    assert router.outliers.state(down) == "down"
    chosen = set()
    for _ in range(500):
        lease = router.try_acquire("m", "m/1", 1)
        assert lease is not None
        chosen.add(lease.name)
        lease.finish(SUCCESS)
    after = members(router)
    assert len(after) == 12 and ejected not in after and down not in after
    assert len(after - before) == 2  # the next two along the ring took their places
    assert chosen == after
    rows = {row["name"]: row for row in router.table(0, 1000)["hosts"]}
    assert not rows[ejected]["in_aperture"] and rows[sorted(after - before)[0]]["in_aperture"]

    async def answers(name: str) -> bool:
        return True

    clock.advance(5.0)  # the ejection is over; a probe brings both back
    for _ in range(2):
        asyncio.run(router._probe_one(answers, ejected))
        asyncio.run(router._probe_one(answers, down))
    router.try_acquire("m", "m/1", 1).finish(SUCCESS)  # type: ignore[union-attr]
    assert members(router) == before


def test_fronts_with_other_coordinates_cover_other_hosts_and_a_join_moves_one() -> None:
    fronts = [apertured(1000, coordinate=i / 4) for i in range(4)]
    for router in fronts:
        router.try_acquire("m", "m/1", 1).finish(SUCCESS)  # type: ignore[union-attr]
    subsets = [members(router) for router in fronts]
    assert all(len(s) == 12 for s in subsets)
    assert len(set().union(*subsets)) == 48  # four fronts, four disjoint apertures
    again = apertured(1000, coordinate=0.0)
    again.try_acquire("m", "m/1", 1).finish(SUCCESS)  # type: ignore[union-attr]
    assert members(again) == subsets[0]  # the ring is a hash of the names: the same anywhere
    assert ring_position("h7") == ring_position("h7") and 0 <= ring_position("h7") < 1
    router = fronts[0]
    for i in range(1000, 1010):  # ten hosts join: at most one each moves into the aperture
        router.add_target(f"h{i}", capacity=4)
        router.set_ready(f"h{i}", "m/1", True)
    router.try_acquire("m", "m/1", 1).finish(SUCCESS)  # type: ignore[union-attr]
    assert len(members(router) - subsets[0]) <= 10 and len(members(router)) == 12
    removed = sorted(members(router))[0]
    router.remove_target(removed)
    assert removed not in members(router)  # out at once, before any refresh
    router.try_acquire("m", "m/1", 1).finish(SUCCESS)  # type: ignore[union-attr]
    assert len(members(router)) == 12


def test_aperture_settings_reach_the_router_and_are_checked() -> None:
    settings = Settings(
        local_execution=False,
        hosts=({"kind": "v2", "name": "a", "url": "http://127.0.0.1:1"},),
        host_aperture=20,
        host_aperture_load=3.0,
        host_aperture_coordinate=0.25,
    )
    aperture = RoutedFactory(settings).router.aperture
    assert (aperture.min_size, aperture.load, aperture.coordinate) == (20, 3.0, 0.25)
    anywhere = RoutedFactory(replace(settings, host_aperture_coordinate=-1.0))
    assert 0 <= anywhere.router.aperture.coordinate < 1
    bad: dict[str, float]
    for bad in (
        {"host_aperture": -1},
        {"host_aperture_load": 0.0},
        {"host_aperture_coordinate": 1},
    ):
        with pytest.raises(SettingsError, match="host_aperture"):
            Settings(**bad)  # type: ignore[arg-type]


def test_hosts_outside_the_aperture_are_probed_at_the_idle_interval() -> None:
    router = apertured(1000, probe_interval_s=2.0, probe_rate=1000.0, probe_idle_interval_s=30.0)
    router.try_acquire("m", "m/1", 1).finish(SUCCESS)  # type: ignore[union-attr]
    inside = router.targets[sorted(members(router))[0]]
    outside = next(t for t in router.targets.values() if t.name not in members(router))
    now = router.clock()
    for _ in range(50):
        assert 1.6 <= router._next_probe_s(inside, now) - now <= 2.4
        assert 24.0 <= router._next_probe_s(outside, now) - now <= 36.0
    router.outliers.record_probe(outside.name, False)
    router.outliers.record_probe(outside.name, False)  # down: probed every interval to come back
    assert 1.6 <= router._next_probe_s(outside, now) - now <= 2.4


def test_metrics_say_the_aperture_size_where_there_is_one() -> None:
    router = apertured(1000)
    leases = [router.try_acquire("m", "m/1", 1) for _ in range(40)]
    families = {f.name: f for f in host_metric_families(router, 100)}
    assert families["gateway_hosts_aperture"].samples[0].value == 20
    assert families["gateway_hosts_aperture_resizes"].samples[0].value >= 1
    for lease in leases:
        assert lease is not None
        lease.finish(SUCCESS)
    small = {f.name for f in host_metric_families(apertured(10), 100)}
    assert "gateway_hosts_aperture" not in small


def test_the_local_runtime_is_always_in_the_aperture() -> None:
    router = apertured(1000)
    router.add_target(LOCAL, capacity=4)
    router.set_ready(LOCAL, "m/1", True)
    chosen = set()
    for _ in range(500):
        lease = router.try_acquire("m", "m/1", 1)
        assert lease is not None
        chosen.add(lease.name)
        lease.finish(SUCCESS)
    assert LOCAL in members(router) and len(members(router)) == 13
    assert LOCAL in chosen and chosen == members(router)


def test_round_robin_grows_its_aperture_when_full_not_when_told_to_skip_it() -> None:
    router = apertured(1000, "round_robin", capacity=1)
    router.try_acquire("m", "m/1", 1).finish(SUCCESS)  # type: ignore[union-attr]
    inside = members(router)
    lease = router.try_acquire("m", "m/1", 1, exclude=inside)  # a retry elsewhere, say
    assert lease is not None and lease.name not in inside
    lease.finish(SUCCESS)
    assert router.aperture.size == 12
    leases = [router.try_acquire("m", "m/1", 1) for _ in range(13)]  # one more than it holds
    assert all(lease is not None for lease in leases)
    assert router.aperture.size > 12


def test_heavier_hosts_are_in_proportionally_more_apertures() -> None:
    """Weight 4 is four positions on the ring: over many fronts, such a host is in about four
    times as many apertures as a host of weight 1 (so it gets about four times the traffic)."""
    aperture = Aperture(10, 2.0, 0.0)
    for i in range(1000):
        aperture.add(TargetState(f"h{i}", 4.0 if i < 100 else 1.0, 4, None))
    seen: dict[str, int] = {}
    for front in range(400):
        aperture.coordinate = front / 400
        aperture.changed()
        aperture.refresh(0.0, lambda name: True)
        assert len(aperture.members) == 10
        for target in aperture.members.items:
            seen[target.name] = seen.get(target.name, 0) + 1
    heavy = sum(seen.get(f"h{i}", 0) for i in range(100)) / 100
    light = sum(seen.get(f"h{i}", 0) for i in range(100, 1000)) / 900
    assert 3.0 < heavy / light < 5.0
    assert ring_points("h1", 1.0) == [(ring_position("h1"), "h1")]  # weight 1: as before
    assert len(ring_points("h1", 1e9)) == MAX_POINTS
    aperture.discard("h0")  # every position goes
    assert all(name != "h0" for _, name in aperture._ring)
