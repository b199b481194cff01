"""The probe state machine under races, driven on a manual clock with probes that answer on demand.

Each test pins one race seen as a flaky test under load: a host re-added where a removed one
was probed (never probed again), an ejected host whose next probe was planned while it was well
(re-admitted a period late), a probe out across a failure (its old answer undid the failure),
and the same for a Triton host's own monitor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.backends.triton import DOWN, UP, TritonHost, _Placement
from gateway.errors import HostUnreachable
from gateway.repository.config import ModelConfig, TensorConfig
from gateway.repository.local import ModelSource
from gateway.routing import FAILURE, OutlierDetector, Router
from gateway.routing.aperture import Aperture
from gateway.routing.router import TargetState
from gateway.routing.schedule import ProbeSchedule
from tests.routing_setup import ManualClock, make_router


async def until(condition: Callable[[], bool], what: str, limit_s: float = 5.0) -> None:
    """Wait (real time, the probe loop's sleeps) for ``condition``; a bound against "never"."""
    for _ in range(int(limit_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


def tick(clock: ManualClock, seconds: float) -> bool:
    """Move the clock on (for ``until``, while it waits for the probe loop)."""
    clock.advance(seconds)
    return True


class Probes:
    """A probe whose answers the test gives: ``hold`` makes the next probes of a host wait
    until ``release``; every probe is recorded with the clock at its start."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.calls: list[tuple[str, float]] = []
        self.answers: dict[str, bool] = {}
        self.gates: dict[str, asyncio.Event] = {}

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    def hold(self, name: str) -> None:
        self.gates[name] = asyncio.Event()

    def release(self, name: str) -> None:
        self.gates.pop(name).set()

    async def __call__(self, name: str) -> bool:
        self.calls.append((name, self.clock()))
        gate = self.gates.get(name)
        if gate is not None:
            await gate.wait()
        return self.answers.get(name, True)


def eject(router: Router, name: str) -> None:
    """Fail batches on ``name`` until the router ejects it (the passive path, ``_finish``)."""
    others = [n for n in router.targets if n != name]
    while router.outliers.hosts[name].ejected_until_s is None:
        lease = router.try_acquire("m", "m/1", 1, exclude=others)
        assert lease is not None and lease.name == name
        lease.finish(FAILURE)


async def running(router: Router, probe: Callable[[str], Awaitable[bool]]) -> None:
    router.start(probe)
    await asyncio.sleep(0.02)


# -- the schedule ---------------------------------------------------------------------------


def test_schedule_keeps_one_plan_per_target_and_skips_stale_entries() -> None:
    schedule = ProbeSchedule()
    a, b = TargetState("a"), TargetState("b")
    schedule.plan(a, 10.0)
    schedule.plan(b, 5.0)
    assert a in schedule and schedule.due_s(a) == 10.0 and len(schedule) == 2
    assert schedule.pop_due(4.9) is None and schedule.next_at_s() == 5.0
    assert not schedule.sooner(a, 12.0)  # later than planned: kept
    assert schedule.sooner(a, 3.0) and schedule.due_s(a) == 3.0
    assert schedule.pop_due(5.0) is a and a not in schedule  # taken: the caller decides
    assert schedule.pop_due(5.0) is b
    assert schedule.pop_due(100.0) is None  # a's first entry (10.0) was stale
    schedule.plan(a, 1.0)
    schedule.start(a)
    assert schedule.running(a) and schedule.due_s(a) is None and a in schedule
    assert not schedule.sooner(a, 0.0)  # out: its end plans the next one
    assert schedule.pop_due(100.0) is None
    schedule.forget(a)
    assert a not in schedule and len(schedule) == 0
    schedule.forget(b)  # no plan: nothing


def test_schedule_pops_in_time_then_plan_order_and_never_a_running_target() -> None:
    schedule = ProbeSchedule()
    a, b, c = TargetState("a"), TargetState("b"), TargetState("c")
    assert not schedule.running(a)  # no plan
    for target in (b, a, c):
        schedule.plan(target, 5.0)
    assert not schedule.running(a)  # planned, not out
    assert [schedule.pop_due(5.0) for _ in range(3)] == [b, a, c]  # same time: first planned
    schedule = ProbeSchedule()
    schedule.plan(a, 10.0)
    assert not schedule.sooner(a, 10.0)  # as planned: nothing to move
    assert schedule.sooner(a, 5.0)  # the 10.0 entry is stale now
    assert schedule.pop_due(5.0) is a
    schedule.start(a)
    assert schedule.pop_due(50.0) is None  # the stale entry does not pop it while it is out
    assert schedule.running(a)


def test_schedule_tells_apart_a_new_target_from_a_forgotten_one() -> None:
    schedule = ProbeSchedule()
    old = TargetState("a")
    schedule.plan(old, 1.0)
    assert TargetState("a") not in schedule  # same name, another target
    schedule.forget(TargetState("a"))
    assert old in schedule


# -- the router's probe loop ----------------------------------------------------------------


async def test_a_host_readded_where_a_removed_one_was_probed_is_probed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flaky ``test_killed_host_is_readmitted_when_it_comes_back``: a host removed while its
    probe was out left its ``id()`` in the loop's set of planned targets; a target added later
    at the same address was taken for planned and never probed, so once ejected it stayed
    ejected. Address reuse is the allocator's choice: here every target of a name gets the
    same ``id()`` in the routing modules, as the new one did by chance."""
    import gateway.routing.router as router_module
    import gateway.routing.schedule as schedule_module

    def same_id_per_name(obj: object) -> int:
        return hash(("target", obj.name)) if isinstance(obj, TargetState) else id(obj)

    for module in (router_module, schedule_module):
        monkeypatch.setattr(module, "id", same_id_per_name, raising=False)
    clock = ManualClock()
    router = make_router(["a", "b"], ready="m/1", clock=clock, probe_interval_s=0.2)
    probes = Probes(clock)
    probes.hold("a")
    await running(router, probes)
    await until(lambda: probes.count("a") == 1, "the first probe of a")
    router.remove_target("a")  # while its probe is out
    probes.release("a")
    await until(lambda: probes.count("b") >= 1, "b probed")
    await asyncio.sleep(0.02)  # the probe of the removed target has ended
    assert len(router._schedule) == 1  # b's plan; none kept for the removed target
    router.add_target("a")  # back (``POST /admin/hosts``)
    router.set_ready("a", "m/1", True)
    await until(lambda: tick(clock, 0.05) and probes.count("a") >= 2, "the re-added host probed")
    eject(router, "a")  # then killed: failed batches eject it
    clock.advance(5.0)
    await until(lambda: router.outliers.state("a") == "up", "re-admitted by a probe")
    await router.close()


@pytest.mark.parametrize("outside", [True, False])
async def test_an_ejected_host_is_probed_when_its_ejection_ends(outside: bool) -> None:
    """A host's next probe was planned while it was well: outside the aperture a minute away,
    inside it a stretched period (20 hosts at 2 probes/s: 10 s). Ejected, it must be probed
    when its ejection (2 s) ends, not then: it is re-admitted about when the time is up."""
    clock = ManualClock()
    names = [f"h{i}" for i in range(20)]
    router = make_router(
        names,
        ready="m/1",
        clock=clock,
        probe_interval_s=5.0,  # longer than the ejection: its end comes first
        probe_jitter=0.0,
        probe_rate=2.0,
        probe_idle_interval_s=60.0,
        aperture=Aperture(4, 1.0, 0.0),
        outliers=OutlierDetector(consecutive_errors=2, base_ejection_s=2.0, clock=clock),
    )
    router.aperture.refresh(clock(), router.outliers.available)
    members = {t.name for t in router.aperture.members.items}
    victim = next(n for n in names if (n in members) != outside)
    probes = Probes(clock)
    await running(router, probes)
    target = router.targets[victim]
    # Planned as the loop plans a well host (the first round spreads hosts at random).
    router._schedule.plan(target, clock() + (60.0 if outside else 10.0))
    eject(router, victim)
    until_s = router.outliers.hosts[victim].ejected_until_s
    assert until_s is not None
    due_s = router._schedule.due_s(target)
    assert due_s is not None and due_s <= until_s
    clock.now_s = until_s
    await until(lambda: probes.count(victim) >= 1, "the probe when the ejection ends")
    assert probes.calls[-1] == (victim, until_s)
    await until(lambda: router.outliers.state(victim) == "up", "re-admitted")
    await router.close()


async def test_a_probe_sent_before_an_ejection_does_not_readmit_the_host() -> None:
    """Flaky ``test_host_crash_fails_fast_and_restart_recovers`` (the router's half): a probe
    sent while the host was alive answers after batches failed there and ejected it, and
    after the ejection's time. Its answer is as old as when it was sent: it must not
    re-admit the host; the next probe, sent after the ejection, does."""
    clock = ManualClock()
    router = make_router(
        ["a", "b"],
        ready="m/1",
        clock=clock,
        outliers=OutlierDetector(consecutive_errors=2, base_ejection_s=1.0, clock=clock),
        probe_timeout_s=30.0,
    )
    probes = Probes(clock)
    probes.hold("a")
    probing = asyncio.create_task(router._probe_one(probes, "a"))
    await until(lambda: probes.count("a") == 1, "the probe sent")
    clock.advance(0.1)
    eject(router, "a")  # killed now
    clock.advance(2.0)  # the ejection's time is over; the old probe comes back only now
    probes.release("a")
    await probing
    assert router.outliers.state("a") == "ejected"
    await router._probe_one(probes, "a")  # sent after the ejection: re-admits
    assert router.outliers.state("a") == "up"


def test_a_stale_successful_probe_counts_for_nothing() -> None:
    clock = ManualClock()
    det = OutlierDetector(clock=clock, unhealthy_threshold=1, healthy_threshold=2)
    det.add("a")
    det.add("b")
    det.record_probe("a", False)
    assert det.state("a") == "down"
    sent_s = clock()
    clock.advance(1.0)
    det.record_failure("a")  # a failure seen after that probe was sent
    det.record_probe("a", True, sent_s)
    det.record_probe("a", True, sent_s)
    assert det.state("a") == "down"  # both answers predate the failure
    det.record_probe("a", True)
    det.record_probe("a", True)
    assert det.state("a") == "up"
    det.record_probe("a", False, sent_s)  # a failure counts however old
    assert det.state("a") == "down"


# -- a Triton host's own monitor ------------------------------------------------------------


class HeldTriton:
    """A Triton client whose readiness answers when the test says, and whose inference finds
    the connection refused (a killed server): the fault a real one cannot time."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()

    async def is_server_ready(self, *args: Any, **kwargs: Any) -> bool:
        self.asked.set()
        await self.answer.wait()
        return True

    async def infer(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError("connection refused")


async def test_a_triton_probe_out_across_a_failure_does_not_mark_the_host_up() -> None:
    """Flaky ``test_host_crash_fails_fast_and_restart_recovers``: the monitor's probe asked a
    live server, the server was killed, a batch found it gone (down), then the probe's answer
    came back and marked the host up again."""
    host = TritonHost("t1", "127.0.0.1:9", protocol="http", probe_interval_s=0.5)
    client = HeldTriton()
    host._transport._client = client
    try:
        probing = asyncio.create_task(host.probe())
        await asyncio.wait_for(client.asked.wait(), 5.0)
        with pytest.raises(HostUnreachable):
            await host.infer("m", 1, {"X": np.zeros((1, 4), np.float32)}, ["Y"])
        assert host.state == DOWN
        client.answer.set()  # the old answer: the server was ready when asked
        await asyncio.wait_for(probing, 5.0)
        assert host.state == DOWN
        await asyncio.wait_for(host.probe(), 5.0)  # asked after the failure: believed
        assert host.state == UP
    finally:
        host._transport._client = None
        await host.close()


class RestartedTriton:
    """A Triton client for a server restarted with an empty repository: live and ready, no
    model ready, and loading ``slow`` waits until the test says (a python-backend load under
    load takes seconds)."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()
        self.slow_asked = asyncio.Event()
        self.slow_done = asyncio.Event()

    async def is_server_ready(self, *args: Any, **kwargs: Any) -> bool:
        return True

    async def is_model_ready(self, name: str, *args: Any, **kwargs: Any) -> bool:
        return name in self.loaded

    async def load_model(self, name: str, *args: Any, **kwargs: Any) -> None:
        if name == "slow":
            self.slow_asked.set()
            await self.slow_done.wait()
        self.loaded.add(name)


async def test_a_restarted_triton_serves_each_model_once_it_is_back(tmp_path: Path) -> None:
    """Flaky ``test_host_crash_fails_fast_and_restart_recovers`` (its second half): the host
    was marked up only once every lost model was pushed again, so a model pushed first did
    not serve until the last one had loaded (four python-backend models: over 15 s under
    load)."""
    host = TritonHost("t1", "127.0.0.1:9", protocol="http", probe_interval_s=0.5)
    client = RestartedTriton()
    host._transport._client = client
    for name in ("quick", "slow"):
        (tmp_path / name).write_bytes(b"onnx")
        config = ModelConfig(
            name=name,
            max_batch_size=0,
            inputs=(TensorConfig("X", "FP32", (4,)),),
            outputs=(TensorConfig("Y", "FP32", (4,)),),
        )
        source = ModelSource(name, tmp_path, config, {1: tmp_path / name})
        host._models[name] = _Placement(source, config, {1: tmp_path / name})
    host.used_strategy = "onnxruntime"
    host._mark_down("killed")
    try:
        probing = asyncio.create_task(host.probe())
        await asyncio.wait_for(client.slow_asked.wait(), 5.0)
        assert host.state == UP and host.serving("quick") and not host.serving("slow")
        client.slow_done.set()
        await asyncio.wait_for(probing, 5.0)
        assert host.serving("slow")
    finally:
        host._transport._client = None
        await host.close()


async def test_a_probe_that_hangs_or_raises_is_a_failed_probe() -> None:
    clock = ManualClock()
    router = make_router(
        ["a", "b"],
        clock=clock,
        probe_timeout_s=0.05,
        outliers=OutlierDetector(clock=clock, unhealthy_threshold=1),
    )

    async def hangs(name: str) -> bool:
        await asyncio.Event().wait()
        return True

    async def raises(name: str) -> bool:
        raise ConnectionResetError("gone")

    await asyncio.wait_for(router._probe_one(hangs, "a"), 5.0)
    assert router.outliers.state("a") == "down"
    await router._probe_one(raises, "b")
    assert router.outliers.state("b") == "down"
    assert router.probes_sent == 2


async def test_a_change_of_state_by_a_probe_is_logged_and_moves_the_aperture(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    router = make_router(["a", "b"], clock=clock)
    answers = {"a": True}

    async def probe(name: str) -> bool:
        return answers[name]

    async def probed(ok: bool) -> list[str]:
        answers["a"] = ok
        router.aperture.due_s = 0.0  # recomputed only when something changed
        caplog.clear()
        with caplog.at_level("WARNING", logger="gateway.routing.router"):
            await router._probe_one(probe, "a")
        return [r.getMessage() for r in caplog.records]

    assert await probed(True) == [] and router.aperture.due_s == 0.0  # up, still up
    assert await probed(False) == ["host a is down"]
    assert router.aperture.due_s == float("-inf")
    assert await probed(False) == [] and router.aperture.due_s == 0.0
    assert await probed(True) == ["host a is up"]
    assert router.aperture.due_s == float("-inf")


async def test_a_host_skipped_for_its_traffic_is_probed_once_it_has_none() -> None:
    clock = ManualClock()
    router = make_router(["a", "b"], clock=clock, probe_interval_s=1.0, probe_jitter=0.0)
    probes = Probes(clock)
    router.targets["a"].last_success_s = clock()  # it just answered a batch
    await running(router, probes)
    await until(lambda: probes.count("b") == 1, "b probed")
    assert probes.count("a") == 0 and router.probes_skipped == 1
    await until(lambda: tick(clock, 0.25) and probes.count("a") >= 1, "a probed later")
    await router.close()


def test_a_host_that_answered_a_whole_period_ago_is_probed() -> None:
    clock = ManualClock()
    router = make_router(["a"], clock=clock, probe_interval_s=2.0)
    target = router.targets["a"]
    target.last_success_s = clock() - 1.999
    assert router._busy_and_well(target, clock())
    target.last_success_s = clock() - 2.0
    assert not router._busy_and_well(target, clock())


# -- the state machine's numbers, pinned (scripts/mutation.sh health) -----------------------


def detector(n: int = 4, **kw: Any) -> tuple[OutlierDetector, ManualClock]:
    clock = ManualClock()
    det = OutlierDetector(clock=clock, **kw)
    for i in range(n):
        det.add(f"h{i}")
    return det, clock


def test_defaults_eject_after_three_errors_for_two_seconds_growing_to_thirty() -> None:
    det, clock = detector()
    assert not det.record_failure("h0") and not det.record_failure("h0")
    assert det.record_failure("h0")
    assert det.to_dict("h0") == {
        "state": "ejected",
        "consecutive_errors": 0,
        "times_ejected": 1,
        "ejected_for_s": 2.0,
    }
    for times in range(2, 20):  # each time longer, never past 30 s
        clock.advance(31.0)
        det.record_probe("h0", True)
        assert det.available("h0")
        for _ in range(3):
            det.record_failure("h0")
        assert det.to_dict("h0")["ejected_for_s"] == min(30.0, 2.0 * times)


def test_at_most_half_the_hosts_are_ejected_and_at_least_one_may_be() -> None:
    det, _ = detector(4, consecutive_errors=1)
    assert det.record_failure("h0") and det.record_failure("h1")
    assert not det.record_failure("h2")  # 2 of 4 out already
    det, _ = detector(3, consecutive_errors=1)
    assert det.record_failure("h0")
    assert not det.record_failure("h1")  # int(0.5 * 3) = 1
    det, _ = detector(1, consecutive_errors=1)
    assert det.record_failure("h0")  # one at least, even of one


def test_thresholds_below_one_are_refused() -> None:
    for kw in ({"healthy_threshold": 0}, {"unhealthy_threshold": 0}):
        with pytest.raises(ValueError, match=r"^probe thresholds must be >= 1$"):
            OutlierDetector(**kw)


def test_ejected_for_is_what_is_left_rounded_to_the_millisecond() -> None:
    det, clock = detector(consecutive_errors=1)
    assert det.to_dict("h0")["ejected_for_s"] is None
    det.record_failure("h0")
    clock.advance(0.76543)
    assert det.to_dict("h0")["ejected_for_s"] == 1.235
    clock.advance(1.5)  # time served, no probe since: still ejected, nothing left to serve
    assert det.to_dict("h0") == {
        "state": "ejected",
        "consecutive_errors": 0,
        "times_ejected": 1,
        "ejected_for_s": 0.0,
    }


def test_after_an_ejection_it_takes_all_the_errors_again() -> None:
    det, clock = detector()
    for _ in range(3):
        det.record_failure("h0")
    clock.advance(2.0)
    det.record_probe("h0", True)
    assert det.available("h0")
    assert not det.record_failure("h0") and not det.record_failure("h0")
    det.record_success("h0")  # a success starts the count again
    assert not det.record_failure("h0") and not det.record_failure("h0")
    assert det.to_dict("h0")["consecutive_errors"] == 2


def test_thirty_healthy_seconds_forgive_the_ejections_not_fewer() -> None:
    det, clock = detector()
    for _ in range(3):
        det.record_failure("h0")  # ejected once: 2 s
    clock.advance(2.0)
    det.record_probe("h0", True)
    det.record_success("h0")  # soon after: not forgiven
    assert det.to_dict("h0")["times_ejected"] == 1
    clock.advance(28.0)  # 30 s since the ejection, not more
    det.record_success("h0")
    assert det.to_dict("h0")["times_ejected"] == 1
    clock.advance(0.001)
    det.record_success("h0")
    assert det.to_dict("h0")["times_ejected"] == 0
    for _ in range(3):
        det.record_failure("h0")
    assert det.to_dict("h0")["ejected_for_s"] == 2.0  # the first ejection's length again


def test_probe_thresholds_count_runs_in_a_row() -> None:
    det, _ = detector(unhealthy_threshold=3, healthy_threshold=2)
    for ok in (False, False, True, False, False):  # a success breaks the run of failures
        det.record_probe("h0", ok)
    assert det.state("h0") == "up"
    det.record_probe("h0", False)
    assert det.state("h0") == "down" and det.hosts["h0"].probe_up is False
    for ok in (True, False, True):  # a failure breaks the run of successes
        det.record_probe("h0", ok)
    assert det.state("h0") == "down"
    det.record_probe("h0", True)
    assert det.state("h0") == "up"
    det, _ = detector(unhealthy_threshold=2)
    det.record_probe("h0", False)
    assert det.state("h0") == "up"  # one failure of two


def test_a_removed_host_is_forgotten() -> None:
    det, _ = detector(2)
    det.remove("h0")
    assert "h0" not in det.hosts and "h1" in det.hosts
    det.record_probe("h0", True)  # an answer for it after that: nothing
    assert "h0" not in det.hosts
