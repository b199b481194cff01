"""Multi-host routing benchmark: routing policies in front of three worker gateways, one slow.

Run (from the repository root, with the project's virtual environment)::

    python bench/routing.py                        # ~1 minute with the defaults
    python bench/routing.py --duration-s 10 --concurrency 32 --slow-factor 3

One run starts three worker gateways (``gateway serve``, the tiny ``simple`` model) on loopback,
each behind a ``harness.DelayProxy`` that adds latency to its responses:
``--host-delay-ms`` for the two fast hosts (standing in for network + model time, so that the
hosts' latency is waiting, not CPU this machine lacks) and, for the third, a delay calibrated so
that it is ``--slow-factor`` times slower than the others at low load. Then, with the same fixed
closed-loop load (``--concurrency`` aiohttp coroutines for ``--duration-s`` after a warm-up):

1. a front gateway (``local_execution = false``) over all three hosts, once per policy
   (``round_robin``, ``least_request``, ``latency``);
2. the reference: a front over the two fast hosts alone (``latency`` policy);
3. a fault run: the ``latency`` front over the three hosts, one fast worker killed (SIGKILL)
   halfway through; sent / ok / failed / lost (no HTTP answer within 10 s) are counted.

It prints and writes ``bench/results/routing.md``: throughput, p50, p99, the slow host's share,
p99 ratios to round robin and to the two-fast-hosts reference. Goal: latency p99 <= 0.5x round
robin's and <= 1.3x the reference; lost = 0 in the fault run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from harness import ROOT, DelayProxy, Gateway, copy_repo, start_gateway

BODY = {
    "inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": list(range(16))},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16},
    ]
}


VICTIM = "fast1"  # the host the fault run kills


@dataclass
class Result:
    name: str
    duration_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    sent: int = 0
    ok: int = 0
    failed: int = 0
    lost: int = 0
    shares: dict[str, int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)  # of the failed requests
    in_flight_at_action: int | None = None  # the client's requests in flight at the kill
    victim_batches_at_action: int | None = None  # batches the front had on the victim then

    @property
    def throughput(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    def pct_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3) if self.latencies_s else float("nan")


async def drive(
    url: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    name: str,
    action_at_s: float | None = None,
    action: Callable[[], None] | None = None,
) -> Result:
    """Closed loop: ``concurrency`` coroutines, each one request at a time."""
    result = Result(name)
    payload = json.dumps(BODY).encode()
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s
    fired = False
    in_flight = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal fired, in_flight
        while (now := loop.time()) < stop_at:
            if action is not None and not fired and action_at_s is not None:
                if now >= measure_from + action_at_s:
                    fired = True
                    result.in_flight_at_action = in_flight
                    action()
            counted = now >= measure_from
            if counted:
                result.sent += 1
            t0 = time.perf_counter()
            in_flight += 1
            try:
                async with session.post(
                    f"{url}/v2/models/simple/infer",
                    data=payload,
                    headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(10),
                ) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                if counted:
                    result.lost += 1
                continue
            finally:
                in_flight -= 1
            if not counted:
                continue
            if status == 200:
                result.ok += 1
                result.latencies_s.append(time.perf_counter() - t0)
            else:
                result.failed += 1
                result.statuses[status] = result.statuses.get(status, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    result.duration_s = duration_s
    return result


def host_table(front: Gateway) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(f"{front.url}/admin/hosts", timeout=5) as r:
        return {h["name"]: h for h in json.loads(r.read())["hosts"]}


def front_config(path: Path, hosts: dict[str, str], policy: str) -> Path:
    lines = [
        "local_execution = false",
        f'routing_policy = "{policy}"',
        "host_probe_interval_s = 0.25",
        "ejection_base_s = 1.0",
        "access_log = false",
        'log_level = "warning"',
    ]
    for name, address in hosts.items():
        lines += ["[[hosts]]", f'name = "{name}"', 'kind = "v2"', f'url = "{address}"']
    path.write_text("\n".join(lines) + "\n")
    return path


async def calibrate(url: str, n: int = 200) -> float:
    result = await drive(url, 1, 1.0, 0.3, "calibrate")
    return float(np.median(result.latencies_s))


def run_front(
    repo: Path,
    tmp: Path,
    hosts: dict[str, str],
    policy: str,
    name: str,
    args: argparse.Namespace,
    action_at_s: float | None = None,
    action: Callable[[], None] | None = None,
    pythonpath: str | None = None,
) -> Result:
    config = front_config(tmp / f"{name}.toml", hosts, policy)
    env = {"GATEWAY_ACCESS_LOG": "false"}
    if pythonpath:  # the front's code from another tree (``--compare``)
        env["PYTHONPATH"] = pythonpath
    front = start_gateway(repo, tmp, "--config", str(config), env=env)
    victim_batches: list[int] = []

    def act() -> None:  # note what the front had on the victim, then do it
        assert action is not None
        victim_batches.append(host_table(front).get(VICTIM, {}).get("in_flight", 0))
        action()

    try:
        before = {n: h["completed"] for n, h in host_table(front).items()}
        result = asyncio.run(
            drive(
                front.url,
                args.concurrency,
                args.duration_s,
                args.warmup_s,
                name,
                action_at_s,
                act if action is not None else None,
            )
        )
        result.victim_batches_at_action = victim_batches[0] if victim_batches else None
        after = {n: h["completed"] for n, h in host_table(front).items()}
        result.shares = {n: after[n] - before.get(n, 0) for n in after}
    finally:
        front.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--host-delay-ms", type=float, default=50.0)
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--slow-factor", type=float, default=3.0)
    parser.add_argument("--policies", default="round_robin,least_request,latency")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "routing.md"))
    parser.add_argument(
        "--compare",
        help="another source tree: its front runs each policy and the reference too, "
        "interleaved with this tree's (the workers are this tree's)",
    )
    args = parser.parse_args()
    other = Path(args.compare).resolve() if args.compare else None
    tag = f" [{other.name}]" if other else ""

    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    repo = tmp / "repo"
    copy_repo(ROOT / "model_repo", repo, models=("simple",))
    workers: list[Gateway] = []
    proxies: list[DelayProxy] = []
    results: list[Result] = []
    try:
        env = {"GATEWAY_ACCESS_LOG": "false", "GATEWAY_LOG_LEVEL": "warning"}
        for _ in range(3):
            workers.append(start_gateway(repo, tmp, env=env))
        direct_s = asyncio.run(calibrate(workers[0].url))
        fast_delay_s = args.host_delay_ms / 1e3
        slow_delay_s = args.slow_factor * (direct_s + fast_delay_s) - direct_s
        for worker, delay_s in zip(
            workers, (fast_delay_s, fast_delay_s, slow_delay_s), strict=True
        ):
            proxies.append(DelayProxy(worker.port, delay_s).start())
        base_s = asyncio.run(calibrate(f"http://{proxies[0].address}"))
        slow_s = asyncio.run(calibrate(f"http://{proxies[2].address}"))
        print(
            f"direct {direct_s * 1e3:.2f} ms; fast host {base_s * 1e3:.2f} ms, slow host "
            f"{slow_s * 1e3:.2f} ms (x{slow_s / base_s:.2f})"
        )
        three = {
            "fast0": proxies[0].address,
            "fast1": proxies[1].address,
            "slow": proxies[2].address,
        }
        two = {"fast0": proxies[0].address, "fast1": proxies[1].address}
        runs = [(three, p, p) for p in args.policies.split(",")]
        runs.append((two, "latency", "two fast hosts (reference)"))
        for hosts, policy, name in runs:
            results.append(run_front(repo, tmp, hosts, policy, name, args))
            print_row(results[-1])
            if other is not None:
                results.append(
                    run_front(repo, tmp, hosts, policy, name + tag, args, pythonpath=str(other))
                )
                print_row(results[-1])
        victim = workers[1]
        results.append(
            run_front(
                repo,
                tmp,
                three,
                "latency",
                "latency, fast1 killed mid-run",
                args,
                action_at_s=args.duration_s / 2,
                action=lambda: victim.stop(signal.SIGKILL),
            )
        )
        print_row(results[-1])
    finally:
        for proxy in proxies:
            proxy.stop()
        for worker in workers:
            worker.stop(signal.SIGKILL)
    report = render(results, args, base_s, slow_s, tag)
    print(report)
    Path(args.out).write_text(report)
    return 0


def print_row(r: Result) -> None:
    print(
        f"{r.name:32s} {r.throughput:8.0f} req/s  p50 {r.pct_ms(50):7.2f} ms  "
        f"p99 {r.pct_ms(99):7.2f} ms  sent {r.sent} ok {r.ok} failed {r.failed} lost {r.lost} "
        f"shares {r.shares}",
        flush=True,
    )


def render(
    results: list[Result], args: argparse.Namespace, base_s: float, slow_s: float, tag: str = ""
) -> str:
    by = {r.name: r for r in results}
    rr = by.get("round_robin")  # absent when --policies leaves it out
    ref = by["two fast hosts (reference)"]
    lines = [
        "# Routing policies over three worker gateways, one slow",
        "",
        f"Command: `python bench/routing.py --concurrency {args.concurrency} "
        f"--duration-s {args.duration_s:g} --slow-factor {args.slow_factor:g} "
        f"--host-delay-ms {args.host_delay_ms:g}`  ",
        f"Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}  ",
        f"Setup: 3 worker `gateway serve` processes on loopback (model `simple`), each behind a "
        f"delay proxy adding latency to its responses ({args.host_delay_ms:g} ms for the fast "
        f"two): fast {base_s * 1e3:.2f} ms vs slow {slow_s * 1e3:.2f} ms "
        f"(x{slow_s / base_s:.2f}) at concurrency 1. A front gateway with "
        f"`local_execution = false` per policy; closed loop, {args.concurrency} concurrent "
        f"JSON requests for {args.duration_s:g} s after {args.warmup_s:g} s warm-up. All "
        "processes on one machine, so absolute numbers include CPU contention.",
        "",
        "| run | req/s | p50 ms | p99 ms | p99 / round_robin | p99 / two-fast | slow share "
        "| sent | ok | failed | lost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if tag and r.name.endswith(tag):  # the other tree's rows: against its own runs
            rr, ref = by.get("round_robin" + tag), by["two fast hosts (reference)" + tag]
        else:
            rr, ref = by.get("round_robin"), by["two fast hosts (reference)"]
        total = sum(r.shares.values()) or 1
        slow_share = r.shares.get("slow")
        to_rr = "-" if rr is None else f"{r.pct_ms(99) / rr.pct_ms(99):.2f}"
        lines.append(
            f"| {r.name} | {r.throughput:.0f} | {r.pct_ms(50):.2f} | {r.pct_ms(99):.2f} | "
            f"{to_rr} | {r.pct_ms(99) / ref.pct_ms(99):.2f} | "
            f"{'-' if slow_share is None else f'{slow_share / total:.1%}'} | "
            f"{r.sent} | {r.ok} | {r.failed} | {r.lost} |"
        )
    lat = by.get("latency")  # absent when --policies leaves it out (a quick run)
    fault = results[-1]
    if tag and lat is not None and rr is not None:
        lines += [
            "",
            f"p99 ratios, this tree against `{tag.strip(' []')}` (fronts interleaved, same "
            "workers):",
            "",
            "| tree | latency p99 / round_robin p99 | latency p99 / two-fast p99 |",
            "|---|---:|---:|",
        ]
        for label, suffix in (("this", ""), (tag.strip(" []"), tag)):
            mine = {n: by[n + suffix] for n in ("latency", "round_robin")}
            reference = by["two fast hosts (reference)" + suffix]
            lines.append(
                f"| {label} | {mine['latency'].pct_ms(99) / mine['round_robin'].pct_ms(99):.2f} "
                f"| {mine['latency'].pct_ms(99) / reference.pct_ms(99):.2f} |"
            )
    lines += [
        "",
        f"Fault run: `{VICTIM}` killed (SIGKILL) after {args.duration_s / 2:g} s; "
        f"{fault.in_flight_at_action} client requests were in flight then, "
        f"{fault.victim_batches_at_action} batches on `{VICTIM}`; failed {fault.failed} "
        f"(statuses {dict(sorted(fault.statuses.items())) or '-'}), lost {fault.lost}.",
    ]
    goals: list[tuple[str, bool | None]] = [
        (
            "latency p99 <= 0.5x round_robin p99",
            None if lat is None or rr is None else lat.pct_ms(99) <= 0.5 * rr.pct_ms(99),
        ),
        (
            "latency p99 <= 1.3x two-fast-hosts p99",
            None if lat is None else lat.pct_ms(99) <= 1.3 * ref.pct_ms(99),
        ),
        ("fault run: lost = 0", fault.lost == 0),
        (
            "fault run: failed <= requests in flight when the host died (client side: an upper "
            "bound on those that were on it)",
            fault.in_flight_at_action is not None and fault.failed <= fault.in_flight_at_action,
        ),
    ]
    lines += ["", "Goals:", ""]
    verdicts = {True: "met", False: "NOT met", None: "not judged (a policy not in --policies)"}
    lines += [f"- {verdicts[ok]}: {text}" for text, ok in goals]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
