"""Triton direct vs gateway -> Triton vs the gateway's own ONNX Runtime, in one run.

Starts a real ``tritonserver`` (the nvidia-pytriton build: python backend only, so models run
as python-backend ``model.py`` + ONNX Runtime there), a gateway whose only host is that Triton
(``TritonFactory``: it pushes the models), and a plain gateway (in-process ONNX Runtime), all on
free loopback ports. For each model, the same load hits each target in turn: ``--concurrency``
coroutines of ``tritonclient.http.aio`` sending batch-1 binary-tensor requests back to back for
``--duration-s``. "Triton direct" talks to the very model the gateway pushed.

    .venv/bin/python bench/triton.py --models simple,mlp --concurrency 16 --duration-s 10

Prints req/s, p50, p99, the gateway's added latency over Triton direct (p50, p99) and its
throughput ratio; writes ``bench/results/triton.md``. The client, both gateways and Triton share
this machine's CPUs, so read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.http.aio as httpaio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.testing.tritonserver import TritonServer  # noqa: E402
from tests.conftest import start_gateway  # noqa: E402

# model -> (input names, datatype, row shape, dtype, output name)
MODELS: dict[str, tuple[tuple[str, ...], str, tuple[int, ...], Any, str]] = {
    "simple": (("INPUT0", "INPUT1"), "INT32", (16,), np.int32, "OUTPUT0"),
    "mlp": (("INPUT",), "FP32", (1024,), np.float32, "PROBS"),
}
TARGETS = ("triton_direct", "gateway_triton", "gateway_ort")


@dataclass
class Result:
    model: str
    target: str
    requests: int
    errors: int
    elapsed_s: float
    latencies_s: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s

    def pct_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _inputs(model: str) -> list[Any]:
    names, datatype, shape, dtype, _ = MODELS[model]
    rng = np.random.default_rng(0)
    tensors = []
    for name in names:
        array = (rng.standard_normal((1, *shape)) * 10).astype(dtype)
        tensor = httpaio.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=True)
        tensors.append(tensor)
    return tensors


async def run_load(
    address: str, model: str, target: str, concurrency: int, duration_s: float, warmup_s: float
) -> Result:
    client = httpaio.InferenceServerClient(address, conn_limit=concurrency)
    inputs = _inputs(model)
    outputs = [httpaio.InferRequestedOutput(MODELS[model][4], binary_data=True)]
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop_at = time.perf_counter() + warmup_s + duration_s

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                await client.infer(model, inputs, outputs=outputs)
            except Exception:
                errors += measuring
                continue
            if measuring:
                latencies.append(time.perf_counter() - started)

    try:
        await client.infer(model, inputs, outputs=outputs)  # fail loudly before the load
        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await asyncio.sleep(warmup_s)
        measuring, begin = True, time.perf_counter()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - begin
    finally:
        await client.close()
    return Result(model, target, len(latencies), errors, elapsed, latencies)


def _gateway_config(
    path: Path, triton: TritonServer | None, models: list[str], probe_s: float
) -> Path:
    lines = [f"load_models = {json.dumps(models)}"]
    if triton is not None:
        lines += [
            f"host_probe_interval_s = {probe_s}",
            "[[hosts]]",
            'kind = "triton"',
            'name = "triton"',
            f'url = "{triton.http_url}"',
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def table(results: list[Result]) -> list[str]:
    lines = [
        "| model | target | req/s | p50 ms | p99 ms | errors | added p50 ms | added p99 ms "
        "| throughput vs Triton direct |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r.model, r.target): r for r in results}
    for r in results:
        base = by_key.get((r.model, "triton_direct"))
        if base is None or r.target == "triton_direct":
            added50 = added99 = ratio = "-"
        else:
            added50 = f"{r.pct_ms(0.5) - base.pct_ms(0.5):+.2f}"
            added99 = f"{r.pct_ms(0.99) - base.pct_ms(0.99):+.2f}"
            ratio = f"{r.rps / base.rps:.2f}x"
        lines.append(
            f"| {r.model} | {r.target} | {r.rps:.0f} | {r.pct_ms(0.5):.2f} | "
            f"{r.pct_ms(0.99):.2f} | {r.errors} | {added50} | {added99} | {ratio} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="simple,mlp")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the three targets")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "triton.md"))
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    for model in models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {sorted(MODELS)}")

    tmp = Path(tempfile.mkdtemp(prefix="bench-triton-"))
    repo = ROOT / "model_repo"
    results: list[Result] = []
    with TritonServer() as triton:
        gw_triton = start_gateway(
            repo, tmp, "--config", str(_gateway_config(tmp / "t.toml", triton, models, 2.0))
        )
        gw_ort = start_gateway(
            repo, tmp, "--config", str(_gateway_config(tmp / "o.toml", None, models, 2.0))
        )
        addresses = {
            "triton_direct": triton.http_address,
            "gateway_triton": gw_triton.address,
            "gateway_ort": gw_ort.address,
        }
        try:
            for model in models:
                for _ in range(args.rounds):
                    for target in TARGETS:
                        result = asyncio.run(
                            run_load(
                                addresses[target],
                                model,
                                target,
                                args.concurrency,
                                args.duration_s,
                                args.warmup_s,
                            )
                        )
                        print(
                            f"{model:7s} {target:15s} {result.rps:8.0f} req/s  "
                            f"p50 {result.pct_ms(0.5):6.2f} ms  p99 {result.pct_ms(0.99):6.2f} ms"
                            f"  errors {result.errors}",
                            flush=True,
                        )
                        results.append(result)
        finally:
            gw_triton.stop()
            gw_ort.stop()

    if args.rounds > 1:  # the median round per (model, target)
        merged = []
        for model in models:
            for target in TARGETS:
                runs = [r for r in results if (r.model, r.target) == (model, target)]
                merged.append(sorted(runs, key=lambda r: r.rps)[len(runs) // 2])
        results = merged
    lines = table(results)
    by_key = {(r.model, r.target): r for r in results}
    for model in models:
        base, via = by_key[(model, "triton_direct")], by_key[(model, "gateway_triton")]
        added_ms, ratio = via.pct_ms(0.5) - base.pct_ms(0.5), via.rps / base.rps
        met = "met" if added_ms <= 1.0 and ratio >= 0.8 else "NOT met"
        lines.append(
            f"\n`{model}`: gateway -> Triton adds {added_ms:+.2f} ms p50 and keeps "
            f"{ratio:.2f}x Triton-direct throughput: goal {met}."
        )
    print("\n".join(lines))
    command = "  ".join(["python bench/triton.py", *sys.argv[1:]]).replace("  ", " ")
    cpu = os.cpu_count()
    text = [
        "# Gateway -> Triton vs Triton direct vs the gateway's own ONNX Runtime",
        "",
        f"Command: `.venv/bin/{command}`",
        "",
        f"Machine: {platform.platform()}, {cpu} CPUs, Python {platform.python_version()}. "
        "Client, Triton and both gateways share these CPUs. Triton is the nvidia-pytriton build "
        "(python backend only): its models run as python-backend `model.py` + ONNX Runtime, "
        "pushed there by the gateway. Batch-1 binary requests from "
        f"{args.concurrency} `tritonclient.http.aio` coroutines, {args.duration_s:g} s per "
        f"target after {args.warmup_s:g} s warm-up"
        + (f", median of {args.rounds} rounds." if args.rounds > 1 else "."),
        "",
        "Goal: gateway -> Triton adds <= 1 ms p50 and keeps >= 0.8x Triton-direct throughput.",
        "",
        *lines,
        "",
    ]
    Path(args.output).write_text("\n".join(text))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
