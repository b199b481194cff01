"""Routing at fleet sizes: sampled decisions, round robin in turn, probe schedule and
thresholds, the file-descriptor check, aggregated metrics, paged host table, DNS churn."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.backends.base import Host
from gateway.backends.hosts import build_host
from gateway.backends.placement import RoutedFactory
from gateway.backends.remote import V2Host
from gateway.backends.routed import RoutedBackend
from gateway.errors import Overloaded
from gateway.repository.config import ModelConfig
from gateway.routing import SUCCESS, OutlierDetector, Router, make_policy
from gateway.routing.discovery import JOIN_BATCH, DnsDiscovery
from gateway.routing.fds import ensure_fds, fds_needed
from gateway.routing.hosts import DnsSpec, parse_host
from gateway.routing.policies import Candidate, RoundRobinPolicy
from gateway.routing.pool import HostEntry, HostPool
from gateway.routing.probing import Prober
from gateway.routing.report import host_metric_families
from gateway.routing.router import SCAN_BELOW
from gateway.routing.tiers import LOADED, HostModel
from gateway.settings import Settings, SettingsError
from tests.helpers import get, start_gateway
from tests.routing_setup import ManualClock, fleet

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


# -- probes ---------------------------------------------------------------------------------


def test_probe_thresholds_before_marking_down_or_up() -> None:
    det = OutlierDetector(clock=ManualClock(), unhealthy_threshold=2, healthy_threshold=3)
    det.add("a")
    det.record_probe("a", False)
    assert det.available("a")  # one lost probe is not an outage
    det.record_probe("a", True)
    det.record_probe("a", False)
    assert det.available("a")  # not two in a row
    det.record_probe("a", False)
    assert det.state("a") == "down"
    det.record_probe("a", True)
    det.record_probe("a", True)
    assert det.state("a") == "down"
    det.record_probe("a", False)  # the run of successes starts again
    for _ in range(2):
        det.record_probe("a", True)
    assert det.state("a") == "down"
    det.record_probe("a", True)
    assert det.state("a") == "up" and det.available("a")
    with pytest.raises(ValueError):
        OutlierDetector(unhealthy_threshold=0)


def test_probe_periods_are_jittered_and_stretched_to_the_probe_rate() -> None:
    router = fleet(10, probe_interval_s=2.0, probe_jitter=0.25, probe_rate=100.0)
    target = router.targets["h1"]
    gaps = [router._next_probe_s(target, 0.0) for _ in range(500)]
    assert 1.5 <= min(gaps) < 1.6 and 2.4 < max(gaps) <= 2.5
    assert router.probe_period_s() == 2.0
    big = fleet(1000, probe_interval_s=2.0, probe_rate=100.0)
    assert big.probe_period_s() == pytest.approx(10.0)  # 1000 hosts at 100 probes/s
    # A host that is down waits for a probe to come back: it keeps the short interval.
    big.outliers.hosts["h3"].probe_up = False
    assert big._next_probe_s(big.targets["h3"], 0.0) <= 2.0 * 1.2


async def _run_probes(router: Router, seconds: float, probe: Any) -> None:
    router.start(probe)
    await asyncio.sleep(seconds)
    await router.close()


def test_hosts_that_just_answered_traffic_are_not_probed() -> None:
    router = fleet(20, probe_interval_s=10.0)
    router.clock = time.monotonic
    router.outliers._clock = time.monotonic
    for i in range(10):
        router.targets[f"h{i}"].last_success_s = time.monotonic()
    probed: list[str] = []

    async def probe(name: str) -> bool:
        probed.append(name)
        return True

    asyncio.run(_run_probes(router, 0.3, probe))
    assert sorted(probed) == sorted(f"h{i}" for i in range(10, 20))
    assert router.probes_skipped == 10 and router.probes_sent == 10


def test_probe_traffic_stays_within_the_probe_rate() -> None:
    router = fleet(500, probe_interval_s=0.05, probe_rate=1000.0, probe_jitter=0.2)
    router.clock = time.monotonic
    router.outliers._clock = time.monotonic
    per_host: Counter[str] = Counter()

    async def probe(name: str) -> bool:
        per_host[name] += 1
        return True

    asyncio.run(_run_probes(router, 1.0, probe))
    # One round at once, then every 0.5 s (500 hosts at 1000/s), not every 0.05 s.
    assert len(per_host) == 500
    assert router.probes_sent <= 2000
    assert max(per_host.values()) <= 4


def test_the_first_probe_round_is_spread_at_the_probe_rate() -> None:
    router = fleet(300, probe_interval_s=2.0, probe_rate=100.0)
    router.clock = time.monotonic
    router.outliers._clock = time.monotonic

    async def probe(name: str) -> bool:
        return True

    asyncio.run(_run_probes(router, 0.5, probe))
    # Every host is due at once when probing starts; 100/s lets about 10 + 50 go in 0.5 s.
    assert 20 <= router.probes_sent <= 75


class CountingHost(Host):
    """A host that answers health and its repository index, counting the requests."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.requests: Counter[str] = Counter()

    @property
    def name(self) -> str:
        return self._name

    @property
    def labels(self) -> frozenset[str]:
        return frozenset()

    async def prepare(self, source: Any, version: int, config: Any) -> None:
        pass

    async def infer(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def ready(self) -> bool:
        self.requests["ready"] += 1
        return True

    async def model_ready(self, model: str, version: int) -> bool:
        self.requests["model_ready"] += 1
        return True

    async def repository_index(self) -> dict[str, HostModel] | None:
        self.requests["index"] += 1
        return {"m/1": HostModel(LOADED)}

    async def release(self, model: str) -> None:
        pass

    async def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"name": self._name}


