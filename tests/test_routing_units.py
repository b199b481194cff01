"""Estimators, policies, ejection, retry budget and the routed backend, on a manual clock."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.backends.base import Host, Tensors
from gateway.backends.hosts import build_host, configured_hosts
from gateway.backends.placement import HostEntry, RoutedFactory
from gateway.errors import HostUnreachable, ModelLoadError, Overloaded, Unavailable
from gateway.repository.config import ModelConfig
from gateway.repository.local import LocalRepository, ModelSource
from gateway.routing import (
    FAILURE,
    SUCCESS,
    BatchCostFit,
    Candidate,
    HostConflict,
    LatencyEstimate,
    OutlierDetector,
    PeakEwma,
    RetryBudget,
    Router,
    UnknownHost,
    check_host_table,
    make_policy,
)
from gateway.routing.hosts import LOCAL, DnsSpec, V2Spec, parse_host
from gateway.routing.tiers import CACHED, LOADED, ORIGIN, HostModel, parse_index, tier_for
from gateway.settings import Settings, SettingsError
from tests import models
from tests.routing_setup import ManualClock, make_router

# -- estimators -----------------------------------------------------------------------------


def test_peak_ewma_takes_spikes_at_once_and_decays() -> None:
    clock = ManualClock()
    ewma = PeakEwma(decay_s=1.0, clock=clock)
    ewma.observe(0.010)
    assert ewma.value_s == pytest.approx(0.010)
    ewma.observe(0.100)  # a spike wins immediately
    assert ewma.value_s == pytest.approx(0.100)
    for _ in range(40):
        clock.advance(0.001)
        ewma.observe(0.010)
    assert 0.010 <= ewma.value_s < 0.015  # pulled back toward the fast samples
    clock.advance(3.0)  # idle: decays toward zero so the host gets tried again
    assert ewma.value_s < 0.010 * 0.1


def test_batch_cost_fit_recovers_a_n_plus_b() -> None:
    fit = BatchCostFit()
    for n in [1, 2, 4, 8, 16, 32] * 5:
        fit.observe(n, 0.001 * n + 0.004)
    a, b = fit.coefficients() or (0, 0)
    assert a == pytest.approx(0.001, rel=1e-6)
    assert b == pytest.approx(0.004, rel=1e-6)
    assert fit.predict_s(10) == pytest.approx(0.014)
    one_size = BatchCostFit()
    one_size.observe(4, 0.02)
    assert one_size.coefficients() == (0.0, pytest.approx(0.02))


def test_latency_estimate_scales_by_batch_size() -> None:
    clock = ManualClock()
    est = LatencyEstimate(decay_s=10.0, clock=clock)
    for n in [1, 8] * 20:
        clock.advance(0.001)
        est.observe(n, 0.001 * n + 0.002)
    assert est.service_s(32) > 3 * est.service_s(1)


# -- policies -------------------------------------------------------------------------------


def cand(name: str, in_flight: int = 0, service_s: float = 0.01, **kw: Any) -> Candidate:
    return Candidate(name, in_flight, 16, service_s, True, **kw)


def test_round_robin_rotates_by_weight() -> None:
    policy = make_policy("round_robin")
    picks = Counter(policy.choose([cand("a"), cand("b", weight=2.0)]).name for _ in range(30))
    assert picks == {"a": 10, "b": 20}


def test_least_request_prefers_fewer_in_flight() -> None:
    policy = make_policy("least_request", random.Random(1))
    assert all(policy.choose([cand("a", 5), cand("b", 1)]).name == "b" for _ in range(20))


def test_latency_policy_weighs_in_flight_latency_and_cold_start() -> None:
    policy = make_policy("latency", random.Random(1))
    fast_busy, slow_idle = cand("fast", 2, 0.010), cand("slow", 0, 0.050)
    assert policy.choose([fast_busy, slow_idle]).name == "fast"  # 30 ms < 50 ms
    assert policy.choose([cand("fast", 6, 0.010), slow_idle]).name == "slow"  # 70 ms > 50 ms
    cold = cand("cold", 0, 0.001, cold_start_s=2.0)
    assert policy.choose([cold, cand("warm", 3, 0.010)]).name == "warm"
    # An unmeasured target gets one request, then waits for its first sample.
    new = Candidate("new", 0, 16, 0.0, False)
    assert policy.choose([new, cand("old", 0, 0.010)]).name == "new"
    assert policy.choose([Candidate("new", 1, 16, 0.0, False), cand("old", 3)]).name == "old"


def test_latency_policy_starves_a_slow_host_under_p2c() -> None:
    policy = make_policy("latency", random.Random(7))
    picks = Counter()
    in_flight = {"a": 0, "b": 0, "slow": 0}
    for _ in range(3000):
        options = [
            cand("a", in_flight["a"], 0.010),
            cand("b", in_flight["b"], 0.010),
            cand("slow", in_flight["slow"], 0.030),
        ]
        name = policy.choose(options).name
        picks[name] += 1
        in_flight[name] += 1
        if sum(in_flight.values()) > 6:  # keep ~6 in flight: finish the oldest-ish at random
            done = max(in_flight, key=lambda n: in_flight[n])
            in_flight[done] -= 1
    assert picks["slow"] < 0.5 * picks["a"]
    assert picks["slow"] < 0.5 * picks["b"]


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("random")


# -- health ---------------------------------------------------------------------------------


def test_ejection_backoff_grows_and_needs_a_probe_to_come_back() -> None:
    clock = ManualClock()
    det = OutlierDetector(consecutive_errors=3, base_ejection_s=2.0, clock=clock)
    for name in ("a", "b", "c", "d"):
        det.add(name)
    assert not det.record_failure("a") and not det.record_failure("a")
    assert det.record_failure("a")  # third in a row
    assert det.state("a") == "ejected" and not det.available("a")
    clock.advance(2.1)
    assert not det.available("a")  # time served, no successful probe yet
    det.record_probe("a", True)
    assert det.available("a") and det.state("a") == "up"
    for _ in range(3):
        det.record_failure("a")
    clock.advance(3.0)
    det.record_probe("a", True)
    assert not det.available("a")  # second ejection lasts 2 * 2 s
    clock.advance(1.1)
    det.record_probe("a", True)
    assert det.available("a")


def test_success_resets_consecutive_errors() -> None:
    det = OutlierDetector(consecutive_errors=3, clock=ManualClock())
    det.add("a")
    det.add("b")
    det.record_failure("a")
    det.record_failure("a")
    det.record_success("a")
    assert not det.record_failure("a")


def test_max_ejected_fraction_caps_ejections() -> None:
    det = OutlierDetector(consecutive_errors=1, max_ejected_fraction=0.5, clock=ManualClock())
    for name in ("a", "b", "c", "d"):
        det.add(name)
    assert det.record_failure("a") and det.record_failure("b")
    assert not det.record_failure("c")  # 2 of 4 already out
    assert det.available("c")


def test_failed_probe_marks_down_at_once() -> None:
    det = OutlierDetector(clock=ManualClock())
    det.add("a")
    det.record_probe("a", False)
    assert det.state("a") == "down" and not det.available("a")
    det.record_probe("a", True)
    assert det.available("a")


# -- retry budget ---------------------------------------------------------------------------


def test_retry_budget_is_a_fraction_of_active_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_concurrency=1)
    for _ in range(10):
        budget.start_request()
    assert budget.try_retry() and budget.try_retry()
    assert not budget.try_retry()  # 2 = 20% of 10
    budget.end_retry()
    assert budget.try_retry()
    assert budget.denied == 1


# -- router ---------------------------------------------------------------------------------


def two_hosts(clock: ManualClock, policy: str = "latency") -> Router:
    return make_router(("a", "b"), policy, capacity=1, clock=clock, max_wait_s=0.05)


def test_router_caps_in_flight_per_host() -> None:
    clock = ManualClock()
    router = two_hosts(clock)
    first = router.try_acquire("m", "m/1", 1)
    second = router.try_acquire("m", "m/1", 1)
    assert first is not None and second is not None and first.name != second.name
    assert router.try_acquire("m", "m/1", 1) is None
    first.finish(SUCCESS)
    assert router.try_acquire("m", "m/1", 1) is not None


def test_router_predictive_admission_refuses_impossible_deadlines() -> None:
    clock = ManualClock()
    router = two_hosts(clock)
    for _ in range(3):
        for name in ("a", "b"):
            lease = router.try_acquire("m", "m/1", 1, exclude=["a" if name == "b" else "b"])
            assert lease is not None
            clock.advance(0.050)
            lease.finish(SUCCESS)
    with pytest.raises(Overloaded) as info:
        router.try_acquire("m", "m/1", 1, deadline_s=clock() + 0.010)
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 0.01
    assert router.try_acquire("m", "m/1", 1, deadline_s=clock() + 1.0) is not None


def test_router_ejects_after_failures_and_reports_unavailable() -> None:
    clock = ManualClock()
    router = Router(
        make_policy("round_robin"),
        clock=clock,
        outliers=OutlierDetector(consecutive_errors=2, max_ejected_fraction=1.0, clock=clock),
    )
    router.add_target("a")
    for _ in range(2):
        lease = router.try_acquire("m", "m/1", 1)
        assert lease is not None
        lease.finish(FAILURE)
    with pytest.raises(Unavailable, match="no healthy host"):
        router.try_acquire("m", "m/1", 1)
    assert router.table()["hosts"][0]["state"] == "ejected"


async def test_router_waits_for_a_slot_then_gives_up_with_429() -> None:
    router = Router(make_policy("latency"), max_wait_s=0.05)
    router.add_target("a", capacity=1)
    held = await router.acquire("m", "m/1", 1)
    waiter = asyncio.ensure_future(router.acquire("m", "m/1", 1))
    await asyncio.sleep(0.01)
    held.finish(SUCCESS)
    lease = await waiter
    with pytest.raises(Overloaded, match="in-flight limit"):
        await router.acquire("m", "m/1", 1)
    lease.finish(SUCCESS)


# -- routed backend over fake hosts ---------------------------------------------------------


class FakeHost(Host):
    def __init__(self, name: str, fail: bool = False) -> None:
        self._name = name
        self.fail = fail
        self.calls = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def labels(self) -> frozenset[str]:
        return frozenset()

    async def prepare(self, source: ModelSource, version: int, config: ModelConfig) -> None:
        pass

    async def infer(
        self,
        model: str,
        version: int,
        inputs: Tensors,
        outputs: Sequence[str],
        timeout_s: float | None = None,
    ) -> Tensors:
        self.calls += 1
        if self.fail:
            raise HostUnreachable(f"{self._name} refused")
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}

    async def ready(self) -> bool:
        return True  # probes pass: failures show only on requests (passive detection)

    async def model_ready(self, model: str, version: int) -> bool:
        return True

    async def release(self, model: str) -> None:
        pass

    async def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"name": self._name}


@pytest.fixture
def simple_source(tmp_path: Path) -> ModelSource:
    models.add_sub(tmp_path, "simple")
    return LocalRepository(tmp_path).source("simple")


def inputs() -> Tensors:
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    return {"INPUT0": x, "INPUT1": x}


async def test_routed_backend_retries_once_elsewhere(simple_source: ModelSource) -> None:
    hosts = [FakeHost("bad", fail=True), FakeHost("good")]
    settings = Settings(local_execution=False, routing_policy="round_robin")
    factory = RoutedFactory(settings, [HostEntry(h) for h in hosts])
    backend = await factory.load(simple_source, 1)
    for _ in range(4):
        out = await backend.execute(inputs(), ["OUTPUT0", "OUTPUT1"])
        assert out.outputs["OUTPUT0"][0, 3] == 6 and out.host == "good"
        assert out.compute_s is None  # a host's compute time is not known here
    assert hosts[0].calls >= 1 and hosts[1].calls == 4
    assert factory.router.budget.granted == hosts[0].calls
    await backend.close()
    await factory.close()


async def test_routed_backend_gives_up_after_one_retry(simple_source: ModelSource) -> None:
    hosts = [FakeHost(n, fail=True) for n in ("x", "y", "z")]
    factory = RoutedFactory(
        Settings(local_execution=False, max_ejected_fraction=1.0), [HostEntry(h) for h in hosts]
    )
    backend = await factory.load(simple_source, 1)
    with pytest.raises(HostUnreachable):
        await backend.execute(inputs(), ["OUTPUT0"])
    assert sum(h.calls for h in hosts) == 2  # first try + one retry, never a third
    await backend.close()
    await factory.close()


async def test_routed_backend_serves_locally_too(simple_source: ModelSource) -> None:
    factory = RoutedFactory(Settings(), [HostEntry(FakeHost("remote"))])
    backend = await factory.load(simple_source, 1)
    names = {t["name"] for t in factory.table()["hosts"]}
    assert names == {"remote", "local"}
    for _ in range(6):
        out = await backend.execute(inputs(), ["OUTPUT0", "OUTPUT1"])
        assert out.outputs["OUTPUT1"].sum() == 0
        # In-process runs report their compute time; a host's is not known here.
        assert (out.compute_s is not None) == (out.host == "local")
    assert sum(t["completed"] for t in factory.table()["hosts"]) == 6
    await backend.close()
    await factory.close()


class IdleHost(FakeHost):
    """A host that knows it does not serve anything now (a Triton host marked down)."""

    kind = "triton"

    def serving(self, model: str) -> bool:
        return False

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "state": "down", "reason": "gone"}


class UnreachableHost(FakeHost):
    async def prepare(self, source: ModelSource, version: int, config: ModelConfig) -> None:
        raise HostUnreachable(f"{self.name} is unreachable")

    async def release(self, model: str) -> None:
        self.calls += 1


async def test_hosts_that_do_not_serve_a_model_are_not_candidates(
    simple_source: ModelSource,
) -> None:
    """A host that says it does not serve the model now is skipped before the router's next
    probe; with no other target the answer names it and why (a 503, not a wasted call)."""
    idle, good = IdleHost("idle"), FakeHost("good")
    settings = Settings(local_execution=False, routing_policy="round_robin")
    factory = RoutedFactory(settings, [HostEntry(idle), HostEntry(good)])
    backend = await factory.load(simple_source, 1)
    assert backend.ready()
    for _ in range(4):
        await backend.execute(inputs(), ["OUTPUT0"])
    assert (idle.calls, good.calls) == (0, 4)
    await factory.remove_host("good")
    assert not backend.ready()
    with pytest.raises(Unavailable, match="idle down: gone"):
        await backend.execute(inputs(), ["OUTPUT0"])
    assert idle.calls == 0
    described = backend.describe()
    assert described["backend"] == "triton" and described["hosts"] == [
        {"name": "idle", "kind": "triton", "state": "down", "model_ready": False}
    ]
    await backend.close()
    await factory.close()


async def test_a_version_no_host_took_fails_to_load(simple_source: ModelSource) -> None:
    """Without the local runtime, a version that no host took does not load (each host's reason
    in the error), and unreachable hosts give up their pending registration."""
    hosts = [UnreachableHost("a"), UnreachableHost("b")]
    factory = RoutedFactory(Settings(local_execution=False), [HostEntry(h) for h in hosts])
    with pytest.raises(ModelLoadError, match="could not be loaded on any host: a: a is unr"):
        await factory.load(simple_source, 1)
    assert [h.calls for h in hosts] == [1, 1]  # released
    await factory.close()


async def test_triton_only_deployment_is_the_router_without_local_execution() -> None:
    """Triton hosts alone: no local target, and the host table and run-time changes of the
    admin API work as for any routed deployment."""
    table = {"kind": "triton", "name": "t1", "url": "127.0.0.1:1"}
    factory = RoutedFactory(Settings(hosts=(table,), host_probe_interval_s=0.1))
    assert set(factory.router.targets) == {"t1"}
    result = await factory.add_host({**table, "name": "t2", "grpc_url": "127.0.0.1:2"})
    assert result == {"name": "t2", "replaced": False, "models": {}}
    rows = {row["name"]: row for row in factory.table()["hosts"]}
    assert rows["t2"]["host"]["protocol"] == "grpc" and rows["t1"]["host"]["kind"] == "triton"
    removed = await factory.remove_host("t1", wait=True)
    assert removed["drained"] is True and set(factory.router.targets) == {"t2"}
    await factory.close()


def test_latency_policy_balances_equal_hosts_by_in_flight() -> None:
    policy = make_policy("latency", random.Random(2))
    # Same normalised cost (a usually carries more), so fewer in flight wins.
    a = Candidate("a", 6, 16, 0.010, True, typical_in_flight=6.0)
    b = Candidate("b", 1, 16, 0.010, True, typical_in_flight=1.0)
    assert all(policy.choose([a, b]).name == "b" for _ in range(10))


# -- host tables and run-time host changes --------------------------------------------------


def test_host_table_is_checked_and_completed() -> None:
    table = check_host_table(
        {"kind": "v2", "url": "127.0.0.1:9000", "weight": 2, "models": ["m"]}, strict=True
    )
    assert table["name"] == "127.0.0.1:9000" and table["weight"] == 2
    dns = check_host_table({"kind": "v2", "dns": "workers", "port": 8000}, strict=True)
    assert dns["name"] == "workers"
    # The config file keeps its defaults and ignores keys it does not know.
    lax = check_host_table({"url": "http://t:8000", "future_key": 1})
    assert lax["kind"] == "triton" and lax["name"] == "http://t:8000"


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ([], "object"),
        ({"url": "h:1"}, "'kind' is required"),
        ({"kind": "grpc", "url": "h:1"}, "'kind'"),
        ({"kind": "v2", "url": "h:1", "max_in_flight": 4}, "unknown key(s) for kind 'v2': max_in"),
        ({"kind": "triton", "url": "h:1", "push": True}, "unknown key(s) for kind 'triton': push"),
        ({"kind": "v2"}, "'url'"),
        ({"kind": "v2", "url": "ftp://h:1"}, "'url'"),
        ({"kind": "v2", "url": "h:99999"}, "'url'"),
        ({"kind": "v2", "url": "h:1", "name": "local"}, "'name'"),
        ({"kind": "v2", "url": "h:1", "name": "g@1.2.3.4:80"}, "'name' must not contain '@'"),
        ({"kind": "v2", "url": "h:1", "name": "a b"}, "'name'"),
        ({"kind": "v2", "url": "h:1", "name": 7}, "'name'"),
        ({"kind": "v2", "url": "h:1", "weight": 0}, "'weight'"),
        ({"kind": "v2", "url": "h:1", "weight": True}, "'weight'"),
        ({"kind": "v2", "url": "h:1", "max_inflight": 0}, "'max_inflight'"),
        ({"kind": "v2", "url": "h:1", "max_inflight": "4"}, "'max_inflight'"),
        ({"kind": "v2", "url": "h:1", "models": "simple"}, "'models'"),
        ({"kind": "v2", "url": "h:1", "labels": [1]}, "'labels'"),
        ({"kind": "v2", "url": "h:1", "push": "yes"}, "'push'"),
        ({"kind": "v2", "dns": "workers"}, "'port'"),
        ({"kind": "v2", "dns": "workers", "port": 80, "url": "h:1"}, "not both"),
        ({"kind": "triton", "url": "h:1", "device": "tpu"}, "'device'"),
    ],
)
def test_invalid_host_tables_name_the_field(table: Any, field: str) -> None:
    with pytest.raises(SettingsError, match=r"^host: ") as info:
        check_host_table(table, strict=True)
    assert field in str(info.value)


def test_host_tables_parse_into_v2_hosts_and_dns_groups() -> None:
    settings = Settings(host_max_inflight=5)
    spec = parse_host({"kind": "v2", "name": "w", "url": "h:1", "push": True}, settings)
    assert isinstance(spec, V2Spec)
    entry = build_host(spec, settings)
    assert isinstance(entry, HostEntry) and entry.host.name == "w"
    assert entry.max_inflight == 5 and entry.models is None
    assert entry.host.describe()["url"] == "http://h:1" and entry.host.describe()["push"]
    group = parse_host({"kind": "v2", "dns": "workers", "port": 8000}, settings)
    assert isinstance(group, DnsSpec) and (group.name, group.port) == ("workers", 8000)
    assert group.member("10.0.0.1").url == "http://10.0.0.1:8000"
    with pytest.raises(SettingsError, match="'weight'"):
        parse_host({"kind": "v2", "url": "h:1", "weight": -1}, settings)


async def test_routed_triton_hosts_leave_the_batching_to_the_gateway() -> None:
    """The router batches before it picks a host; a Triton host that waited too would pay the
    queue delay twice, so ``batching = "triton"`` is refused wherever a target does not batch
    for itself (a v2 host, the local runtime): in the file and through the admin API."""
    table = {"kind": "triton", "name": "t", "url": "h:1"}
    entry = build_host(parse_host({**table, "batching": "gateway"}, Settings()), Settings())
    assert isinstance(entry, HostEntry) and not entry.host.batches_upstream
    v2 = {"kind": "v2", "name": "w", "url": "h:2"}
    with pytest.raises(SettingsError, match="Triton host t: batching = 'triton'"):
        configured_hosts(Settings(hosts=(v2, table), triton_batching="triton"))
    entries, _, _ = configured_hosts(Settings(hosts=(v2, table)))
    assert [e.host.name for e in entries] == ["w", "t"]
    # Triton-only: allowed, and the backend says so (no local runtime either).
    factory = RoutedFactory(Settings(hosts=(table,), triton_batching="triton"))
    assert factory.pool.hosts["t"].host.batches_upstream and LOCAL not in factory.router.targets
    with pytest.raises(SettingsError, match="Triton host t: batching = 'triton'"):
        await factory.add_host(v2)
    with pytest.raises(SettingsError, match="Triton host u: batching = 'triton'"):
        await RoutedFactory(Settings(hosts=(v2,))).add_host(
            {**table, "name": "u", "batching": "triton"}
        )


def test_replaced_target_drains_and_keeps_its_verdicts_to_itself() -> None:
    clock = ManualClock()
    router = Router(
        make_policy("round_robin"),
        clock=clock,
        outliers=OutlierDetector(consecutive_errors=1, max_ejected_fraction=1.0, clock=clock),
    )
    old = router.add_target("a", capacity=1)
    lease = router.try_acquire("m", "m/1", 1)
    assert lease is not None and lease.target is old
    new = router.add_target("a", capacity=4, weight=2.0)  # placement change: replaced
    assert router.targets["a"] is new and not router.is_current(old)
    assert router.draining == [old]
    assert [d["name"] for d in router.table()["draining"]] == ["a"]
    lease.finish(FAILURE)  # the old one's failure does not eject the new one
    assert router.outliers.state("a") == "up" and old.failed == 1 and new.failed == 0
    assert router.draining == [] and old.in_flight == 0
    assert router.try_acquire("m", "m/1", 1) is not None  # the new one takes batches


def test_removed_target_takes_no_new_leases() -> None:
    router = two_hosts(ManualClock())
    lease = router.try_acquire("m", "m/1", 1, exclude=["b"])
    assert lease is not None and lease.name == "a"
    removed = router.remove_target("a")
    assert removed is not None and router.draining == [removed]
    assert router.try_acquire("m", "m/1", 1) is not None  # b
    assert router.try_acquire("m", "m/1", 1) is None  # b is full and a is gone
    assert router.remove_target("b") is not None and router.draining[-1].name == "b"
    with pytest.raises(Unavailable, match="no healthy host"):
        router.try_acquire("m", "m/1", 1)
    assert router.remove_target("nope") is None
    idle = Router(make_policy("latency"))
    idle.add_target("x")
    idle.remove_target("x")
    assert idle.draining == []  # nothing in flight: nothing to drain


async def test_router_drained_waits_for_the_last_lease() -> None:
    router = Router(make_policy("latency"))
    router.add_target("a")
    lease = await router.acquire("m", "m/1", 1)
    state = router.remove_target("a")
    assert state is not None
    assert not await router.drained(state, 0.05)  # still in flight
    waiter = asyncio.ensure_future(router.drained(state, 5.0))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    lease.finish(SUCCESS)
    assert await asyncio.wait_for(waiter, 1.0)
    assert state.completed == 1 and router.draining == []


class GatedHost(FakeHost):
    """A fake host whose inferences wait for ``gate``; records prepare and close."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.prepared: list[str] = []
        self.closed = False

    async def prepare(self, source: ModelSource, version: int, config: ModelConfig) -> None:
        self.prepared.append(f"{source.name}/{version}")

    async def infer(
        self,
        model: str,
        version: int,
        inputs: Tensors,
        outputs: Sequence[str],
        timeout_s: float | None = None,
    ) -> Tensors:
        self.calls += 1
        self.entered.set()
        await self.gate.wait()
        assert not self.closed, "a batch ran on a closed host"
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}

    async def close(self) -> None:
        self.closed = True


