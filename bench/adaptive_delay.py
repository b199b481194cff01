"""The adaptive queue delay (issue 21) against Triton's fixed one, and against in-process ORT.

One run, alternating rounds so that both settings see the same machine load:

- in-process ``session.run`` of one item (sessions set up as the gateway sets them up: the same
  thread and spinning options), its p50 and p99;
- ``perf_analyzer`` (binary HTTP, one item per request) at concurrency 1 and 64 against two
  gateways on the same model repository: ``batching_delay = "adaptive"`` (the default) and
  ``"triton"`` (every short batch waits ``max_queue_delay``).

Goals (issue 21): at concurrency 1 the adaptive gateway's p50 <= in-process p50 + 0.3 ms; at
concurrency 64 its throughput >= 0.95x Triton's delay. Printed as differences and ratios, and
written to ``bench/results/adaptive_delay.md``.

    .venv/bin/python bench/adaptive_delay.py                 # ~3 minutes
    .venv/bin/python bench/adaptive_delay.py --quick --out /tmp/ad.md   # CI smoke, ~40 s
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np

MODES = ("adaptive", "triton")
TABLE_HEAD = (
    "| batching_delay | c=1 p50 ms | vs in-process p50 | c=1 server queue ms "
    "| c=1 server compute ms | c=64 infer/s | c=64 p99 ms | c=64 vs triton |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)
ROUND_HEAD = (
    "| round | in-process p50 ms | adaptive c=1 p50 | triton c=1 p50 "
    "| adaptive c=64 infer/s | triton c=64 infer/s | ratio |\n"
    "|---|---:|---:|---:|---:|---:|---:|"
)


def run_perf_analyzer(
    pa: str, address: str, model: str, concurrency: int, window_ms: int, workdir: Path
) -> dict[str, float]:
    """One perf_analyzer measurement: throughput, p50/p99 (ms), server queue and compute (ms)."""
    report = workdir / f"pa-{concurrency}-{time.monotonic_ns()}.csv"
    cmd = [
        pa, "-m", model, "-u", address, "-i", "http", "--concurrency-range",
        f"{concurrency}:{concurrency}", "-p", str(window_ms), "--max-trials", "6",
        "-s", "1000", "-f", str(report),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0 or not report.exists():
        raise RuntimeError(f"perf_analyzer failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    with report.open() as f:
        row = next(csv.DictReader(f))
    compute = sum(
        float(row[k])
        for k in ("Server Compute Input", "Server Compute Infer", "Server Compute Output")
    )
    return {
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1e3,
        "p99_ms": float(row["p99 latency"]) / 1e3,
        "queue_ms": float(row["Server Queue"]) / 1e3,
        "compute_ms": compute / 1e3,
    }


def in_process_latency(
    repo: Path, model_name: str, seconds: float, ort_defaults: bool = False
) -> dict[str, float]:
    """p50 / p99 of one-item ``session.run`` with the gateway's own session options (or ORT's
    defaults: one thread per core, spinning)."""
    import onnxruntime as ort

    from gateway.backends.onnxruntime import OnnxRuntimeFactory
    from gateway.repository.config import load_config
    from gateway.settings import Settings

    config = load_config(repo / model_name)
    options = OnnxRuntimeFactory(Settings()).session_options(config)
    if ort_defaults:
        options = ort.SessionOptions()
    session = ort.InferenceSession(
        str(repo / model_name / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    model = harness.read_model(repo, model_name)
    feeds = harness.sample_inputs(model, 1)
    outputs = list(model.outputs)
    for _ in range(20):
        session.run(outputs, feeds)
    durations = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        session.run(outputs, feeds)
        durations.append(time.perf_counter() - started)
    return {
        "p50_ms": statistics.median(durations) * 1e3,
        # perf_analyzer's server compute is a mean over its window: compare it with this.
        "mean_ms": statistics.mean(durations) * 1e3,
        "p99_ms": float(np.percentile(durations, 99)) * 1e3,
        "runs": len(durations),
    }


# ONNX Runtime thread wake-up: how one-item runs spaced like a lone client's requests (1 ms
# apart, the pool idle in between) fare under each spinning choice. The first is what the
# gateway set before its thread rule (ORT's thread count; spin while a run goes, stop when it
# returns); on 2 cores the gateway now runs "one intra-op thread" (README, "ONNX Runtime
# threads").
ORT_VARIANTS = {
    "ORT threads, spin during a run, stop after": {"threads": 0, "spin": "1", "stop": True},
    "ORT default: spin after a run too": {"threads": 0, "spin": "1", "stop": False},
    "never spin": {"threads": 0, "spin": "0", "stop": False},
    "one intra-op thread": {"threads": 1, "spin": "0", "stop": False},
}


def ort_wakeup(repo: Path, model_name: str, runs: int, rounds: int) -> dict[str, float]:
    """p50 ms of spaced one-item runs per spinning choice, the variants interleaved."""
    import onnxruntime as ort

    model = harness.read_model(repo, model_name)
    feeds = harness.sample_inputs(model, 1)
    outputs = list(model.outputs)
    sessions = {}
    for name, v in ORT_VARIANTS.items():
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if v["threads"]:
            options.intra_op_num_threads = int(v["threads"])  # type: ignore[call-overload]
        options.add_session_config_entry("session.intra_op.allow_spinning", str(v["spin"]))
        options.add_session_config_entry("session.inter_op.allow_spinning", str(v["spin"]))
        if v["stop"]:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        path = str(repo / model_name / "1" / "model.onnx")
        sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for _ in range(10):
            sessions[name].run(outputs, feeds)
    durations: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            for _ in range(runs):
                time.sleep(0.001)
                started = time.perf_counter()
                session.run(outputs, feeds)
                durations[name].append(time.perf_counter() - started)
    return {name: statistics.median(d) * 1e3 for name, d in durations.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer window")
    parser.add_argument("--in-process-s", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="1 round, short windows")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "adaptive_delay.md")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.window_ms, args.in_process_s = 1, 1000, 1.0
    pa = harness.perf_analyzer_path()
    repo = harness.ROOT / "model_repo"
    results: dict[str, Any] = {
        "in_process": [],
        "in_process_ort": [],
        **{m: {1: [], 64: []} for m in MODES},
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        gateways = {}
        try:
            for mode in MODES:
                gateways[mode] = harness.start_gateway(
                    repo,
                    workdir,
                    "--log-level",
                    "warning",
                    "--batching-delay",
                    mode,
                    env={"GATEWAY_LOAD_MODELS": args.model, "GATEWAY_ACCESS_LOG": "false"},
                    tag=mode,
                    ready=(args.model,),
                    detach=True,
                )
            for r in range(args.rounds):
                results.setdefault("ort_wakeup", []).append(
                    ort_wakeup(repo, args.model, 40 if args.quick else 100, 2)
                )
                for concurrency in (1, 64):
                    order = MODES if r % 2 == 0 else MODES[::-1]
                    for mode in order:
                        gw = gateways[mode]
                        if concurrency == 1:  # the baseline right before each c=1 run
                            results["in_process"].append(
                                in_process_latency(repo, args.model, args.in_process_s / 2)
                            )
                            results["in_process_ort"].append(
                                in_process_latency(repo, args.model, args.in_process_s / 4, True)
                            )
                        point = run_perf_analyzer(
                            pa, gw.address, args.model, concurrency, args.window_ms, workdir
                        )
                        results[mode][concurrency].append(point)
                        print(f"round {r + 1} c={concurrency} {mode}: {point}", flush=True)
        finally:
            for gw in gateways.values():
                gw.stop()

    def med(points: list[dict[str, float]], key: str) -> float:
        return statistics.median(p[key] for p in points)

    ip50 = med(results["in_process"], "p50_ms")
    ort50 = med(results["in_process_ort"], "p50_ms")
    rows = []
    for mode in MODES:
        c1, c64 = results[mode][1], results[mode][64]
        rows.append(
            f"| {mode} | {med(c1, 'p50_ms'):.2f} | {med(c1, 'p50_ms') - ip50:+.2f} | "
            f"{med(c1, 'queue_ms'):.2f} | {med(c1, 'compute_ms'):.2f} | "
            f"{med(c64, 'throughput'):.0f} | {med(c64, 'p99_ms'):.1f} | "
            f"{med(c64, 'throughput') / med(results['triton'][64], 'throughput'):.3f}x |"
        )
    per_round = []
    for r in range(args.rounds):
        a1, t1 = results["adaptive"][1][r], results["triton"][1][r]
        a64, t64 = results["adaptive"][64][r], results["triton"][64][r]
        in_process = results["in_process"][2 * r : 2 * r + 2]
        per_round.append(
            f"| {r + 1} | {med(in_process, 'p50_ms'):.2f} | {a1['p50_ms']:.2f} | "
            f"{t1['p50_ms']:.2f} | {a64['throughput']:.0f} | {t64['throughput']:.0f} | "
            f"{a64['throughput'] / t64['throughput']:.3f}x |"
        )
    adaptive_c1 = med(results["adaptive"][1], "p50_ms")
    tput_ratio = med(results["adaptive"][64], "throughput") / med(
        results["triton"][64], "throughput"
    )
    # The two modes run one after the other within a round: the per-round ratio cancels the
    # machine's drift between rounds, which moves either figure by tens of percent here.
    round_ratios = sorted(
        a["throughput"] / t["throughput"]
        for a, t in zip(results["adaptive"][64], results["triton"][64], strict=True)
    )
    imean = med(results["in_process"], "mean_ms")
    wake = results["ort_wakeup"]
    base = statistics.median(w["ORT threads, spin during a run, stop after"] for w in wake)
    wake_rows = []
    for name in ORT_VARIANTS:
        p50 = statistics.median(w[name] for w in wake)
        wake_rows.append(f"| {name} | {p50:.3f} | {p50 / base:.2f}x |")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    command = "bench/adaptive_delay.py " + " ".join(sys.argv[1:])
    markdown = f"""# Adaptive queue delay vs Triton's fixed delay (`{args.model}`)

