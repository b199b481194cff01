"""What makes the gRPC latency tail: every request's latency, the cycle collector, and Triton.

perf_analyzer writes each request's send and answer times (``--profile-export-file``); from
them, per point: p50 / p99 / p99.9, the longest stretch in which no answer came at all (a
stall of the whole server, or of the machine), and how the slowest 1 % are spread: bunched
within 1 ms of each other (the server or the machine stopped for everyone) or alone (one
connection's requests served late). Each gateway runs under a small launcher that records
the cycle collector's passes (``gc.callbacks``): how many fell in the point and the longest.
Standalone ``tritonserver`` (``--triton``, the sweep's setup) runs beside the gateways, and
every point measures all targets one right after the other, in an order rotated per round.

    .venv/bin/python bench/grpc_tail.py before:PYTHONPATH=/tmp/base after: --triton \
        --concurrency 4,16 --rounds 3 --out bench/results/grpc_tail.md
    .venv/bin/python bench/grpc_tail.py now: --quick       # one round, 500 ms windows

A variant is ``name:ENV=V,ENV=V`` as in ``tree_ab.py``; ``PYTHONPATH=`` runs another tree.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import sweep
from tree_ab import output_bytes, parse_variant

# Runs ``gateway.cli`` with every collector pass appended to $GRPC_TAIL_GC_LOG:
# "generation start_s duration_ms collected"; and, once the data plane has started, a beat on
# the event loop every millisecond that appends each late one (the loop held up over
# $GRPC_TAIL_STALL_MS) to $GRPC_TAIL_STALL_LOG, if set: "start_s wall_ms loop_cpu_ms", the
# loop thread's own CPU time within the stretch telling a loop busy running something
# (CPU ~ wall) from one that was not running at all (the machine ran something else). To
# name what held a busy loop, the callbacks in NAMED are timed and each over 0.5 ms appended
# to $GRPC_TAIL_STALL_LOG.calls: "name start_s wall_ms cpu_ms".
NAMED = {  # what the loop runs per read and per batch, by the name a stall is given
    "REST read": "gateway.server.connections:ConnectionProtocol.data_received",
    "gRPC read": "gateway.grpc.http2:Connection.data_received",
    "batch answer": "gateway.batching.batcher:_answer",
    "gathered writes": "gateway.server.connections:GatheringTransport._flush",
}
STALL_MS = 2.0  # libuv's timers have 1 ms granularity: a beat may be 1 ms late on its own
LAUNCHER = """\
import gc, os, runpy, sys, time
_log = open(os.environ["GRPC_TAIL_GC_LOG"], "a", buffering=1)
_began = [0.0]
def _record(phase, info):
    if phase == "start":
        _began[0] = time.time()
    else:
        _log.write(f"{info['generation']} {_began[0]:.6f} "
                   f"{(time.time() - _began[0]) * 1e3:.3f} {info['collected']}\\n")
gc.callbacks.append(_record)

def _watch(loop, period_s=0.001):
    limit_s = float(os.environ["GRPC_TAIL_STALL_MS"]) / 1e3
    _stalls = open(os.environ["GRPC_TAIL_STALL_LOG"], "a", buffering=1)
    last = [time.perf_counter(), time.thread_time()]
    def beat():
        now, cpu = time.perf_counter(), time.thread_time()
        wall = now - last[0]
        if wall > period_s + limit_s:
            _stalls.write(f"{time.time() - wall:.6f} {wall * 1e3:.3f} "
                          f"{(cpu - last[1]) * 1e3:.3f}\\n")
        last[0], last[1] = now, cpu
        loop.call_later(period_s, beat)
    loop.call_later(period_s, beat)

def _named(label, target):
    import functools, importlib
    module, _, path = target.partition(":")
    owner = importlib.import_module(module)
    *parents, attr = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent, None)
    fn = getattr(owner, attr, None)
    if fn is None:
        return
    calls = open(os.environ["GRPC_TAIL_STALL_LOG"] + ".calls", "a", buffering=1)
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            took = time.perf_counter() - t0
            if took > 0.0005:
                calls.write(f"{label.replace(' ', '_')} {time.time() - took:.6f} "
                            f"{took * 1e3:.3f} {(time.thread_time() - c0) * 1e3:.3f}\\n")
    setattr(owner, attr, timed)

if os.environ.get("GRPC_TAIL_STALL_LOG"):
    import json as _json
    for _label, _target in _json.loads(os.environ["GRPC_TAIL_NAMED"]).items():
        _named(_label, _target)

import asyncio
from gateway.dataplane import DataPlane
_start = DataPlane.start
async def _started(self):
    await _start(self)
    if os.environ.get("GRPC_TAIL_STALL_LOG"):
        _watch(asyncio.get_running_loop())
