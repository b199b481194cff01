"""Fleet benchmark: one front gateway routing across N fake v2 hosts on loopback.

Run (from the repository root, with the project's virtual environment)::

    python bench/fleet.py --quick                      # N = 10, 200; about 1 minute
    python bench/fleet.py                              # N = 10, 200, 500, 1000
    python bench/fleet.py --compare /work/main         # the same for another source tree too

One process (``--serve-hosts``, started by the bench) listens on N loopback ports as fake v2
hosts: a tiny asyncio HTTP/1.1 server answering readiness, the repository index (ten models,
READY) and binary-tensor inference after ``--host-delay-ms``, counting requests by kind and its
open connections. A front gateway (``gateway serve``, ``local_execution = false``, default
settings otherwise) has the N hosts as ``kind = "v2"`` tables and ten models (copies of
``simple``). Per N, with the front's code from this tree (and from ``--compare``):

1. routed batches/s: ``--clients`` closed-loop clients on one model for ``--duration-s``; also
   per CPU-second of the front (its /proc CPU time over the window);
2. paced: 50 requests/s open loop for ``--duration-s``, p50 / p99 / max latency (a probe-driven
   event-loop stall shows here);
3. a quiet window (``--quiet-s``, no traffic): probe requests/s the hosts see, then the
   connections the front keeps open per host (idle: nothing is in flight);
4. ``/metrics`` and ``/admin/hosts``: time (median of 5) and size.

Then, in-process: one routing decision (``Router.try_acquire``) on 10 and 1000 hosts, and a DNS
group of 5000 addresses joining, refreshing and shrinking, with the longest event-loop stall.
Ratios are against N = 10 of the same tree and, with ``--compare``, against that tree at the
same N, all measured in this run. Writes ``bench/results/fleet.md`` (+ ``.json``) and the plot
``bench/results/fleet.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

MODELS = 10  # the front's models (``--models``); the fake hosts list ten
ROWS_BYTES = 16 * 4  # one row of INT32[16]


# -- fake v2 hosts -----------------------------------------------------------------------------


class HostStats:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {"ready": 0, "index": 0, "model_ready": 0, "infer": 0}
        self.accepted = 0  # connections, ever
        self.open = 0
        self.busy = 0


def _index_body() -> bytes:
    return json.dumps(
        [{"name": f"simple_{i}", "version": "1", "state": "READY"} for i in range(MODELS)]
    ).encode()


def _infer_answer(model: str, rows: int) -> bytes:
    outputs = [
        {
            "name": name,
            "datatype": "INT32",
            "shape": [rows, 16],
            "parameters": {"binary_data_size": rows * ROWS_BYTES},
        }
        for name in ("OUTPUT0", "OUTPUT1")
    ]
    head = json.dumps({"model_name": model, "model_version": "1", "outputs": outputs}).encode()
    body = head + bytes(2 * rows * ROWS_BYTES)
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        + f"Inference-Header-Content-Length: {len(head)}\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_INDEX = _index_body()
INDEX = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    + f"Content-Length: {len(_INDEX)}\r\n\r\n".encode()
    + _INDEX
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
_HEADER_LENGTH = re.compile(rb"\ninference-header-content-length:\s*(\d+)", re.I)
_CONTENT_LENGTH = re.compile(rb"\ncontent-length:\s*(\d+)", re.I)


class FakeHost(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one request at a time per connection (as aiohttp sends them)."""

    def __init__(self, stats: HostStats, delay_s: float) -> None:
        self.stats = stats
        self.delay_s = delay_s
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.answers: dict[tuple[str, int], bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.stats.open += 1
        self.stats.accepted += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.open -= 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            match = _CONTENT_LENGTH.search(head)
            size = int(match.group(1)) if match else 0
            if len(self.buffer) < end + 4 + size:
                return
            body = self.buffer[end + 4 : end + 4 + size]
            self.buffer = self.buffer[end + 4 + size :]
            self.handle(head, body)

    def handle(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        line = head.split(b"\r\n", 1)[0].decode()
        method, path = line.split(" ")[:2]
        if path == "/v2/health/ready" or path == "/v2/health/live":
            self.stats.counts["ready"] += 1
            self.transport.write(OK_EMPTY)
        elif path == "/v2/repository/index":
            self.stats.counts["index"] += 1
            self.transport.write(INDEX)
        elif path.endswith("/ready"):
            self.stats.counts["model_ready"] += 1
            self.transport.write(OK_EMPTY)
        elif path.endswith("/infer") and method == "POST":
            self.stats.counts["infer"] += 1
            model = path.split("/")[3]
            match = _HEADER_LENGTH.search(head)
            header = json.loads(body[: int(match.group(1))] if match else body)
            rows = int(header["inputs"][0]["shape"][0])
            answer = self.answers.get((model, rows))
            if answer is None:
                answer = self.answers[(model, rows)] = _infer_answer(model, rows)
            self.stats.busy += 1
            asyncio.get_running_loop().call_later(self.delay_s, self._send, answer)
        else:
            self.transport.write(NOT_FOUND)

    def _send(self, answer: bytes) -> None:
        self.stats.busy -= 1
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(answer)


class Control(asyncio.Protocol):
    """``GET /stats`` on the control port: the counters as JSON."""

    def __init__(self, stats: HostStats) -> None:
        self.stats = stats

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data:
            return
        body = json.dumps(
            {
                **self.stats.counts,
                "open": self.stats.open,
                "busy": self.stats.busy,
                "accepted": self.stats.accepted,
            }
        ).encode()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        self.transport.close()


async def serve_hosts(count: int, delay_s: float) -> None:
    loop = asyncio.get_running_loop()
    stats = HostStats()
    ports = []
    for _ in range(count):
        server = await loop.create_server(
            lambda: FakeHost(stats, delay_s), "127.0.0.1", 0, backlog=128
        )
        ports.append(server.sockets[0].getsockname()[1])
    control = await loop.create_server(lambda: Control(stats), "127.0.0.1", 0)
    print(json.dumps({"control": control.sockets[0].getsockname()[1], "ports": ports}), flush=True)
    await asyncio.Event().wait()


# -- measuring a front ------------------------------------------------------------------------


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 1 << 20), hard))