async def test_added_host_is_prepared_and_takes_batches(simple_source: ModelSource) -> None:
    a, b = GatedHost("a"), GatedHost("b")
    factory = RoutedFactory(
        Settings(local_execution=False, routing_policy="round_robin"), [HostEntry(a)]
    )
    backend = await factory.load(simple_source, 1)
    result = await factory.add_entry(HostEntry(b, weight=1.0, max_inflight=3))
    assert result["replaced"] is False and result["models"]["simple/1"]["ready"] is True
    assert b.prepared == ["simple/1"]  # the loaded version, before it takes batches
    assert factory.router.targets["b"].ready["simple/1"]
    for _ in range(4):
        await backend.execute(inputs(), ["OUTPUT0"])
    assert a.calls == 2 and b.calls == 2
    assert backend.instance_count == 16 + 3  # what the batcher of a new load would get
    placed = GatedHost("p")
    result = await factory.add_entry(HostEntry(placed, models=frozenset({"other"})))
    assert result["models"] == {} and placed.prepared == []  # not placed there
    await backend.close()
    await factory.close()
    assert a.closed and b.closed and placed.closed


async def test_removed_host_drains_before_it_closes(simple_source: ModelSource) -> None:
    a, b = GatedHost("a"), GatedHost("b")
    factory = RoutedFactory(
        Settings(local_execution=False, routing_policy="round_robin"), [HostEntry(a), HostEntry(b)]
    )
    backend = await factory.load(simple_source, 1)
    a.gate.clear()
    running = asyncio.ensure_future(backend.execute(inputs(), ["OUTPUT0"]))
    await asyncio.wait_for(a.entered.wait(), 1.0)  # round robin: the first batch is on a
    removing = asyncio.ensure_future(factory.remove_host("a", wait=True))
    await asyncio.sleep(0.02)
    assert "a" not in factory.router.targets and not removing.done() and not a.closed
    assert [d["name"] for d in factory.table()["draining"]] == ["a"]
    for _ in range(3):  # new batches go elsewhere at once
        await backend.execute(inputs(), ["OUTPUT0"])
    assert a.calls == 1 and b.calls == 3
    a.gate.set()
    out = await asyncio.wait_for(running, 1.0)  # the batch in flight finished there
    assert out.outputs["OUTPUT0"][0, 3] == 6 and out.host == "a"
    result = await asyncio.wait_for(removing, 1.0)
    assert result == {"name": "a", "hosts": ["a"], "in_flight": 1, "drained": True}
    assert a.closed and not b.closed and factory.table()["draining"] == []
    with pytest.raises(UnknownHost):
        await factory.remove_host("a")
    with pytest.raises(HostConflict):
        await factory.remove_host("local")
    await backend.close()
    await factory.close()