@dataclass
class Version:
    model: str = "m"
    version: int = 1
    key: str = "m/1"


class NoIndexHost(CountingHost):
    async def repository_index(self) -> dict[str, HostModel] | None:
        self.requests["index"] += 1
        return None


def test_a_probe_is_one_request_where_the_host_gives_its_index() -> None:
    router = fleet(0)
    pool = HostPool(router, 1.0)
    host, plain = CountingHost("a"), NoIndexHost("b")
    pool.add(HostEntry(host))
    pool.add(HostEntry(plain))
    prober = Prober(pool, lambda: [Version()])

    async def probe_three_times() -> None:
        for _ in range(3):
            assert await prober("a")
            assert await prober("b")

    asyncio.run(probe_three_times())
    # The index is the probe, the first one included (answering it is being up).
    assert host.requests == Counter({"index": 3})
    assert router.targets["a"].ready["m/1"]
    # A host without one is asked its health, then the readiness of what is not ready there.
    assert plain.requests == Counter({"index": 3, "ready": 3, "model_ready": 1})
    assert router.targets["b"].ready["m/1"]


def test_a_v2_hosts_probes_ride_its_batch_connections_and_leave_none_open() -> None:
    """Probes of a v2 host use the connections its batches use (one pool per host, idle ones
    closed after ``keepalive_s``): a probe after a batch opens nothing new, and a host nothing
    listens on is not ready without a connection left counted."""

    async def scenario() -> None:
        accepted = 0

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    size = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            size = int(line.split(b":")[1])
                    await reader.readexactly(size)
                    body = b"[]" if head.startswith(b"POST /v2/repository/index") else b""
                    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                    writer.write(head + body)
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        host = V2Host("a", f"http://127.0.0.1:{port}", keepalive_s=0.3)
        try:
            assert await host.ready()
            assert await host.repository_index() == {}
            assert await host.model_ready("m", 1)
            assert accepted == 1
            await asyncio.sleep(0.8)  # idle past the keep-alive: closed
            assert host._forward is not None and host._forward.open == 0
        finally:
            await host.close()
            server.close()
        nobody = V2Host("b", "http://127.0.0.1:9")  # nothing listens on port 9
        try:
            assert not await nobody.ready()
            assert await nobody.repository_index() is None
            assert nobody._forward is not None and nobody._forward.open == 0
        finally:
            await nobody.close()

    asyncio.run(scenario())


# -- file descriptors -----------------------------------------------------------------------


class Limits:
    def __init__(self, soft: int, hard: int) -> None:
        self.soft, self.hard = soft, hard
        self.set_to: tuple[int, int] | None = None

    def get(self, which: int) -> tuple[int, int]:
        return self.soft, self.hard

    def set(self, which: int, limits: tuple[int, int]) -> None:
        self.set_to = limits
        self.soft = limits[0]


def test_fd_limit_is_raised_when_the_hosts_need_it() -> None:
    enough = Limits(100_000, 100_000)
    assert ensure_fds(1000, getrlimit=enough.get, setrlimit=enough.set) == 100_000
    assert enough.set_to is None
    low = Limits(1024, 1_048_576)
    soft = ensure_fds(1000, getrlimit=low.get, setrlimit=low.set)
    assert soft >= fds_needed(1000) and low.set_to == (soft, 1_048_576)