def host_stats(control: int) -> dict[str, int]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{control}/stats", timeout=10) as r:
        data: dict[str, int] = json.loads(r.read())
    return data


def probe_requests(stats: dict[str, int]) -> int:
    return stats["ready"] + stats["index"] + stats["model_ready"]


def make_repo(dest: Path, count: int) -> Path:
    for i in range(count):
        target = dest / f"simple_{i}"
        shutil.copytree(ROOT / "model_repo" / "simple", target)
        config = target / "config.pbtxt"
        config.write_text(config.read_text().replace('name: "simple"', f'name: "simple_{i}"'))
    return dest


def front_config(path: Path, ports: list[int], extra: dict[str, Any]) -> Path:
    lines = ["local_execution = false", "access_log = false", 'log_level = "warning"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    for i, port in enumerate(ports):
        lines += ["[[hosts]]", f'name = "h{i}"', 'kind = "v2"', f'url = "http://127.0.0.1:{port}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def body() -> tuple[bytes, dict[str, str]]:
    payload = {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": list(range(16))},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16},
        ]
    }
    return json.dumps(payload).encode(), {"Content-Type": "application/json"}


async def closed_loop(url: str, clients: int, duration_s: float) -> tuple[int, int]:
    import aiohttp

    data, headers = body()
    ok = failed = 0
    stop_at = time.monotonic() + duration_s

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal ok, failed
        while time.monotonic() < stop_at:
            try:
                async with session.post(url, data=data, headers=headers) as response:
                    await response.read()
                    if response.status == 200:
                        ok += 1
                    else:
                        failed += 1
            except (aiohttp.ClientError, TimeoutError):
                failed += 1

    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return ok, failed


async def paced(url: str, rate: float, duration_s: float) -> tuple[list[float], int]:
    import aiohttp

    data, headers = body()
    latencies: list[float] = []
    failed = 0
    loop = asyncio.get_running_loop()

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal failed
        started = time.perf_counter()
        try:
            async with session.post(url, data=data, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    failed += 1
                    return
        except (aiohttp.ClientError, TimeoutError):
            failed += 1
            return
        latencies.append(time.perf_counter() - started)

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = []
        start = loop.time()
        for i in range(int(rate * duration_s)):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(one(session)))
        await asyncio.gather(*tasks)
    return latencies, failed


def timed_get(url: str, times: int = 5) -> tuple[float, int, bytes]:
    """Fastest of ``times`` GETs of ``url`` (the machine is shared: the fastest is the cost),
    the size and the last body."""
    import urllib.request

    spent, data = [], b""
    for _ in range(times):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
        spent.append(time.perf_counter() - started)
    return min(spent), len(data), data


def measure_front(
    harness: Any,
    tree: str,
    pythonpath: str,
    n: int,
    ports: list[int],
    control: int,
    repo: Path,
    tmp: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    config = front_config(tmp / f"front-{tree}-{n}.toml", ports[:n], {})
    env = {"PYTHONPATH": pythonpath, "GATEWAY_ACCESS_LOG": "false"}
    started = time.monotonic()
    try:
        front = harness.start_gateway(
            repo,
            tmp,
            "--config",
            str(config),
            env=env,
            tag=f"{tree}-{n}",
            ready=tuple(f"simple_{i}" for i in range(args.models)),
            ready_s=args.start_s,
            detach=True,
            launcher=(
                [sys.executable, str(ROOT / "bench" / "profiled.py"),
                 str(Path(args.profile).resolve() / f"front-{tree}-{n}.prof")]
                if args.profile
                else None
            ),
        )  # fmt: skip
    except RuntimeError as exc:  # its models did not load in time: a finding, not a crash
        print(f"{tree} at {n} hosts did not start: {exc}")
        front = None
    row: dict[str, Any] = {"tree": tree, "hosts": n, "start_s": time.monotonic() - started}
    if front is None:
        print(json.dumps(row | {"started": False}))
        return row | {"started": False}
    try:
        url = f"{front.url}/v2/models/simple_0/infer"
        time.sleep(1.0)  # first probes
        if args.profile:  # the measured window only (bench/profiled.py)
            front.proc.send_signal(signal.SIGUSR1)
        for _ in range(args.rounds):  # the best round: the machine's other work varies
            cpu0 = harness.process_cpu_s(front.pid)
            before = host_stats(control)
            t0 = time.monotonic()
            ok, failed = asyncio.run(closed_loop(url, args.clients, args.duration_s))
            elapsed = time.monotonic() - t0
            cpu = (harness.process_cpu_s(front.pid) or 0.0) - (cpu0 or 0.0)
            after = host_stats(control)
            batches = after["infer"] - before["infer"]  # what the hosts were sent
            if batches / elapsed > row.get("batches_s", 0.0):
                row.update(
                    connects_per_batch=(after["accepted"] - before["accepted"]) / max(1, batches),
                    req_s=ok / elapsed,
                    batches_s=batches / elapsed,
                    front_cpu=cpu / elapsed,
                    batches_per_cpu_s=batches / cpu if cpu else None,
                    load_failed=failed,
                )
        for _ in range(args.rounds):
            latencies, paced_failed = asyncio.run(paced(url, 50.0, args.duration_s))
            latencies.sort()
            p99_ms = harness.percentile(latencies, 99) * 1e3
            if p99_ms < row.get("paced_p99_ms", float("inf")):
                row.update(
                    paced_p50_ms=harness.percentile(latencies, 50) * 1e3,
                    paced_p99_ms=p99_ms,
                    paced_max_ms=latencies[-1] * 1e3,
                    paced_failed=paced_failed,
                )
        if args.profile:
            front.proc.send_signal(signal.SIGUSR2)
        before = host_stats(control)
        idle_cpu0 = harness.process_cpu_s(front.pid) or 0.0
        time.sleep(args.quiet_s)
        idle_cpu = (harness.process_cpu_s(front.pid) or 0.0) - idle_cpu0
        after = host_stats(control)
        row["probe_req_s"] = (probe_requests(after) - probe_requests(before)) / args.quiet_s
        # What the front spends with no traffic (probes, timers): under load it is part of
        # every CPU-second the batches are counted against.
        row["idle_cpu_ms_s"] = idle_cpu / args.quiet_s * 1e3
        row["idle_conns_per_host"] = (after["open"]) / n
        metrics_s, metrics_bytes, metrics = timed_get(f"{front.url}/metrics")
        series = sum(
            1 for line in metrics.decode().splitlines() if line and not line.startswith("#")
        )
        admin_s, admin_bytes, _ = timed_get(f"{front.url}/admin/hosts")
        row.update(
            metrics_ms=metrics_s * 1e3,
            metrics_kb=metrics_bytes / 1024,
            metrics_series=series,
            admin_ms=admin_s * 1e3,
            admin_kb=admin_bytes / 1024,
        )
    finally:
        front.stop()
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    return row


def interleaved(
    harness: Any,
    trees: dict[str, str],
    n: int,
    ports: list[int],
    control: int,
    repo: Path,
    tmp: Path,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Every tree's front up at once on the same N hosts, loaded in turn for ``--window-s``
    each, ``--interleave`` times (the order alternating): the machine's other work changes
    over minutes, so windows seconds apart see about the same of it. Per window: batches per
    front CPU-second, front CPU per request, requests per batch."""
    fronts: dict[str, Any] = {}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    try:
        for name, path in trees.items():
            config = front_config(tmp / f"ab-{name}-{n}.toml", ports[:n], {})
            fronts[name] = harness.start_gateway(
                repo,
                tmp,
                "--config",
                str(config),
                env={"PYTHONPATH": path, "GATEWAY_ACCESS_LOG": "false"},
                tag=f"ab-{name}-{n}",
                ready=tuple(f"simple_{i}" for i in range(args.models)),
                ready_s=args.start_s,
                detach=True,
            )
        time.sleep(1.0)  # first probes
        for front in fronts.values():  # warm each: connections open, estimates measured
            asyncio.run(closed_loop(f"{front.url}/v2/models/simple_0/infer", args.clients, 1.0))
        for i in range(args.interleave):
            order = list(fronts.items())
            for name, front in order if i % 2 == 0 else order[::-1]:
                url = f"{front.url}/v2/models/simple_0/infer"
                cpu0 = harness.process_cpu_s(front.pid) or 0.0
                before = host_stats(control)
                ok, _ = asyncio.run(closed_loop(url, args.clients, args.window_s))
                cpu = (harness.process_cpu_s(front.pid) or 0.0) - cpu0
                batches = host_stats(control)["infer"] - before["infer"]
                if cpu > 0 and ok and batches:
                    samples[name].append(
                        {
                            "batches_per_cpu_s": batches / cpu,
                            "cpu_us_per_request": cpu / ok * 1e6,
                            "requests_per_batch": ok / batches,
                            "front_cpu": cpu / args.window_s,
                        }
                    )
    finally:
        for front in fronts.values():
            front.stop()
    rows = []
    for name, got in samples.items():
        if not got:
            continue
        row: dict[str, Any] = {"tree": name, "hosts": n, "windows": len(got)}
        for key in got[0]:
            values = sorted(s[key] for s in got)
            row[key] = harness.percentile(values, 50)
            row[key + "_range"] = (values[0], values[-1])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_range")}))
    return rows


def render_interleaved(
    rows: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]
) -> str:
    trees = list(dict.fromkeys(r["tree"] for r in rows))
    lines = [
        "# Batches per front CPU-second, trees interleaved",
        "",
        f"Command: `python bench/fleet.py {' '.join(sys.argv[1:])}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {info['nproc']} CPUs "
        f"({info['cpu']}), load average at start {info['loadavg_at_start'][0]:.1f}, Python "
        f"{info['python']}  ",
        f"Setup: as `fleet.md` (N fake v2 hosts answering after {args.host_delay_ms:g} ms, a "
        f"front per tree with default settings and {args.models} model(s)), but every tree's "
        f"front runs at once and {args.clients} closed-loop JSON clients load them in turn, "
        f"{args.window_s:g} s each, {args.interleave} times, alternating the order; medians "
        "over the windows (range in brackets). The machine is shared: the ratios between trees "
        "are the figures to read.",
        "",
        "| tree | hosts | windows | batches per CPU-s | front CPU us per request | "
        "requests per batch | front CPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(r: dict[str, Any], key: str, digits: int) -> str:
        low, high = r[key + "_range"]
        return f"{fmt(r[key], digits)} ({fmt(low, digits)}-{fmt(high, digits)})"

    for r in rows:
        lines.append(
            f"| {r['tree']} | {r['hosts']} | {r['windows']} | "
            f"{cell(r, 'batches_per_cpu_s', 0)} | {cell(r, 'cpu_us_per_request', 0)} | "
            f"{cell(r, 'requests_per_batch', 2)} | {cell(r, 'front_cpu', 2)} |"
        )
    if len(trees) > 1:
        lines += ["", f"Ratios of `{trees[0]}` to `{trees[1]}` (medians):", ""]
        lines += ["| hosts | batches per CPU-s | front CPU per request |", "|---:|---:|---:|"]
        for r in rows:
            same = (b for b in rows if b["tree"] == trees[1] and b["hosts"] == r["hosts"])
            o = next(same, None)
            if r["tree"] == trees[0] and o is not None:
                lines.append(
                    f"| {r['hosts']} | {fmt(r['batches_per_cpu_s'] / o['batches_per_cpu_s'], 2)}"
                    f" | {fmt(r['cpu_us_per_request'] / o['cpu_us_per_request'], 2)} |"
                )
    return "\n".join(lines) + "\n"


# -- in-process micro-benchmarks ----------------------------------------------------------------

MICRO = r"""
import asyncio, json, random, sys, time
from gateway.routing import Router, make_policy, SUCCESS

def front_aperture():  # the router's aperture as a front builds it, where the tree has one
    try:
        from gateway.routing.aperture import Aperture
        from gateway.settings import Settings
    except ImportError:  # a tree before the aperture
        return {}
    s = Settings()
    return {"aperture": Aperture(s.host_aperture, s.host_aperture_load, 0.5)}

def decision_us(n, policy):
    router = Router(make_policy(policy, random.Random(1)), **front_aperture())
    for i in range(n):
        router.add_target(f"h{i}", capacity=16)
        router.set_ready(f"h{i}", "m/1", True)
    for _ in range(300):  # some hosts measured (a scan per decision costs ms at 1000 hosts)
        router.try_acquire("m", "m/1", 4).finish(SUCCESS)
    best = float("inf")
    for _ in range(21):  # CPU time of this thread: the machine's other work left out
        leases = []
        started = time.thread_time()
        for _ in range(100):
            leases.append(router.try_acquire("m", "m/1", 4, time.monotonic() + 10))
        best = min(best, (time.thread_time() - started) / 100)
        for lease in leases:
            lease.finish(SUCCESS)
    return best * 1e6

async def dns_stalls(count):
    import gc
    import gateway.backends.remote  # imported once by the first host built; not a refresh's
    from gateway.backends.hosts import build_host
    from gateway.routing.discovery import DnsDiscovery
    from gateway.routing.hosts import parse_host
    from gateway.routing.pool import HostPool
    from gateway.settings import Settings
    loop = asyncio.get_running_loop()
    addresses = [f"10.{i // 250}.{i % 250}.1" for i in range(count)]

    async def getaddrinfo(host, port, **kw):
        return [(0, 0, 0, "", (ip, port)) for ip in addresses]

    loop.getaddrinfo = getaddrinfo
    settings = Settings()
    router = Router(make_policy("round_robin"), **front_aperture())
    pool = HostPool(router, 0.5)
    discovery = DnsDiscovery(pool, lambda spec: build_host(spec, settings), lambda e: None, 10.0)
    group = parse_host({"kind": "v2", "dns": "fleet", "port": 8000}, settings)
    discovery.add(group)
    worst = [0.0]
    stop = False

    async def ticker():
        # CPU time of this thread between two turns: what the loop spent away from other
        # tasks, without the time a shared machine's scheduler took the CPU away.
        last = time.thread_time()
        while not stop:
            await asyncio.sleep(0)
            now = time.thread_time()
            if worst[0] >= 0:  # < 0: the gap just ended was not measured (gc.collect() below)
                worst[0] = max(worst[0], now - last)
            else:
                worst[0] = 0.0
            last = now

    out = {}
    beat = loop.create_task(ticker())
    for phase in ("join", "refresh", "shrink"):
        if phase == "shrink":
            del addresses[: count // 100]
        await asyncio.sleep(0.01)
        gc.collect()
        worst[0] = -1.0
        while worst[0] < 0:  # the ticker has turned once since
            await asyncio.sleep(0)
        started = time.perf_counter()
        await discovery.resolve(group)
        out[phase + "_s"] = time.perf_counter() - started
        await asyncio.sleep(0.01)
        out[phase + "_stall_ms"] = worst[0] * 1e3
    stop = True
    await beat
    out["members"] = len(pool.hosts)
    await pool.close()
    return out

def metrics_ms(hosts, models):
    from prometheus_client import CollectorRegistry, generate_latest
    from gateway.routing import report
    router = Router(make_policy("latency"))
    for i in range(hosts):
        target = router.add_target(f"h{i}")
        for m in range(models):
            router.set_ready(f"h{i}", f"m{m}/1", True)
            router._estimate(target, f"m{m}/1").observe(1, 0.01 + i * 1e-5)

    class Families:
        def collect(self):
            try:  # this tree: read from the router, aggregated above 100 hosts
                return report.host_metric_families(router, 100)
            except TypeError:  # before: from the admin table, per host always
                return report.host_metric_families(router.table())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families())
    best, size = float("inf"), 0
    for _ in range(5):  # CPU time, as the decisions: the machine's other work left out
        started = time.thread_time()
        size = len(generate_latest(registry))
        best = min(best, time.thread_time() - started)
    return best * 1e3, size / 1024

result = {f"{p}_{n}_us": decision_us(n, p) for p in ("latency", "round_robin") for n in (10, 1000)}
result["host_metrics_ms"], result["host_metrics_kb"] = metrics_ms(1000, 10)
result.update(asyncio.run(dns_stalls(5000)))

def forward_us(port):
    # The client's CPU per forwarded batch (V2Host.infer, 3 rows, 8 at once) against the
    # bench's fake hosts, which run in their own process: this process's CPU is the client's.
    import numpy as np
    import uvloop
    from gateway.backends.remote import V2Host

    async def main():
        host = V2Host("h", f"http://127.0.0.1:{port}")
        inputs = {"INPUT0": np.zeros((3, 16), np.int32), "INPUT1": np.ones((3, 16), np.int32)}

        async def worker(count):
            for _ in range(count):
                await host.infer("simple_0", 1, inputs, ["OUTPUT0", "OUTPUT1"], 5.0)

        await asyncio.gather(*(worker(25) for _ in range(8)))
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            await asyncio.gather(*(worker(125) for _ in range(8)))
            best = min(best, (time.process_time() - started) / 1000)
        await host.close()
        return best * 1e6

    return uvloop.run(main())  # the loop a front runs

if len(sys.argv) > 1:
    result["forward_us"] = forward_us(int(sys.argv[1]))
print(json.dumps(result))
"""


def micro(pythonpath: str, port: int | None = None) -> dict[str, float]:
    """The in-process figures of one tree; with ``port`` (a fake host), the forward's too."""
    env = {**os.environ, "PYTHONPATH": pythonpath}
    out = subprocess.run(  # not from ROOT: ``-c`` puts the working directory on the path first
        [sys.executable, "-c", MICRO, *([str(port)] if port else [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tempfile.gettempdir(),
    )
    if out.returncode != 0:
        raise RuntimeError(f"micro-benchmarks failed:\n{out.stderr[-3000:]}")
    data: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({k: round(v, 2) for k, v in data.items()}))
    return data


# -- report -----------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _cpu_per_req(row: dict[str, Any]) -> float:
    return float(row["front_cpu"]) / max(1e-9, float(row["req_s"]))


def render(
    rows: list[dict[str, Any]],
    micros: dict[str, dict[str, float]],
    args: argparse.Namespace,
    info: dict[str, Any],
) -> str:
    trees = list(micros)
    lines = [
        "# Routing across a fleet of hosts from one front gateway",
        "",
        f"Command: `python bench/fleet.py {' '.join(sys.argv[1:])}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {info['nproc']} CPUs "
        f"({info['cpu']}), load average at start {info['loadavg_at_start'][0]:.1f}, Python "
        f"{info['python']}  ",
        f"Setup: one process serving N fake v2 hosts on loopback ports (answers after "
        f"{args.host_delay_ms:g} ms), one front gateway (`local_execution = false`, default "
        f"settings otherwise) with the N hosts and {args.models} models; {args.clients} "
        f"closed-loop JSON clients on one model for {args.duration_s:g} s, then 50 req/s paced for "
        f"{args.duration_s:g} s, then {args.quiet_s:g} s without traffic. Bench, fake hosts and "
        "front share the machine's cores with other work (a shared machine: absolute figures "
        "are noisy, ratios within one run less so).",
        "",
        "| tree | hosts | req/s | batches/s | requests per batch | new connections per batch | "
        "front CPU | batches per CPU-s | front CPU us per request | paced p50 ms | "
        "paced p99 ms | paced max ms | probe req/s (idle) | front CPU ms/s (idle) | "
        "open conns per host (idle) | /metrics ms | /metrics KB | series | /admin/hosts ms | "
        "/admin/hosts KB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        "---:|---:|---:|",
    ]
    for r in rows:
        if not r.get("started", True):
            lines.append(
                f"| {r['tree']} | {r['hosts']} | did not start: its models were not ready after "
                f"{r['start_s']:.0f} s (readiness checks timed out) |" + " |" * 18
            )
            continue
        lines.append(
            f"| {r['tree']} | {r['hosts']} | {fmt(r['req_s'], 0)} | {fmt(r['batches_s'], 0)} | "
            f"{fmt(r['req_s'] / r['batches_s'] if r['batches_s'] else None, 2)} | "
            f"{fmt(r['connects_per_batch'], 2)} | {fmt(r['front_cpu'], 2)}"
            f" | {fmt(r['batches_per_cpu_s'], 0)} | "
            f"{fmt(r['front_cpu'] / r['req_s'] * 1e6 if r['req_s'] else None, 0)} | "
            f"{fmt(r['paced_p50_ms'])} | "
            f"{fmt(r['paced_p99_ms'])} | {fmt(r['paced_max_ms'])} | {fmt(r['probe_req_s'], 0)} | "
            f"{fmt(r.get('idle_cpu_ms_s'))} | "
            f"{fmt(r['idle_conns_per_host'], 2)} | {fmt(r['metrics_ms'])} | "
            f"{fmt(r['metrics_kb'])} | {r['metrics_series']} | {fmt(r['admin_ms'])} | "
            f"{fmt(r['admin_kb'])} |"
        )
    lines += ["", "Ratios to the same tree at its fewest hosts:", ""]
    lines += [
        "| tree | hosts | batches/s | batches per CPU-s | paced p99 |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [r for r in rows if r.get("started", True)]  # from here on, those that ran
    for r in rows:
        base = next((b for b in rows if b["tree"] == r["tree"]), r)  # its fewest hosts
        lines.append(
            f"| {r['tree']} | {r['hosts']} | {fmt(r['batches_s'] / base['batches_s'], 2)} | "
            f"{fmt((r['batches_per_cpu_s'] or 0) / (base['batches_per_cpu_s'] or 1), 2)} | "
            f"{fmt(r['paced_p99_ms'] / base['paced_p99_ms'], 2)} |"
        )
    if len(trees) > 1:
        lines += ["", f"Ratios of `{trees[0]}` to `{trees[1]}` at the same host count:", ""]
        lines += [
            "| hosts | batches/s | batches per CPU-s | front CPU per request | paced p99 | "
            "probe req/s | /metrics ms |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            if r["tree"] != trees[0]:
                continue
            o = next((b for b in rows if b["tree"] == trees[1] and b["hosts"] == r["hosts"]), None)
            if o is None:
                continue
            lines.append(
                f"| {r['hosts']} | {fmt(r['batches_s'] / o['batches_s'], 2)} | "
                f"{fmt((r['batches_per_cpu_s'] or 0) / (o['batches_per_cpu_s'] or 1), 2)} | "
                f"{fmt(_cpu_per_req(r) / _cpu_per_req(o), 2)} | "
                f"{fmt(r['paced_p99_ms'] / o['paced_p99_ms'], 2)} | "
                f"{fmt(r['probe_req_s'] / o['probe_req_s'] if o['probe_req_s'] else None, 2)} | "
                f"{fmt(r['metrics_ms'] / o['metrics_ms'], 2)} |"
            )
    lines += [
        "",
        "In-process: one routing decision (`Router.try_acquire` as a front builds the router, "
        "with its default aperture where the tree has one; CPU time, best of 21 x 100, "
        "the lease finished outside the timing) and a DNS group of 5000 addresses (join, "
        "refresh with no change, 1 % gone), with the longest event-loop stall: the most CPU "
        "time the loop spent between two turns of a ticker task (the machine's other work "
        "excluded); and the client's CPU per forwarded batch (`V2Host.infer` of 3 rows, 8 at "
        "once, against the fake hosts in their own process; best of 5 x 1000):",
        "",
        "| tree | latency 10 hosts us | latency 1000 hosts us | ratio | round_robin 10 us | "
        "round_robin 1000 us | ratio | DNS join s | join stall ms | refresh stall ms | shrink "
        "stall ms | host /metrics families, 1000 hosts x 10 models: CPU ms | KB | "
        "forward client CPU us |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tree, m in micros.items():
        lines.append(
            f"| {tree} | {fmt(m['latency_10_us'])} | {fmt(m['latency_1000_us'])} | "
            f"{fmt(m['latency_1000_us'] / m['latency_10_us'], 2)} | "
            f"{fmt(m['round_robin_10_us'])} | {fmt(m['round_robin_1000_us'])} | "
            f"{fmt(m['round_robin_1000_us'] / m['round_robin_10_us'], 2)} | "
            f"{fmt(m['join_s'], 2)} | {fmt(m['join_stall_ms'])} | {fmt(m['refresh_stall_ms'])} | "
            f"{fmt(m['shrink_stall_ms'])} | {fmt(m['host_metrics_ms'])} | "
            f"{fmt(m['host_metrics_kb'])} | {fmt(m.get('forward_us'), 0)} |"
        )
    ours = [r for r in rows if r["tree"] == trees[0]]
    big = max(ours, key=lambda r: r["hosts"])
    m = micros[trees[0]]
    goals = [
        (
            "decision <= 20 us at 1000 hosts and <= 2x the 10-host cost",
            m["latency_1000_us"] <= 20 and m["latency_1000_us"] <= 2 * m["latency_10_us"],
        ),
        (
            f">= 1,000 routed batches per front CPU-second at {big['hosts']} hosts",
            (big["batches_per_cpu_s"] or 0) >= 1000,
        ),
        (f"paced 50 req/s p99 <= 10 ms at {big['hosts']} hosts", big["paced_p99_ms"] <= 10),
        (f"probe traffic <= 200 req/s at {big['hosts']} hosts", big["probe_req_s"] <= 200),
        (
            f"<= 1.1 open connections per host when idle at {big['hosts']} hosts",
            big["idle_conns_per_host"] <= 1.1,
        ),
        (
            f"/metrics <= 20 ms and <= 100 KB at {big['hosts']} hosts x {args.models} models",
            big["metrics_ms"] <= 20 and big["metrics_kb"] <= 100,
        ),
        (
            "host families of /metrics at 1000 hosts x 10 models <= 20 ms and <= 100 KB "
            "(in-process)",
            m["host_metrics_ms"] <= 20 and m["host_metrics_kb"] <= 100,
        ),
        (
            "DNS group of 5000: no event-loop stall over 10 ms (refresh)",
            m["refresh_stall_ms"] <= 10,
        ),
    ]
    lines += [
        "",
        "New connections per batch (probes' included): traffic spread over hundreds of hosts "
        "rarely finds an idle keep-alive connection to the host it picked (a host gets a batch "
        "every few seconds; gateways close idle connections after 5 s), so without an aperture "
        "most batches pay a TCP connect. With one (a tree that has `host_aperture`), a front "
        "keeps its batches on a load-sized subset of the hosts and reuses its connections; "
        "what is left is mostly probes of the hosts outside it (a new connection each, every "
        "`host_probe_idle_interval_s`).",
    ]
    lines += ["", "Goals (issue 25):", ""]
    lines += [f"- {'met' if ok else 'NOT met'}: {text}" for text, ok in goals]
    lines += ["", "![fleet](fleet.png)"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out: Path) -> bool:
    """The figures per host count as a PNG; False where matplotlib (the ``bench`` extra) is
    missing, as in CI's bench smoke."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    rows = [r for r in rows if r.get("started", True)]
    panels = [
        ("batches_s", "routed batches/s"),
        ("paced_p99_ms", "paced 50 req/s p99 (ms)"),
        ("probe_req_s", "probe req/s (idle)"),
        ("metrics_ms", "/metrics (ms)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for tree in dict.fromkeys(r["tree"] for r in rows):
            points = [(r["hosts"], r[key]) for r in rows if r["tree"] == tree]
            ax.plot(*zip(*points, strict=True), marker="o", label=tree)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("hosts")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve-hosts", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hosts", default="10,200,500,1000")
    parser.add_argument("--quick", action="store_true", help="hosts 10 and 200, shorter windows")
    parser.add_argument("--compare", help="another source tree to measure the same way")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="load and paced rounds; the best")
    parser.add_argument("--models", type=int, default=MODELS, help="models on the front, 1..10")
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--quiet-s", type=float, default=5.0)
    parser.add_argument("--host-delay-ms", type=float, default=1.0)
    parser.add_argument("--start-s", type=float, default=90.0, help="longest wait for a front")
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        help="only compare batches per CPU-second: all trees' fronts up at once, loaded in "
        "turn this many times (see interleaved())",
    )
    parser.add_argument("--window-s", type=float, default=2.0, help="one --interleave window")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fleet.md"))
    parser.add_argument(
        "--profile",
        help="a folder: profile each front under load (cProfile), front-<tree>-<N>.prof there",
    )
    args = parser.parse_args()
    raise_fd_limit()
    if args.serve_hosts:
        asyncio.run(serve_hosts(args.serve_hosts, args.host_delay_ms / 1e3))
        return 0
    if args.quick:
        args.hosts, args.duration_s, args.quiet_s = "10,200", min(args.duration_s, 3.0), 5.0
        args.rounds = 1
    args.hosts = [int(n) for n in str(args.hosts).split(",")]
    import harness

    trees = {"this": str(ROOT)}
    if args.compare:
        trees[Path(args.compare).name or "compare"] = str(Path(args.compare).resolve())
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    repo = make_repo(tmp / "repo", args.models)
    info = harness.machine_info()
    hosts = subprocess.Popen(
        [sys.executable, __file__, "--serve-hosts", str(max(args.hosts)),
         "--host-delay-ms", str(args.host_delay_ms)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    micros: dict[str, dict[str, float]] = {}
    try:
        assert hosts.stdout is not None
        ready = json.loads(hosts.stdout.readline())
        ports, control = ready["ports"], ready["control"]
        if args.interleave:
            ab = [
                row
                for n in args.hosts
                for row in interleaved(harness, trees, n, ports, control, repo, tmp, args)
            ]
            report = render_interleaved(ab, args, info)
            print(report)
            harness.write_results(Path(args.out), report, {"rows": ab, "machine": info})
            return 0
        for name, path in trees.items():
            micros[name] = micro(path, ports[0])
        for n in args.hosts:
            for name, path in trees.items():
                rows.append(measure_front(harness, name, path, n, ports, control, repo, tmp, args))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(hosts.pid, signal.SIGTERM)
        hosts.wait(10)
    rows.sort(key=lambda r: (list(trees).index(r["tree"]), r["hosts"]))
    report = render(rows, micros, args, info)
    print(report)
    out = Path(args.out)
    harness.write_results(out, report, {"rows": rows, "micro": micros, "machine": info})
    if not plot(rows, out.with_suffix(".png")):
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
