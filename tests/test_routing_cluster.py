"""A front gateway routing across three real worker gateways on loopback.

Workers are ``gateway serve`` processes; one sits behind a ``DelayProxy`` so it can be slowed
from outside; the front has ``local_execution = false`` and lists them as ``kind = "v2"`` hosts.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import models
from tests.conftest import GatewayProcess, start_gateway
from tests.delay_proxy import DelayProxy

BODY = {
    "inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": list(range(16))},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16},
    ]
}


@dataclass
class Cluster:
    workers: list[GatewayProcess]
    proxy: DelayProxy
    front: GatewayProcess
    repo: Path
    tmp: Path

    def hosts(self) -> dict[str, dict[str, Any]]:
        with urllib.request.urlopen(f"{self.front.url}/admin/hosts", timeout=5) as r:
            return {h["name"]: h for h in json.loads(r.read())["hosts"]}


def front_config(path: Path, addresses: list[str], **extra: Any) -> Path:
    lines = [
        "local_execution = false",
        'routing_policy = "latency"',
        "host_probe_interval_s = 0.2",
        "ejection_base_s = 1.0",
        "access_log = false",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    for i, address in enumerate(addresses):
        lines += ["[[hosts]]", f'name = "w{i}"', 'kind = "v2"', f'url = "{address}"']
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    repo = tmp_path_factory.mktemp("routing-repo")
    models.add_sub(repo, "simple")
    tmp = tmp_path_factory.mktemp("routing-logs")
    workers: list[GatewayProcess] = []
    proxy: DelayProxy | None = None
    front: GatewayProcess | None = None
    try:
        for _ in range(3):
            workers.append(start_gateway(repo, tmp, env={"GATEWAY_ACCESS_LOG": "false"}))
        proxy = DelayProxy(workers[2].port).start()
        addresses = [workers[0].address, workers[1].address, proxy.address]
        config = front_config(tmp / "front.toml", addresses)
        front = start_gateway(repo, tmp, "--config", str(config))
        yield Cluster(workers, proxy, front, repo, tmp)
    finally:
        if front is not None:
            front.stop()
        if proxy is not None:
            proxy.stop()
        for worker in workers:
            worker.stop(signal.SIGKILL)


@dataclass
class Load:
    sent: int = 0
    ok: int = 0
    lost: int = 0
    statuses: Counter[int] | None = None


async def drive(
    url: str,
    total: int,
    concurrency: int,
    timeout_us: int | None = None,
    after: int | None = None,
    action: Any = None,
) -> Load:
    """``total`` requests from ``concurrency`` workers; ``action()`` runs once ``after`` are
    answered. A request without an HTTP answer within 10 s counts as lost."""
    load = Load(statuses=Counter())
    body = json.loads(json.dumps(BODY))
    if timeout_us is not None:
        body["parameters"] = {"timeout": timeout_us}
    answered = 0
    fired = False

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal answered, fired
        while load.sent < total:
            load.sent += 1
            try:
                async with session.post(
                    f"{url}/v2/models/simple/infer", json=body, timeout=aiohttp.ClientTimeout(10)
                ) as response:
                    data = await response.json()
                    assert load.statuses is not None
                    load.statuses[response.status] += 1
                    if response.status == 200:
                        assert data["outputs"][0]["data"] == [i + 1 for i in range(16)]
                        load.ok += 1
            except (aiohttp.ClientError, TimeoutError):
                load.lost += 1
            answered += 1
            if action is not None and after is not None and answered >= after and not fired:
                fired = True
                action()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return load


def completed(cluster: Cluster) -> dict[str, int]:
    return {name: h["completed"] for name, h in cluster.hosts().items()}


async def test_requests_spread_across_workers(cluster: Cluster) -> None:
    before = completed(cluster)
    load = await drive(cluster.front.url, 120, 6)
    assert load.ok == 120, load.statuses
    after = completed(cluster)
    share = {n: after[n] - before[n] for n in after}
    assert all(count >= 8 for count in share.values()), share
    table = cluster.hosts()
    assert {h["state"] for h in table.values()} == {"up"}
    assert all(h["models"]["simple/1"]["ready"] for h in table.values())
    with urllib.request.urlopen(f"{cluster.front.url}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    for name, count in after.items():  # the same counters, scraped by Prometheus
        assert f'gateway_host_batches_total{{host="{name}",outcome="success"}} {count}.0' in metrics
        assert f'gateway_host_up{{host="{name}"}} 1.0' in metrics
    assert 'gateway_host_latency_estimate_seconds{host="w0",model="simple/1"}' in metrics


async def test_slow_worker_gets_a_smaller_share(cluster: Cluster) -> None:
    cluster.proxy.delay_s = 0.03
    try:
        before = completed(cluster)
        load = await drive(cluster.front.url, 240, 8)
        after = completed(cluster)
    finally:
        cluster.proxy.delay_s = 0.0
    assert load.ok == 240, load.statuses
    share = {n: after[n] - before[n] for n in after}
    assert share["w2"] < 0.5 * share["w0"] and share["w2"] < 0.5 * share["w1"], share
    assert share["w2"] < 0.15 * sum(share.values()), share


async def test_deadline_is_refused_fast_when_no_host_can_meet_it(cluster: Cluster) -> None:
    slow = DelayProxy(cluster.workers[0].port, delay_s=0.1).start()
    config = front_config(cluster.tmp / "slow-front.toml", [slow.address])
    front = start_gateway(cluster.repo, cluster.tmp, "--config", str(config))
    try:
        warm = await drive(front.url, 3, 1)
        assert warm.ok == 3
        async with aiohttp.ClientSession() as session:
            body = {**BODY, "parameters": {"timeout": 20_000}}  # 20 ms, host needs ~100 ms
            started = time.perf_counter()
            async with session.post(f"{front.url}/v2/models/simple/infer", json=body) as r:
                elapsed_s = time.perf_counter() - started
                assert r.status == 429, await r.text()
                assert int(r.headers["Retry-After"]) >= 1
                assert "deadline" in (await r.json())["error"]
            assert elapsed_s < 0.02  # refused before the 20 ms deadline, not after it
            body = {**BODY, "parameters": {"timeout": 5_000_000}}
            async with session.post(f"{front.url}/v2/models/simple/infer", json=body) as r:
                assert r.status == 200
    finally:
        front.stop()
        slow.stop()


async def test_killed_worker_is_ejected_and_every_request_answered(cluster: Cluster) -> None:
    victim = cluster.workers[1]
    load = await drive(
        cluster.front.url, 600, 8, after=150, action=lambda: victim.stop(signal.SIGKILL)
    )
    assert load.statuses is not None
    failed = load.sent - load.ok - load.lost
    print(f"sent={load.sent} ok={load.ok} failed={failed} lost={load.lost} {load.statuses}")
    assert load.lost == 0
    assert load.sent == 600
    assert failed <= 6, load.statuses  # retries on the other workers absorb the failure
    table = cluster.hosts()
    assert table["w1"]["state"] in ("ejected", "down"), table["w1"]
    before = completed(cluster)
    assert (await drive(cluster.front.url, 60, 4)).ok == 60
    after = completed(cluster)
    assert after["w1"] == before["w1"]