def test_fd_limit_too_low_fails_with_what_to_do() -> None:
    tight = Limits(1024, 1024)
    with pytest.raises(SettingsError, match=r"600 hosts need about \d+ file descriptors.*ulimit"):
        ensure_fds(600, getrlimit=tight.get, setrlimit=tight.set)
    assert ensure_fds(100, getrlimit=tight.get, setrlimit=tight.set) == 1024


def test_serve_with_more_hosts_than_descriptors_exits_at_once(tmp_path: Path) -> None:
    """The front used to hang without listening; now it says why and exits."""
    lines = ["local_execution = false"]
    for i in range(600):
        lines += ["[[hosts]]", 'kind = "v2"', f'name = "h{i}"', f'url = "http://127.0.0.1:{i + 1}"']
    config = tmp_path / "fleet.toml"
    config.write_text("\n".join(lines) + "\n")
    repo = tmp_path / "repo"
    repo.mkdir()

    def tight() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
        env={**os.environ, "GATEWAY_MODEL_REPO": str(repo), "GATEWAY_PORT": "1"},
        preexec_fn=tight,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "600 hosts need about" in done.stderr and "ulimit -n" in done.stderr


# -- DNS groups of thousands ----------------------------------------------------------------


def test_a_dns_group_of_5000_joins_without_stalling_and_prunes_when_it_shrinks() -> None:
    addresses = [f"10.{i // 250}.{i % 250}.1" for i in range(5000)]

    async def resolver(name: str, port: int) -> list[tuple[Any, ...]]:
        return [(0, 0, 0, "", (ip, port)) for ip in addresses]

    async def scenario() -> None:
        settings = Settings()
        router = Router(make_policy("round_robin"))
        pool = HostPool(router, 0.5)
        discovery = DnsDiscovery(
            pool, lambda spec: build_host(spec, settings), lambda entry: None, 10.0, resolver
        )
        group = parse_host({"kind": "v2", "dns": "fleet", "port": 8000}, settings)
        assert isinstance(group, DnsSpec)
        discovery.add(group)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        beat = asyncio.get_running_loop().create_task(ticker())
        await discovery.resolve(group)
        assert len(pool.hosts) == 5000 and len(router._ring) == 5000
        assert JOIN_BATCH <= 100 and ticks >= 40  # the loop turned while members joined
        del addresses[100:110]
        await discovery.resolve(group)  # a refresh: ten gone, nothing new
        assert len(pool.hosts) == 4990 and len(router._ring) == 4990
        assert all(router.targets.get(t.name) is t for t in router._ring.items)
        lease = router.try_acquire("m", "m/1", 1)
        assert lease is not None and lease.name in pool.hosts
        lease.finish(SUCCESS)
        beat.cancel()
        await pool.close()

    asyncio.run(scenario())


# -- /metrics and /admin/hosts at fleet sizes -----------------------------------------------


def _samples(families: list[Any]) -> dict[str, int]:
    return {f.name: len(f.samples) for f in families}


def test_metrics_aggregate_over_hosts_above_the_setting() -> None:
    router = fleet(150)
    for i, target in enumerate(router.targets.values()):
        for m in range(10):
            router._estimate(target, f"m{m}/1").observe(1, 0.001 * (i + 1))
    per_host = _samples(host_metric_families(router, 1000))
    assert per_host["gateway_host_up"] == 150
    assert per_host["gateway_host_latency_estimate_seconds"] == 150 * 11  # and m/1, ready
    aggregated = host_metric_families(router, 100)
    counts = _samples(aggregated)
    assert not any(name.startswith("gateway_host_") for name in counts)
    assert sum(counts.values()) < 100  # not per host: states, sums, 5 figures per model
    spread = next(f for f in aggregated if f.name == "gateway_hosts_latency_estimate_seconds")
    m0 = {s.labels["stat"]: s.value for s in spread.samples if s.labels["model"] == "m0/1"}
    assert m0["min"] == pytest.approx(0.001) and m0["max"] == pytest.approx(0.150)
    assert m0["hosts"] == 150
    states = next(f for f in aggregated if f.name == "gateway_hosts")
    assert {s.labels["state"]: s.value for s in states.samples}["up"] == 150