DataPlane.start = _started
sys.argv = ["gateway", *sys.argv[1:]]
runpy.run_module("gateway.cli", run_name="__main__")
"""


def gc_passes(log: Path, start_s: float, end_s: float) -> list[tuple[int, float]]:
    """(generation, duration ms) of the passes that began within [start_s, end_s]."""
    if not log.exists():
        return []
    passes = []
    for line in log.read_text().splitlines():
        gen, began, took, _ = line.split()
        if start_s <= float(began) <= end_s:
            passes.append((int(gen), float(took)))
    return passes


def stalls(log: Path, start_s: float, end_s: float) -> list[tuple[float, float, str]]:
    """(wall ms, loop-thread CPU ms, name) of the loop's stalls that began within
    [start_s, end_s]; the name is that of the longest timed callback (``NAMED``) within it,
    "-" if none."""
    if not log.exists():
        return []
    calls_log = Path(f"{log}.calls")
    calls = []
    if calls_log.exists():
        for line in calls_log.read_text().splitlines():
            name, began, wall, _ = line.split()
            calls.append((float(began), float(wall), name.replace("_", " ")))
    found = []
    for line in log.read_text().splitlines():
        began, wall, cpu = line.split()
        if start_s <= float(began) <= end_s:
            ends = float(began) + float(wall) / 1e3
            inside = [c for c in calls if float(began) - 1e-3 <= c[0] <= ends]
            name = max(inside, key=lambda c: c[1])[2] if inside else "-"
            found.append((float(wall), float(cpu), name))
    return found


def tail_figures(export: Path) -> dict[str, float]:
    """Latency quantiles, the longest stretch without an answer and how bunched the slowest
    1 % are, from perf_analyzer's profile export (every request of the point's windows)."""
    with export.open() as f:
        data = json.load(f)
    pairs = sorted(
        (r["timestamp"], r["response_timestamps"][0])
        for exp in data["experiments"]
        for r in exp["requests"]
        if r["response_timestamps"]
    )
    latency = sorted((end - start) / 1e3 for start, end in pairs)
    n = len(latency)

    def q(p: float) -> float:
        return latency[min(n - 1, int(p * n))] / 1e3

    ends = sorted(end for _, end in pairs)
    gap = max((b - a for a, b in itertools.pairwise(ends)), default=0) / 1e6
    slow_ends = sorted(end for start, end in pairs if (end - start) / 1e6 >= q(0.99))
    near = [b - a <= 1e6 for a, b in itertools.pairwise(slow_ends)]  # within 1 ms
    bunched = sum(
        (i > 0 and near[i - 1]) or (i < len(near) and near[i]) for i in range(len(slow_ends))
    )
    return {
        "requests": float(n),
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
        "p999_ms": q(0.999),
        "max_gap_ms": gap,
        "bunched": bunched / max(1, len(slow_ends)),
        "start_s": pairs[0][0] / 1e9 if pairs else 0.0,
        "end_s": pairs[-1][1] / 1e9 if pairs else 0.0,
    }


def point(
    pa: str,
    model: str,
    url: str,
    protocol: str,
    c: int,
    window_ms: int,
    work: Path,
    shm_bytes: int = 0,
) -> dict[str, float]:
    """One perf_analyzer point (three windows) with every request's times exported; over
    HTTP with system shared memory when ``shm_bytes`` (the outputs' bytes) is set."""
    stamp = time.monotonic_ns()
    report, export = work / f"pa-{stamp}.csv", work / f"export-{stamp}.json"
    cmd = [
        pa, "-m", model, "-u", url, "-i", protocol, "--concurrency-range", str(c),
        "-p", str(window_ms), "-s", "999", "-r", "3", "--input-data", "zero",
        "--percentile=99", "-f", str(report), "--profile-export-file", str(export),
    ]  # fmt: skip
    if shm_bytes:
        cmd += ["--shared-memory", "system", "--output-shared-memory-size", str(shm_bytes)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if out.returncode != 0 or not report.exists() or not export.exists():
        raise RuntimeError(f"perf_analyzer failed:\n{out.stdout[-600:]}\n{out.stderr[-600:]}")
    with report.open() as f:
        row = next(csv.DictReader(f))
    figures = tail_figures(export)
    export.unlink()
    figures["throughput"] = float(row["Inferences/Second"])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="name:ENV=V,ENV=V (the first: baseline)")
    parser.add_argument("--model", default="simple")
    parser.add_argument(
        "--protocol",
        choices=["grpc", "http", "shm"],
        default="grpc",
        help="shm: HTTP with system shared memory for inputs and outputs",
    )
    parser.add_argument("--concurrency", default="4,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=2000)
    parser.add_argument("--triton", action="store_true", help="standalone tritonserver too")
    parser.add_argument("--quick", action="store_true", help="1 round, 500 ms windows")
    parser.add_argument(
        "--stalls",
        action="store_true",
        help=f"a 1 ms beat on each gateway's loop: stretches over {STALL_MS:g} ms it was held up",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    harness.exit_on_sigterm()  # the servers it starts stop with it
    if args.quick:
        args.rounds, args.window_ms = 1, 500
    levels = [int(c) for c in args.concurrency.split(",")]
    variants = [parse_variant(v) for v in args.variants]
    pa = harness.perf_analyzer_path()
    got: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        (work / "repo").mkdir()
        repo = sweep.build_repo(work / "repo", [args.model])
        shm_bytes = output_bytes(repo, args.model) if args.protocol == "shm" else 0
        protocol = "http" if args.protocol == "shm" else args.protocol
        launcher = work / "launch.py"
        launcher.write_text(LAUNCHER)
        targets: dict[str, tuple[str, Any, Path | None]] = {}  # name: (url, process, gc log)
        for name, env in variants:
            grpc_port = harness.free_port()
            log = work / f"gc-{name}.txt"
            gw = harness.start_gateway(
                repo, work, "--log-level", "warning", "--grpc-port", str(grpc_port), tag=name,
                ready=(args.model,), detach=True, launcher=[sys.executable, str(launcher)],
                env={"GATEWAY_LOAD_MODELS": args.model, "GATEWAY_ACCESS_LOG": "false",
                     "GRPC_TAIL_GC_LOG": str(log), **env,
                     **({"GRPC_TAIL_STALL_LOG": str(log.with_name(f"stall-{name}.txt")),
                         "GRPC_TAIL_STALL_MS": str(STALL_MS),
                         "GRPC_TAIL_NAMED": json.dumps(NAMED)} if args.stalls else {})},
            )  # fmt: skip
            stack.callback(gw.stop)
            url = f"127.0.0.1:{grpc_port}" if args.protocol == "grpc" else gw.address
            targets[name] = (url, gw.pid, log)
        if args.triton:
            from gateway.testing.tritonserver import TritonServer

            triton = stack.enter_context(TritonServer(startup_timeout_s=120.0))
            sweep.push_to_triton(triton.http_url, repo, [args.model])
            url = triton.grpc_url if args.protocol == "grpc" else triton.http_address
            targets["triton"] = (url, triton.pid, None)
        names = list(targets)
        for r in range(args.rounds):
            for c in levels:
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    url, pid, log = targets[name]
                    cpu = harness.process_cpu_s(pid) or 0.0
                    loop_cpu = harness.thread_cpu_s(pid).get(pid, 0.0)
                    p = point(pa, args.model, url, protocol, c, args.window_ms, work, shm_bytes)
                    if log is not None:  # Triton's python backend runs in other processes
                        used = (harness.process_cpu_s(pid) or 0.0) - cpu
                        p["cpu_ms"] = used / p["requests"] * 1e3
                        used = harness.thread_cpu_s(pid).get(pid, 0.0) - loop_cpu
                        p["loop_cpu_ms"] = used / p["requests"] * 1e3
                        passes = gc_passes(log, p["start_s"], p["end_s"])
                        p["gc_per_1000"] = len(passes) / p["requests"] * 1e3
                        p["gc_max_ms"] = max((took for _, took in passes), default=0.0)
                        if args.stalls:
                            held = stalls(log.with_name(f"stall-{name}.txt"), p["start_s"],
                                          p["end_s"])  # fmt: skip
                            busy = [(w, by) for w, cpu, by in held if cpu >= 0.5 * w]
                            p["stalls_per_1000"] = len(held) / p["requests"] * 1e3
                            p["busy_per_1000"] = len(busy) / p["requests"] * 1e3
                            p["stall_max_ms"] = max((w for w, _, _ in held), default=0.0)
                            p["busy_max_ms"] = max((w for w, _ in busy), default=0.0)
                            for _, by in busy:
                                p[f"busy: {by}"] = p.get(f"busy: {by}", 0.0) + 1
                    got.setdefault((name, c), []).append(p)
                    shown = ", ".join(f"{k} {v:.3g}" for k, v in p.items() if k[-2:] != "_s")
                    print(f"round {r + 1} c={c} {name}: {shown}", flush=True)
    print(render(args, variants, names, levels, got))
    if args.out:
        harness.write_results(
            args.out, render(args, variants, names, levels, got),
            {f"{n} c={c}": v for (n, c), v in got.items()},
        )  # fmt: skip


def render(
    args: argparse.Namespace,
    variants: list[tuple[str, dict[str, str]]],
    names: list[str],
    levels: list[int],
    got: dict[tuple[str, int], list[dict[str, float]]],
) -> str:
    base = names[0]
    rows = []
    for c in levels:
        for name in names:
            pts = got[(name, c)]
            med = {k: statistics.median(p[k] for p in pts) for k in pts[0] if ":" not in k}
            p99 = sorted(
                a["p99_ms"] / b["p99_ms"] for a, b in zip(pts, got[(base, c)], strict=True)
            )
            tput = sorted(
                a["throughput"] / b["throughput"] for a, b in zip(pts, got[(base, c)], strict=True)
            )
            gc_cols = (
                f"{med['gc_per_1000']:.2f} | {med['gc_max_ms']:.1f} | {med['cpu_ms']:.3f} | "
                f"{med['loop_cpu_ms']:.3f}"
                if "gc_per_1000" in med
                else "- | - | - | -"
            )
            rows.append(
                f"| {c} | {name} | {med['throughput']:.0f} | {med['p50_ms']:.2f} | "
                f"{med['p99_ms']:.2f} | {med['p999_ms']:.2f} | {med['max_gap_ms']:.1f} | "
                f"{med['bunched']:.0%} | {gc_cols} | "
                f"{statistics.median(tput):.2f}x ({tput[0]:.2f}-{tput[-1]:.2f}) | "
                f"{statistics.median(p99):.2f}x ({p99[0]:.2f}-{p99[-1]:.2f}) |"
            )
    stall_rows = []
    for c in levels:
        for name in names:
            pts = got[(name, c)]
            if "stalls_per_1000" not in pts[0]:
                continue
            med = {k: statistics.median(p[k] for p in pts) for k in pts[0] if ":" not in k}
            named: dict[str, float] = {}
            for p in pts:
                for k, v in p.items():
                    if k.startswith("busy: "):
                        named[k[6:]] = named.get(k[6:], 0.0) + v
            held_by = ", ".join(
                f"{k} {v:.0f}" for k, v in sorted(named.items(), key=lambda kv: -kv[1])
            )
            stall_rows.append(
                f"| {c} | {name} | {med['stalls_per_1000']:.2f} | {med['stall_max_ms']:.1f} | "
                f"{med['busy_per_1000']:.2f} | {med['busy_max_ms']:.1f} | {held_by or '-'} |"
            )
    stall_table = (
        f"""
Loop stalls (`--stalls`): a beat scheduled on each gateway's event loop every 1 ms; a stall
is a beat over {STALL_MS:g} ms late (the loop held up; the beat itself adds ~1,000 callbacks a
second). "Busy": the loop thread ran for at least half of it (our code, or uvloop's), the
rest: it was not running (the machine ran other threads). A busy stall is named by the
longest of the loop's reads, batch answers and gathered writes timed within it (each over
0.5 ms logged). Medians over rounds.

| c | target | stalls /1000 requests | longest ms | busy /1000 | longest busy ms \
| busy stalls by the longest callback in them (all rounds) |
|---:|---|---:|---:|---:|---:|---|
{chr(10).join(stall_rows)}
"""
        if stall_rows
        else ""
    )
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    described = "; ".join(f"`{n}`: {env or 'defaults'}" for n, env in variants)
    if args.triton:
        described += "; `triton`: standalone tritonserver (python backend, ONNX Runtime)"
    return f"""# Latency tail under perf_analyzer (`{args.model}`, {args.protocol})

Command: `.venv/bin/python bench/grpc_tail.py {" ".join(sys.argv[1:])}`

2 shared CPUs, load average {load} at the end (1/5/15 min); {args.rounds} rounds of three
{args.window_ms} ms windows per point, targets one after the other in rotated order. Variants:
{described}.
Medians over rounds; ratios to `{base}` taken per round (median and range). Quantiles from
every request perf_analyzer sent (its profile export); "no answer" is the longest stretch in
which no request completed; "bunched" the share of the slowest 1 % that completed within 1 ms
of another of them; gc: the gateway's collector passes per 1000 requests and the longest;
CPU per request: the gateway's process (ORT's threads included: `simple` spins) and its event
loop's thread alone (the front end's work), 10 ms ticks.

| c | target | infer/s | p50 ms | p99 ms | p99.9 ms | no answer ms | bunched | gc /1000 \
| gc max ms | CPU ms/request | loop thread | infer/s vs {base} | p99 vs {base} |
|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}
{stall_table}"""


if __name__ == "__main__":
    main()