async def test_replacing_a_host_changes_placement_without_dropping_batches(
    simple_source: ModelSource,
) -> None:
    old, other = GatedHost("w"), GatedHost("x")
    factory = RoutedFactory(
        Settings(local_execution=False, routing_policy="round_robin"),
        [HostEntry(old), HostEntry(other)],
    )
    backend = await factory.load(simple_source, 1)
    old.gate.clear()
    running = asyncio.ensure_future(backend.execute(inputs(), ["OUTPUT0"]))
    await asyncio.wait_for(old.entered.wait(), 1.0)
    new = GatedHost("w")
    result = await factory.add_entry(HostEntry(new, models=frozenset({"simple"}), weight=3.0))
    assert result["replaced"] is True and new.prepared == ["simple/1"]
    target = factory.router.targets["w"]
    assert target.weight == 3.0 and target.models == frozenset({"simple"})
    for _ in range(4):
        await backend.execute(inputs(), ["OUTPUT0"])
    assert old.calls == 1 and new.calls == 3 and other.calls == 1  # weights 3:1
    assert not old.closed
    old.gate.set()
    assert (await asyncio.wait_for(running, 1.0)).outputs["OUTPUT0"][0, 3] == 6
    for _ in range(50):
        if old.closed:
            break
        await asyncio.sleep(0.01)
    assert old.closed and not new.closed
    await backend.close()
    await factory.close()