def test_host_table_pages() -> None:
    router = fleet(250)
    first = router.table(0, 100)
    assert len(first["hosts"]) == 100 and first["total"] == 250 and first["next_offset"] == 100
    last = router.table(200, 100)
    assert [h["name"] for h in last["hosts"]] == [f"h{i}" for i in range(200, 250)]
    assert last["next_offset"] is None
    assert len(router.table()["hosts"]) == 250


def test_admin_hosts_and_metrics_of_a_fleet_over_http(tmp_path: Path) -> None:
    lines = ["local_execution = false", "host_probe_interval_s = 30.0", "access_log = false"]
    lines += ["host_aperture_coordinate = 0.5"]
    for i in range(150):
        lines += ["[[hosts]]", 'kind = "v2"', f'name = "h{i}"', f'url = "http://127.0.0.1:{i + 1}"']
    config = tmp_path / "fleet.toml"
    config.write_text("\n".join(lines) + "\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    gw = start_gateway(repo, tmp_path, "--config", str(config))
    try:
        status, body = get(f"{gw.url}/admin/hosts")
        page = json.loads(body)
        assert status == 200 and len(page["hosts"]) == 100 and page["next_offset"] == 100
        aperture = page["aperture"]
        assert aperture["active"] and aperture["min_size"] == 12 and aperture["coordinate"] == 0.5
        page = json.loads(get(f"{gw.url}/admin/hosts?offset=100&limit=1000")[1])
        assert len(page["hosts"]) == 50 and page["next_offset"] is None
        assert get(f"{gw.url}/admin/hosts?limit=lots")[0] == 400
        assert get(f"{gw.url}/admin/hosts?limit=1001")[0] == 400
        metrics = get(f"{gw.url}/metrics")[1].decode()
        assert "gateway_hosts{" in metrics and "gateway_host_up{" not in metrics
    finally:
        gw.stop()


def test_metrics_placement_facts_do_not_walk_the_hosts() -> None:
    """``/metrics`` asks each model version where it runs on every scrape; a routed version
    answers from its local runtime alone, not by describing each of a thousand hosts."""
    hosts = [CountingHost(f"h{i}") for i in range(200)]
    described = Counter()

    class Described(CountingHost):
        def describe(self) -> dict[str, Any]:
            described[self.name] += 1
            return super().describe()

    entries = [HostEntry(Described(h.name)) for h in hosts]
    factory = RoutedFactory(Settings(local_execution=False), entries)
    source = SimpleNamespace(name="m")
    backend = RoutedBackend(factory, source, 1, ModelConfig(name="m"), None)  # type: ignore[arg-type]
    assert backend.placement() == {}
    assert not described
    assert len(backend.describe()["hosts"]) == 200 and len(described) == 200


# -- DNS refreshes that find nothing new ------------------------------------------------------


def test_a_dns_refresh_with_the_same_answer_does_no_work_unless_the_pool_changed() -> None:
    addresses = [f"10.0.{i // 250}.{i % 250}" for i in range(300)]

    async def resolver(name: str, port: int) -> list[tuple[Any, ...]]:
        return [(0, 0, 0, "", (ip, port)) for ip in addresses]

    async def scenario() -> None:
        settings = Settings()
        pool = HostPool(Router(make_policy("round_robin")), 0.5)
        built: list[str] = []

        def make_entry(spec: Any) -> Any:
            built.append(spec.name)
            return build_host(spec, settings)

        discovery = DnsDiscovery(pool, make_entry, lambda entry: None, 10.0, resolver)
        group = parse_host({"kind": "v2", "dns": "fleet", "port": 8000}, settings)
        assert isinstance(group, DnsSpec)
        discovery.add(group)
        scans = 0
        members = pool.members

        def counted(name: str) -> Any:
            nonlocal scans
            scans += 1
            return members(name)

        pool.members = counted  # type: ignore[method-assign]
        await discovery.resolve(group)
        assert len(pool.hosts) == 300 and len(built) == 300 and scans == 1
        addresses.reverse()  # the same addresses in another order: the same answer
        await discovery.resolve(group)
        assert scans == 1 and len(built) == 300  # not compared again
        gone = next(iter(pool.hosts.values()))
        pool.retire(gone)  # removed from elsewhere (the admin API): the next refresh sees it
        await discovery.resolve(group)
        assert scans == 2 and len(pool.hosts) == 300 and built[-1] == gone.name
        addresses.pop()
        await discovery.resolve(group)
        assert scans == 3 and len(pool.hosts) == 299
        await pool.close()

    asyncio.run(scenario())