Command: `.venv/bin/python {command.strip()}`

Machine: {harness.machine_info()["nproc"]} CPUs shared with other work (load generator on the
same cores; load average {load} at the end, 1/5/15 min); perf_analyzer, binary HTTP, one item
per request, {args.window_ms} ms windows;
{args.rounds} rounds, the two gateways alternating; medians over rounds.
In-process: one-item `session.run` back to back with the gateway's session options, measured
right before each c=1 run, p50 {ip50:.2f} ms (median of the slices), mean {imean:.2f} ms
(the figure to set beside "server compute", which perf_analyzer averages over its window);
with ORT's default
session options instead (one thread per core, spinning) {ort50:.2f} ms, so adaptive c=1 is
{adaptive_c1 - ort50:+.2f} ms over that.

{TABLE_HEAD}
{chr(10).join(rows)}

Goals: c=1 p50 <= in-process + 0.3 ms: adaptive **{adaptive_c1 - ip50:+.2f} ms**
(triton {med(results["triton"][1], "p50_ms") - ip50:+.2f} ms); c=64 throughput >= 0.95x:
**{tput_ratio:.3f}x** (ratio of the medians; per round, median
**{statistics.median(round_ratios):.3f}x**, from {round_ratios[0]:.3f}x to
{round_ratios[-1]:.3f}x).

ONNX Runtime thread wake-up, in-process: one-item `session.run` 1 ms apart (the pool idle in
between, as under a lone client), p50 per spinning choice, variants interleaved, medians over
rounds:

| ORT threads | p50 ms | vs the first |
|---|---:|---:|
{chr(10).join(wake_rows)}

Per round:

{ROUND_HEAD}
{chr(10).join(per_round)}
"""
    print(markdown)
    harness.write_results(args.out, markdown, results)


if __name__ == "__main__":
    main()