async def test_dns_group_added_replaces_a_host_and_goes_as_a_whole() -> None:
    settings = Settings(local_execution=False)
    static = GatedHost("g")
    factory = RoutedFactory(settings, [HostEntry(static), HostEntry(GatedHost("other"))])
    result = await factory.add_entry(DnsSpec("g", "localhost", 1, V2Spec("g", "")))
    assert result["replaced"] is True and "g@127.0.0.1:1" in result["hosts"]
    assert "g" not in factory.router.targets and "g@127.0.0.1:1" in factory.router.targets
    assert [g["name"] for g in factory.table()["dns_groups"]] == ["g"]
    with pytest.raises(HostConflict, match="DNS group 'g'"):
        await factory.remove_host("g@127.0.0.1:1")
    removed = await factory.remove_host("g", wait=True)
    assert removed["drained"] is True and "g@127.0.0.1:1" in removed["hosts"]
    assert set(factory.router.targets) == {"other"} and factory.table()["dns_groups"] == []
    assert static.closed  # the host the group replaced, once drained
    await factory.close()


# -- cold-start tiers -----------------------------------------------------------------------


def test_index_answer_parses_into_tiers() -> None:
    index = parse_index(
        [
            {"name": "a", "version": "1", "state": "READY", "reason": ""},
            {"name": "b", "state": "UNAVAILABLE", "reason": "cached: 4096 bytes"},
            {"name": "c", "state": "UNAVAILABLE", "reason": "not cached"},
            {"name": "d", "state": "UNAVAILABLE", "reason": "fetching: 300/1000 bytes"},
            {"name": "e", "state": "UNAVAILABLE", "reason": "not loaded"},  # a plain directory
            {"name": "f", "version": "2", "state": "UNAVAILABLE", "reason": "unloaded"},
            "junk",
        ]
    )
    assert index is not None
    assert tier_for(index, "a", 1) == HostModel(LOADED)
    assert tier_for(index, "a", 2).tier == ORIGIN  # another version: not there
    assert tier_for(index, "b", 1) == HostModel(CACHED, size_bytes=4096)
    assert tier_for(index, "c", 1).tier == ORIGIN
    fetching = tier_for(index, "d", 3)
    assert fetching.tier == ORIGIN and fetching.left_bytes == 700
    assert tier_for(index, "e", 1).tier == CACHED
    assert tier_for(index, "f", 2).tier == CACHED
    assert tier_for(index, "unlisted", 1).tier == ORIGIN
    assert parse_index({"error": "no"}) is None


