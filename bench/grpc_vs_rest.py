"""gRPC vs REST JSON vs REST binary against one gateway, in one run.

Starts ``gateway serve`` (HTTP and gRPC) on free loopback ports, then for each model and each
front end runs ``--concurrency`` coroutines of ``tritonclient`` (``grpc.aio`` / ``http.aio``)
sending batch-1 requests back to back for ``--duration-s``. Prints requests/s, p50 and p99
latency and the ratios against REST JSON, and writes a Markdown table.

    .venv/bin/python bench/grpc_vs_rest.py --duration-s 10 --concurrency 16

The client runs on the same machine (one Python event loop); on a small box it competes with the
gateway for CPU, so read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcaio
import tritonclient.http.aio as httpaio
from harness import ROOT, free_port, process_cpu_s, start_gateway

MODES = ("rest_json", "rest_binary", "grpc")

# model -> (input name, datatype, row shape, dtype, output name)
MODELS: dict[str, tuple[str, str, tuple[int, ...], Any, str]] = {
    "simple": ("INPUT0", "INT32", (16,), np.int32, "OUTPUT0"),
    "mlp": ("INPUT", "FP32", (1024,), np.float32, "PROBS"),
}


@dataclass
class Result:
    model: str
    mode: str
    requests: int
    errors: int
    elapsed_s: float
    latencies_s: list[float]
    server_cpu_us: float | None = None  # gateway CPU time per request, warm-up included

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3) if self.latencies_s else 0.0


def _inputs(module: Any, model: str, binary: bool | None) -> tuple[list[Any], list[Any]]:
    name, datatype, row, dtype, output = MODELS[model]
    rng = np.random.default_rng(0)
    data = rng.standard_normal((1, *row)).astype(dtype) if dtype == np.float32 else None
    if data is None:
        data = rng.integers(-100, 100, (1, *row), dtype=dtype)
    inputs = []
    names = [name] if model != "simple" else ["INPUT0", "INPUT1"]
    for n in names:
        tensor = module.InferInput(n, [1, *row], datatype)
        if binary is None:
            tensor.set_data_from_numpy(data)
        else:
            tensor.set_data_from_numpy(data, binary_data=binary)
        inputs.append(tensor)
    if binary is None:
        outputs = [module.InferRequestedOutput(output)]
    else:
        outputs = [module.InferRequestedOutput(output, binary_data=binary)]
    return inputs, outputs


async def _run(
    model: str,
    mode: str,
    send: Callable[[], Awaitable[Any]],
    server_pid: int,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
) -> Result:
    latencies: list[float] = []
    errors = sent = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def worker() -> None:
        nonlocal errors, sent
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            sent += 1
            try:
                await send()
            except Exception:
                errors += 1
                continue
            if t0 >= measure_from:
                latencies.append(time.perf_counter() - t0)

    cpu_before = process_cpu_s(server_pid)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - measure_from
    cpu_after = process_cpu_s(server_pid)
    result = Result(model, mode, len(latencies), errors, elapsed, latencies)
    if cpu_before is not None and cpu_after is not None and sent:
        result.server_cpu_us = (cpu_after - cpu_before) / sent * 1e6
    return result


async def bench(
    http_url: str, grpc_url: str, server_pid: int, models: list[str], args: argparse.Namespace
) -> list[Result]:
    results: list[Result] = []
    for model in models:
        for mode in MODES:
            if mode == "grpc":
                client: Any = grpcaio.InferenceServerClient(grpc_url)
                inputs, outputs = _inputs(grpcaio, model, None)
            else:
                client = httpaio.InferenceServerClient(http_url, conn_limit=args.concurrency)
                inputs, outputs = _inputs(httpaio, model, mode == "rest_binary")
            output_name = MODELS[model][4]

            async def send(
                c: Any = client, m: str = model, i: Any = inputs, o: Any = outputs
            ) -> Any:
                return await c.infer(m, i, outputs=o)

            try:
                first = await send()
                assert first.as_numpy(output_name) is not None
                result = await _run(
                    model, mode, send, server_pid, args.concurrency, args.duration_s, args.warmup_s
                )
            finally:
                await client.close()
            results.append(result)
            print(
                f"{model:8s} {mode:12s} {result.rps:9.1f} req/s  p50 "
                f"{result.percentile_ms(50):7.2f} ms  p99 {result.percentile_ms(99):7.2f} ms  "
                f"server CPU {result.server_cpu_us or 0:6.0f} us/req  errors {result.errors}",
                flush=True,
            )
    return results


def table(results: list[Result]) -> str:
    lines = [
        "| model | front end | req/s | p50 ms | p99 ms | gateway CPU us/req "
        "| req/s vs REST JSON | p50 vs REST JSON | CPU/req vs REST JSON |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r.model: r for r in results if r.mode == "rest_json"}
    for r in results:
        b = base[r.model]
        p50 = r.percentile_ms(50)
        cpu, base_cpu = r.server_cpu_us, b.server_cpu_us
        cpu_text = f"{cpu:.0f}" if cpu is not None else "n/a"
        cpu_ratio = f"{cpu / base_cpu:.2f}x" if cpu is not None and base_cpu else "n/a"
        lines.append(
            f"| {r.model} | {r.mode} | {r.rps:.0f} | {p50:.2f} | {r.percentile_ms(99):.2f} | "
            f"{cpu_text} | {r.rps / b.rps:.2f}x | {p50 / b.percentile_ms(50):.2f}x | "
            f"{cpu_ratio} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-repo", default=str(ROOT / "model_repo"))
    parser.add_argument("--models", default="simple,mlp")
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "grpc_vs_rest.md"))
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; known: {sorted(MODELS)}")

    grpc_port = free_port()
    env = {"GATEWAY_LOAD_MODELS": ",".join(models)}
    with tempfile.TemporaryDirectory(prefix="bench-grpc-") as tmp:
        gw = start_gateway(
            Path(args.model_repo), Path(tmp), "--grpc-port", str(grpc_port),
            "--log-level", "warning", env=env, inherit_gateway_env=False, ready_s=60.0,
        )  # fmt: skip
        try:
            grpc_url = f"127.0.0.1:{grpc_port}"
            results = asyncio.run(bench(gw.address, grpc_url, gw.pid, models, args))
        finally:
            gw.stop(timeout_s=30)

    text = table(results)
    print()
    print(text)
    shown = " ".join(a for a in sys.argv[1:] if not a.startswith("--out"))
    report = (
        "# gRPC vs REST (JSON, binary) on one gateway\n\n"
        f"Command: `.venv/bin/python bench/grpc_vs_rest.py {shown}`".rstrip()
        + "\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; client and gateway on the same host, batch-1 requests, "
        f"{args.concurrency} concurrent coroutines per front end, {args.duration_s:g} s each "
        f"after {args.warmup_s:g} s warm-up.\n\n" + text + "\n"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
