"""Where a loaded gateway's CPU goes, per thread (issue 21, ``mlp`` at 64 connections): the
event loop, the ORT runner threads (named ``ort-<model>-<n>`` in the OS), ORT's pool and the
rest, each per request; how busy the runners were; the mean batch reached. Baseline in the same
run: ``run_sync`` of that batch size in this process (the model as the gateway loads it), CPU
per item, ORT's threads included.

    .venv/bin/python bench/thread_split.py --model mlp --concurrency 64 --rounds 3
    .venv/bin/python bench/thread_split.py --quick --out /tmp/split.md   # smoke, ~15 s

Threads are read from ``/proc/<pid>/task`` before and after each perf_analyzer point (binary
HTTP, three windows): Linux only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import harness
from tree_ab import in_process_backend, in_process_point

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread group: the loop (the main thread), ORT runner threads, the rest
    (ORT's pool threads, the default executor, libuv's)."""
    groups = {"loop": 0.0, "runners": 0.0, "rest": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        cpu = (int(fields[11]) + int(fields[12])) * TICK_S
        group = "loop" if tid == str(pid) else "runners" if comm.startswith("ort-") else "rest"
        groups[group] += cpu
    return groups


def model_stats(address: str, model: str) -> tuple[int, int, float]:
    """(inferences, executions, seconds the backend spent running batches) so far."""
    with urllib.request.urlopen(f"http://{address}/v2/models/{model}/stats", timeout=10) as r:
        stats = json.loads(r.read())["model_stats"][0]
    busy_ns = sum(
        b[k]["ns"]
        for b in stats.get("batch_stats", [])
        for k in ("compute_input", "compute_infer", "compute_output")
    )
    return int(stats["inference_count"]), int(stats["execution_count"]), busy_ns / 1e9


def point(pa: str, gw: harness.Gateway, model: str, c: int, window_ms: int) -> dict[str, float]:
    cmd = [
        pa, "-m", model, "-u", gw.address, "-i", "http", "--concurrency-range", str(c),
        "-p", str(window_ms), "-s", "999", "-r", "3", "--input-data", "zero",
    ]  # fmt: skip
    cpu0, stats0, t0 = thread_cpu(gw.proc.pid), model_stats(gw.address, model), time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    cpu1, stats1, t1 = thread_cpu(gw.proc.pid), model_stats(gw.address, model), time.monotonic()
    if out.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed:\n{out.stdout[-600:]}\n{out.stderr[-600:]}")
    items, runs = stats1[0] - stats0[0], max(1, stats1[1] - stats0[1])
    wall = t1 - t0
    row = {f"{k}_ms": (cpu1[k] - cpu0[k]) / max(1, items) * 1e3 for k in cpu1}
    row.update(
        {
            "throughput": items / wall,
            "batch": items / runs,
            "runner_busy": (stats1[2] - stats0[2]) / wall,
            "gateway_ms": sum(cpu1[k] - cpu0[k] for k in cpu1) / max(1, items) * 1e3,
        }
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help="name:ENV=V,ENV=V [shipped:]")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--repo", type=Path, default=None, help="model repository")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="1 round, 1000 ms windows")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.window_ms = 1, 1000
    repo = (args.repo or harness.ROOT / "model_repo").resolve()
    variants = [
        (name, dict(item.split("=", 1) for item in envs.split(",") if item))
        for name, _, envs in (v.partition(":") for v in args.variants or ["shipped:"])
    ]
    pa = harness.perf_analyzer_path()
    spec = harness.read_model(repo, args.model)
    local = in_process_backend(repo, args.model)
    got: dict[str, list[dict[str, float]]] = {name: [] for name, _ in variants}
    baseline: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        gateways = {}
        for name, env in variants:
            gateways[name] = harness.start_gateway(
                repo, Path(tmp), "--log-level", "warning", tag=name, ready=(args.model,),
                detach=True,
                env={"GATEWAY_LOAD_MODELS": args.model, "GATEWAY_ACCESS_LOG": "false", **env},
            )  # fmt: skip
            stack.callback(gateways[name].stop)
        for r in range(args.rounds):
            for name, _ in variants[r % len(variants) :] + variants[: r % len(variants)]:
                p = point(pa, gateways[name], args.model, args.concurrency, args.window_ms)
                got[name].append(p)
                print(f"round {r + 1} {name}: {p}", flush=True)
            batch = max(1, round(statistics.median(p["batch"] for ps in got.values() for p in ps)))
            baseline.append(in_process_point(local, spec, batch, args.window_ms))
            print(f"round {r + 1} in-process batch {batch}: {baseline[-1]}", flush=True)
    markdown = report(args, variants, got, baseline)
    print(markdown)
    if args.out:
        harness.write_results(args.out, markdown, {**got, "in-process": baseline})


def report(
    args: argparse.Namespace,
    variants: list[tuple[str, dict[str, str]]],
    got: dict[str, list[dict[str, float]]],
    baseline: list[dict[str, float]],
) -> str:
    med = statistics.median
    ip_cpu = med(b["cpu_ms"] for b in baseline)
    ip_rate = med(b["throughput"] for b in baseline)
    rows = []
    for name, _ in variants:
        ps = got[name]
        rows.append(
            f"| {name} | {med(p['throughput'] for p in ps):.0f} "
            f"({med(p['throughput'] for p in ps) / ip_rate:.2f}x) | "
            f"{med(p['batch'] for p in ps):.1f} | {med(p['runner_busy'] for p in ps) * 100:.0f}% | "
            f"{med(p['loop_ms'] for p in ps):.3f} | {med(p['runners_ms'] for p in ps):.3f} | "
            f"{med(p['rest_ms'] for p in ps):.3f} | {med(p['gateway_ms'] for p in ps):.3f} "
            f"({med(p['gateway_ms'] for p in ps) / ip_cpu:.2f}x) |"
        )
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    described = "; ".join(f"`{n}`: {env or 'defaults'}" for n, env in variants)
    batch = med(b["batch"] for b in baseline)
    head = (
        "| variant | infer/s (vs in-process) | mean batch | runners busy | loop "
        "| ORT runner threads | ORT pool + rest | gateway total (vs in-process) |"
    )
    return f"""# Where the gateway's CPU goes (`{args.model}`, {args.concurrency} connections)

Command: `.venv/bin/python bench/thread_split.py {" ".join(sys.argv[1:])}`

2 shared CPUs, load average {load} at the end (1/5/15 min); perf_analyzer binary HTTP, three
{args.window_ms} ms windows per point, {args.rounds} rounds, medians. Variants: {described}.
In-process baseline (same rounds): `run_sync` of batch {batch:.0f}, {ip_rate:.0f} items/s,
{ip_cpu:.3f} ms CPU per item (ORT's threads included). CPU columns: ms per request; runners
busy: share of the wall time the backend was running a batch.

{head}
|---|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}
"""


if __name__ == "__main__":
    main()