def test_cold_cost_orders_loaded_cached_origin() -> None:
    clock = ManualClock()
    router = Router(
        make_policy("latency"), clock=clock, default_load_s=2.0, default_bandwidth_bps=1e6
    )
    for name in ["loaded", "cached", "origin", "unknown"]:
        router.add_target(name)
    key = "m/1"
    router.set_model_bytes(key, 10_000_000)  # 10 MB: 10 s at the default 1 MB/s
    router.set_tier("loaded", key, HostModel(LOADED))
    router.set_tier("cached", key, HostModel(CACHED, 10_000_000))
    router.set_ready("cached", key, False, load_s=0.5)  # measured load there
    router.set_tier("origin", key, HostModel(ORIGIN))
    costs = {n: router.cold_cost(t, key) for n, t in router.targets.items()}
    assert costs["loaded"] == (LOADED, 0.0)
    assert costs["cached"] == (CACHED, 0.5)
    assert costs["origin"] == (ORIGIN, pytest.approx(10.0 + 2.0))
    assert costs["unknown"] == costs["origin"]  # unknown is priced as origin
    assert router.targets["loaded"].ready[key]
    # A measured bandwidth (a push of 5 MB in 1 s) makes the origin cheaper there.
    router.observe_transfer("origin", 5_000_000, 1.0)
    assert router.cold_cost(router.targets["origin"], key) == (ORIGIN, pytest.approx(2.0 + 2.0))
    # So does a fetch in progress seen twice by the probe: bandwidth and what is left.
    router.set_tier("unknown", key, HostModel(ORIGIN, 10_000_000, 2_000_000))
    clock.advance(1.0)
    router.set_tier("unknown", key, HostModel(ORIGIN, 10_000_000, 6_000_000))
    assert router.targets["unknown"].bandwidth_bps == pytest.approx(4e6)
    assert router.cold_cost(router.targets["unknown"], key) == (ORIGIN, pytest.approx(1.0 + 2.0))
    models = {h["name"]: h["models"][key] for h in router.table()["hosts"]}
    assert models["loaded"]["tier"] == "loaded" and models["loaded"]["cold_start_s"] == 0.0
    assert models["cached"]["tier"] == "cached" and models["cached"]["cold_start_s"] == 0.5
    assert models["unknown"]["fetch_left_bytes"] == 4_000_000
    # Not ready after all (a 404 there): a stale "loaded" is priced as cached.
    router.set_ready("loaded", key, False)
    assert router.cold_cost(router.targets["loaded"], key) == (CACHED, 2.0)


