"""Gateway variants (source trees or settings) under perf_analyzer, in rotated rounds.

Every variant is a gateway of its own, all started at once; each round measures every variant
at each concurrency, one right after the other, the order rotated per round. Per point:
throughput, p50, the mean batch (``/v2/models/<model>/stats`` before and after) and the
gateway's CPU time per request (its process, ORT threads included, which the machine's load
moves less than throughput). Ratios to the first variant are taken per round (the machine's
speed drifts by tens of percent between rounds), then the median and range over rounds.

    .venv/bin/python bench/tree_ab.py before:PYTHONPATH=/tmp/base after: --concurrency 1,64
    .venv/bin/python bench/tree_ab.py --quick --out /tmp/ab.md a: b:GATEWAY_INLINE_MAX_MS=0

A variant is ``name:ENV=V,ENV=V``; ``PYTHONPATH=`` runs another source tree (``git archive``
of a commit unpacked there).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import harness


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, envs = text.partition(":")
    return name, dict(item.split("=", 1) for item in envs.split(",") if item)


def counts(address: str, model: str) -> tuple[int, int]:
    """(inferences, executions) so far, from the statistics extension."""
    with urllib.request.urlopen(f"http://{address}/v2/models/{model}/stats", timeout=10) as r:
        stats = json.loads(r.read())["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def point(
    pa: str,
    gw: harness.Gateway,
    model: str,
    c: int,
    window_ms: int,
    work: Path,
    grpc_port: int = 0,
    streaming: bool = False,
    shm_bytes: int = 0,
) -> dict[str, float]:
    """One perf_analyzer point (binary HTTP, or gRPC on ``grpc_port``, unary or ``streaming``;
    over HTTP with system shared memory when ``shm_bytes`` (the outputs' bytes) is set; three
    windows) with batch size and CPU/request."""
    report = work / f"pa-{time.monotonic_ns()}.csv"
    url, protocol = (f"127.0.0.1:{grpc_port}", "grpc") if grpc_port else (gw.address, "http")
    cmd = [
        pa, "-m", model, "-u", url, "-i", protocol, "--concurrency-range", str(c),
        "-p", str(window_ms), "-s", "999", "-r", "3", "--input-data", "zero", "-f", str(report),
    ]  # fmt: skip
    if streaming:
        cmd.append("--streaming")
    if shm_bytes:
        cmd += ["--shared-memory", "system", "--output-shared-memory-size", str(shm_bytes)]
    before, cpu_before = counts(gw.address, model), harness.process_cpu_s(gw.proc.pid) or 0.0
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    after, cpu_after = counts(gw.address, model), harness.process_cpu_s(gw.proc.pid) or 0.0
    if out.returncode != 0 or not report.exists():
        raise RuntimeError(f"perf_analyzer failed:\n{out.stdout[-600:]}\n{out.stderr[-600:]}")
    with report.open() as f:
        row = next(csv.DictReader(f))
    items, runs = after[0] - before[0], after[1] - before[1]
    return {
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": int(row["p50 latency"]) / 1e3,
        "p99_ms": int(row["p99 latency"]) / 1e3,
        "batch": items / max(1, runs),
        "cpu_ms": (cpu_after - cpu_before) / max(1, items) * 1e3,
    }


def output_bytes(repo: Path, model: str) -> int:
    """Bytes of every output of one item, at 8 bytes an element (the widest of the shipped
    models): perf_analyzer's ``--output-shared-memory-size``."""
    text = (repo / model / "config.pbtxt").read_text()
    return sum(
        8 * math.prod(int(d) for d in re.findall(r"dims:\s*(-?\d+)", body))
        for body in re.findall(r"\boutput\s*\{([^}]*)\}", text)
    )


def in_process_backend(repo: Path, model: str) -> Any:
    """The model loaded as this tree's gateway loads it (its session options, its spinning
    decision), in this process, for the in-process rows."""
    import asyncio

    from gateway.backends.onnxruntime import OnnxRuntimeFactory
    from gateway.repository.local import LocalRepository
    from gateway.settings import Settings

    factory = OnnxRuntimeFactory(Settings())
    return asyncio.run(factory.load(LocalRepository(repo).source(model), 1))


class _OrtDefaults:
    """A plain ONNX Runtime session with ORT's own defaults (its pool spins), as
    ``bench/sweep.py``'s in-process baseline, with ``run_sync``'s call shape."""

    def __init__(self, repo: Path, model: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = str(repo / model / "1" / "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run_sync(self, feeds: Any, outputs: list[str]) -> Any:
        return self.session.run(outputs, feeds)


def in_process_point(
    backend: Any, model: harness.Model, batch: int, window_ms: int
) -> dict[str, float]:
    """Back-to-back ``run_sync`` of ``batch`` rows for about ``window_ms`` (at least 3 runs):
    items/s, the p50 run and the process's CPU per item (ORT threads included)."""
    feeds = harness.sample_inputs(model, batch)
    outputs = list(model.outputs)
    backend.run_sync(feeds, outputs)
    took: list[float] = []
    cpu, until = time.process_time(), time.perf_counter() + window_ms / 1e3
    while len(took) < 3 or time.perf_counter() < until:
        started = time.perf_counter()
        backend.run_sync(feeds, outputs)
        took.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu
    return {
        "throughput": batch * len(took) / sum(took),
        "p50_ms": statistics.median(took) * 1e3,
        "batch": float(batch),
        "cpu_ms": cpu / (batch * len(took)) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "variants",
        nargs="+",
        help="name:ENV=V,ENV=V (the first: baseline; REPO=path: that variant's model repository)",
    )
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--repo", type=Path, default=None, help="model repository")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window-ms", type=int, default=1500)
    parser.add_argument("--quick", action="store_true", help="1 round, 500 ms windows")
    parser.add_argument(
        "--in-process",
        default="",
        help="batch sizes (e.g. 1,8) also run in this process each round, as this tree loads "
        "the model: the gateway's ratios to them",
    )
    parser.add_argument(
        "--in-process-ort-defaults",
        action="store_true",
        help="the in-process rows from a session with ORT's defaults (spinning), as "
        "bench/sweep.py's baseline, instead of as this tree loads the model",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--protocol",
        choices=["http", "grpc", "grpc-stream", "shm"],
        default="http",
        help="shm: HTTP with system shared memory for inputs and outputs",
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.window_ms = 1, 500
    repo = (args.repo or harness.ROOT / "model_repo").resolve()
    levels = [int(c) for c in args.concurrency.split(",")]
    variants = [parse_variant(v) for v in args.variants]
    names = [name for name, _ in variants]
    pa = harness.perf_analyzer_path()
    got: dict[tuple[str, int], list[dict[str, float]]] = {}
    batches = [int(b) for b in args.in_process.split(",") if b]
    local: Any = None
    if batches:
        ort_defaults = args.in_process_ort_defaults
        local = (
            _OrtDefaults(repo, args.model) if ort_defaults else in_process_backend(repo, args.model)
        )
    spec = harness.read_model(repo, args.model)
    shm_bytes = output_bytes(repo, args.model) if args.protocol == "shm" else 0
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        gateways = {}
        grpc_ports = {}
        for name, env in variants:
            grpc_ports[name] = harness.free_port() if args.protocol.startswith("grpc") else 0
            grpc = ["--grpc-port", str(grpc_ports[name])] if grpc_ports[name] else []
            env = dict(env)  # REPO=path: this variant's own model repository
            own = Path(env.pop("REPO")).resolve() if "REPO" in env else repo
            gateways[name] = harness.start_gateway(
                own, work, "--log-level", "warning", *grpc, tag=name, ready=(args.model,),
                detach=True,
                env={"GATEWAY_LOAD_MODELS": args.model, "GATEWAY_ACCESS_LOG": "false", **env},
            )  # fmt: skip
            stack.callback(gateways[name].stop)
        for r in range(args.rounds):
            for b in batches:
                p = in_process_point(local, spec, b, args.window_ms)
                got.setdefault((IN_PROCESS, b), []).append(p)
                print(f"round {r + 1} in-process batch {b}: {p}", flush=True)
            for c in levels:
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    stream = args.protocol == "grpc-stream"
                    p = point(pa, gateways[name], args.model, c, args.window_ms, work,
                              grpc_ports[name], stream, shm_bytes)  # fmt: skip
                    got.setdefault((name, c), []).append(p)
                    print(f"round {r + 1} c={c} {name}: {p}", flush=True)
    base = names[0]
    rows = []
    for c in levels:
        for name in names:
            pts = got[(name, c)]
            ratios = sorted(
                a["throughput"] / b["throughput"] for a, b in zip(pts, got[(base, c)], strict=True)
            )
            med = {k: statistics.median(p[k] for p in pts) for k in pts[0]}
            rows.append(
                f"| {c} | {name} | {med['throughput']:.1f} | {med['p50_ms']:.2f} | "
                f"{med.get('p99_ms', float('nan')):.2f} | "
                f"{med['batch']:.1f} | {med['cpu_ms']:.3f} | {statistics.median(ratios):.3f}x "
                f"({ratios[0]:.3f}-{ratios[-1]:.3f}) |"
            )
    compared = in_process_rows(got, names, levels, batches)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    protocol = {
        "grpc": "gRPC",
        "grpc-stream": "gRPC streaming",
        "shm": "HTTP with system shared memory",
    }.get(args.protocol, "binary HTTP")
    described = "; ".join(f"`{n}`: {env or 'defaults'}" for n, env in variants)
    markdown = f"""# Gateway variants under perf_analyzer (`{args.model}`)

Command: `.venv/bin/python bench/tree_ab.py {" ".join(sys.argv[1:])}`

2 shared CPUs, load average {load} at the end (1/5/15 min); {protocol}, one item per request,
{args.rounds} rounds of three {args.window_ms} ms windows per point, variants one after the
other in rotated order. Variants: {described}. Medians over rounds; the throughput ratio to
`{base}` is taken per round (median and range).

| c | variant | infer/s | p50 ms | p99 ms | mean batch | gateway CPU ms/request | vs {base} |
|---:|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}
{compared}"""
    print(markdown)
    if args.out:
        harness.write_results(args.out, markdown, {f"{n} c={c}": v for (n, c), v in got.items()})


IN_PROCESS = "in-process"


def in_process_rows(
    got: dict[tuple[str, int], list[dict[str, float]]],
    names: list[str],
    levels: list[int],
    batches: list[int],
) -> str:
    """The in-process points and each variant's ratios to them, taken per round: throughput
    to the best in-process batch's items/s, and at c=1 the p50 to batch 1's run."""
    if not batches:
        return ""
    lines = [
        "",
        "In this process, as this tree loads the model (`run_sync`, back to back, each round;"
        " with `--in-process-ort-defaults`: a session with ORT's defaults):",
        "",
        "| batch | items/s | p50 ms | CPU ms/item |",
        "|---:|---:|---:|---:|",
    ]
    for b in batches:
        pts = got[(IN_PROCESS, b)]
        med = {k: statistics.median(p[k] for p in pts) for k in pts[0]}
        lines.append(
            f"| {b} | {med['throughput']:.1f} | {med['p50_ms']:.2f} | {med['cpu_ms']:.3f} |"
        )
    lines += [
        "",
        "| c | variant | infer/s / in-process best batch | p50 / in-process batch-1 p50 |",
        "|---:|---|---:|---:|",
    ]
    rounds = len(got[(IN_PROCESS, batches[0])])
    for c in levels:
        for name in names:
            best = [
                got[(name, c)][r]["throughput"]
                / max(got[(IN_PROCESS, b)][r]["throughput"] for b in batches)
                for r in range(rounds)
            ]
            p50 = "-"
            if c == 1 and 1 in batches:
                lat = sorted(
                    got[(name, c)][r]["p50_ms"] / got[(IN_PROCESS, 1)][r]["p50_ms"]
                    for r in range(rounds)
                )
                p50 = f"{statistics.median(lat):.2f}x ({lat[0]:.2f}-{lat[-1]:.2f})"
            best.sort()
            lines.append(
                f"| {c} | {name} | {statistics.median(best):.3f}x ({best[0]:.3f}-{best[-1]:.3f}) "
                f"| {p50} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