def test_cold_host_wins_only_when_the_warm_one_is_slower() -> None:
    clock = ManualClock()
    router = Router(
        make_policy("latency", random.Random(3)),
        clock=clock,
        default_load_s=0.2,
        default_bandwidth_bps=1e6,
    )
    key = "m/1"
    router.set_model_bytes(key, 1_000_000)  # 1 s from the origin
    for name in ["warm", "cached", "origin"]:
        router.add_target(name, capacity=64)
        router.targets[name].estimates[key] = est = LatencyEstimate(10.0, clock)
        est.observe(1, 0.010)
    router.set_ready("warm", key, True)
    router.set_tier("cached", key, HostModel(CACHED))
    router.set_tier("origin", key, HostModel(ORIGIN))

    def pick(*names: str) -> str:
        lease = router.try_acquire("m", key, 1, exclude=set(router.targets) - set(names))
        assert lease is not None
        lease.finish("neutral")
        return lease.name

    warm = router.targets["warm"]
    assert all(pick("warm", "cached") == "warm" for _ in range(10))  # 10 ms beats 200 ms
    warm.started = {-i: clock() for i in range(1, 31)}  # 30 batches out: 31 x 10 ms = 310 ms
    # > 10 ms + 200 ms load
    assert all(pick("warm", "cached") == "cached" for _ in range(10))
    assert all(pick("warm", "origin") == "warm" for _ in range(10))  # 1.2 s from the origin
    warm.started = {-i: clock() for i in range(1, 61)}  # 60 out, 610 ms: the cached host wins,
    # the origin one still does not
    assert pick("warm", "cached") == "cached"
    assert all(pick("warm", "origin") == "warm" for _ in range(10))
    assert all(pick("cached", "origin") == "cached" for _ in range(10))


def measured_router(clock: ManualClock, latencies: dict[str, float], **options: Any) -> Router:
    """A latency router over the hosts ``latencies`` names, each measured once at its latency."""
    router = Router(
        make_policy("latency", random.Random(3)), clock=clock, max_wait_s=0.05, **options
    )
    for name in latencies:
        router.add_target(name, capacity=4)
    for name, seconds in latencies.items():
        lease = router.try_acquire("m", "m/1", 1, exclude=[n for n in latencies if n != name])
        assert lease is not None
        clock.advance(seconds)
        lease.finish(SUCCESS)
    return router


def test_a_probe_that_has_not_come_back_keeps_traffic_off_a_slow_host() -> None:
    """An idle slow host's estimate decays until it is tried again (a probe by traffic). While
    that batch is out, its age is a floor on the host's latency: the next batches stay on the
    fast host instead of following the probe until the first answer comes back."""
    clock = ManualClock()
    router = measured_router(clock, {"fast": 0.05, "slow": 0.15}, decay_s=2.0)
    for _ in range(200):  # 10 s of traffic on the fast host only: the slow one's estimate decays
        lease = router.try_acquire("m", "m/1", 1, exclude=["slow"])
        assert lease is not None
        clock.advance(0.05)
        lease.finish(SUCCESS)
    probe = router.try_acquire("m", "m/1", 1)
    assert probe is not None and probe.name == "slow"  # decayed below the fast host: tried
    clock.advance(0.1)  # the probe has been out for 100 ms, longer than the fast host takes
    after = [router.try_acquire("m", "m/1", 1) for _ in range(3)]
    assert [lease.name for lease in after if lease is not None] == ["fast"] * 3


def test_a_host_that_comes_back_up_is_measured_afresh() -> None:
    """A host the probes saw go down and come back is most likely a new process: its old
    estimate (here, slow) is dropped, so it is tried at once instead of waiting for the old
    figure to decay while its peers take everything."""
    clock = ManualClock()
    router = measured_router(clock, {"back": 0.5, "peer": 0.01})

    def pick() -> str:
        lease = router.try_acquire("m", "m/1", 1)
        assert lease is not None
        lease.finish(SUCCESS)  # no time passes: no sample moves the estimates
        return lease.name

    assert {pick() for _ in range(10)} == {"peer"}  # 0.5 s against 10 ms
    up = False

    async def probe(name: str) -> bool:
        return up or name == "peer"

    asyncio.run(router._probe_one(probe, "back"))
    assert router.table()["hosts"][0]["state"] == "down"
    assert router.targets["back"].estimates["m/1"].samples > 0  # kept while it is away
    up = True
    asyncio.run(router._probe_one(probe, "back"))
    assert router.targets["back"].estimates == {}
    lease = router.try_acquire("m", "m/1", 1)
    assert lease is not None and lease.name == "back"
