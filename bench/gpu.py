"""GPU serving check and benchmark: the gateway on CUDA against ONNX Runtime CUDA in-process.

Run on a machine with an NVIDIA GPU, through ``scripts/gpu_check.sh`` (which installs the pinned
``onnxruntime-gpu`` first)::

    python bench/gpu.py                       # ~3 minutes with the defaults
    python bench/gpu.py --provider cpu --duration-s 1 --concurrency 1 4   # the same on a CPU

One run does four things:

1. serves a copy of ``model_repo`` plus ``cnn`` (below) with ``execution_provider = "cuda"``
   and ``strict_readiness``, and checks that every model's ``parameters.providers[0]`` is
   ``CUDAExecutionProvider`` and none reports ``cpu_fallback`` (exit status 1 otherwise);
2. the in-process limit: ``InferenceSession.run`` on the same provider, device and CUDA options
   as the gateway, in a loop, for each batch size up to ``max_batch_size``;
3. ``cnn`` through the gateway, binary tensors over HTTP, one image per request, at each
   concurrency of the sweep (an aiohttp client in several processes);
4. a table: req/s, items/s, p50/p99, errors, the average batch the gateway formed, and the
   ratio to the in-process best; printed, and written to ``--out-dir`` (gpu.md, gpu.json).

``cnn``: FP32 [3, 224, 224] -> 3 stride-2 3x3 convolutions (32, 64, 128 channels, ReLU), global
average pool, a 128x10 dense layer and softmax; deterministic weights. A 602 KB request body: the
HTTP path, not the GPU, is what it is expected to find as the limit.

Every process it starts is stopped on exit, errors and Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import harness
import numpy as np
from harness import ROOT

PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
CNN_SHAPE = (3, 224, 224)
CNN_MAX_BATCH = 64


# -- the model ----------------------------------------------------------------------------------


def write_cnn(repo: Path) -> None:
    """``cnn`` into ``repo`` (module docstring)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, previous, channels = [], [], "INPUT", CNN_SHAPE[0]
    for i, width in enumerate((32, 64, 128)):
        w = rng.standard_normal((width, channels, 3, 3)).astype(np.float32) / (3 * channels)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        conv = helper.make_node(
            "Conv", [previous, f"w{i}"], [f"c{i}"], strides=[2, 2], pads=[1, 1, 1, 1]
        )
        nodes += [conv, helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        previous, channels = f"r{i}", width
    dense = rng.standard_normal((channels, 10)).astype(np.float32) / channels
    weights.append(numpy_helper.from_array(dense, "dense"))
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "dense"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["PROBS"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["batch", *CNN_SHAPE])],
        [helper.make_tensor_value_info("PROBS", TensorProto.FLOAT, ["batch", 10])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (repo / "cnn" / "1").mkdir(parents=True)
    onnx.save(model, repo / "cnn" / "1" / "model.onnx")
    (repo / "cnn" / "config.pbtxt").write_text(
        f'name: "cnn"\nmax_batch_size: {CNN_MAX_BATCH}\n'
        'input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] } ]\n'
        'output [ { name: "PROBS" data_type: TYPE_FP32 dims: [ 10 ] } ]\n'
        "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
    )


# -- the gateway --------------------------------------------------------------------------------


def http(url: str, data: bytes | None = None) -> Any:
    """The JSON answer of one request; anything but a 200 is an error."""
    status, raw, _ = harness.http(url, data)
    if status != 200:
        raise RuntimeError(f"{url}: HTTP {status}: {raw[:200]!r}")
    return json.loads(raw)


@contextmanager
def gateway(repo: Path, provider: str, log: Path, ready_s: float) -> Iterator[str]:
    """``gateway serve`` on a free loopback port with every model on ``provider``."""
    env = {
        "GATEWAY_EXECUTION_PROVIDER": provider,
        "GATEWAY_STRICT_READINESS": "true",
        "GATEWAY_ACCESS_LOG": "false",
    }
    try:
        gw = harness.start_gateway(repo, log.parent, env=env, log=log, ready_s=ready_s)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    try:
        yield gw.url
    finally:
        gw.stop(timeout_s=30)


def check_providers(url: str, expected: str) -> list[dict[str, Any]]:
    """Every ONNX Runtime model's provider as the gateway reports it; raises SystemExit on any
    other. An ensemble runs on no provider of its own: its steps are models of the repository."""
    rows, wrong = [], []
    for entry in http(f"{url}/v2/repository/index", b"{}"):
        parameters = http(f"{url}/v2/models/{entry['name']}")["parameters"]
        if "ensemble_steps" in parameters:
            continue
        row = {
            "model": entry["name"],
            "provider": parameters["providers"][0],
            "cpu_fallback": parameters.get("cpu_fallback"),
            "cuda_device_ids": parameters.get("cuda_device_ids", []),
        }
        rows.append(row)
        if row["provider"] != expected or row["cpu_fallback"]:
            wrong.append(row)
    for row in rows:
        print(f"  {row['model']:<24} {row['provider']} devices={row['cuda_device_ids']}")
    if wrong:
        raise SystemExit(f"models not on {expected}: {wrong}")
    return rows


# -- in-process ---------------------------------------------------------------------------------


def in_process(model: Path, provider: str, seconds: float) -> list[dict[str, Any]]:
    """items/s of ``session.run`` per batch size, on the gateway's own CUDA options."""
    import onnxruntime as ort

    from gateway.backends.onnxruntime import cuda_options
    from gateway.settings import load_settings

    settings = load_settings()
    providers: list[Any] = ["CPUExecutionProvider"]
    if provider == "cuda":
        ort.preload_dlls()
        device = settings.cuda_device_id
        providers = [("CUDAExecutionProvider", cuda_options(settings, device)), *providers]
    session = ort.InferenceSession(str(model), providers=providers)
    got = session.get_providers()[0]
    if got != PROVIDERS[provider]:
        raise SystemExit(f"in-process session runs on {got}, not {PROVIDERS[provider]}")
    points = []
    batch = 1
    while batch <= CNN_MAX_BATCH:
        feed = {"INPUT": np.random.default_rng(batch).random((batch, *CNN_SHAPE), np.float32)}
        for _ in range(3):
            session.run(None, feed)
        runs, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            session.run(None, feed)
            runs += 1
        points.append({"batch": batch, "items_per_s": runs * batch / elapsed})
        batch *= 2
    return points


# -- load over HTTP -----------------------------------------------------------------------------


def binary_body() -> tuple[bytes, dict[str, str]]:
    image = np.random.default_rng(1).random((1, *CNN_SHAPE), np.float32)
    raw = image.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "INPUT",
                "datatype": "FP32",
                "shape": [1, *CNN_SHAPE],
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": "PROBS", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }
    return head + raw, headers


async def _drive(url: str, connections: int, duration_s: float) -> dict[str, Any]:
    import aiohttp

    body, headers = binary_body()
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration_s
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                try:
                    async with client.post(url, data=body, headers=headers) as response:
                        await response.read()
                        ok = response.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    return {"latencies": latencies, "errors": errors}


def _drive_process(url: str, connections: int, duration_s: float) -> dict[str, Any]:
    return asyncio.run(_drive(url, connections, duration_s))


def sweep_point(url: str, concurrency: int, duration_s: float) -> dict[str, Any]:
    """``concurrency`` clients, one image per request, spread over up to 8 processes."""
    before = http(f"{url}/v2/models/cnn/stats")["model_stats"][0]
    processes = min(concurrency, 8)
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    infer = f"{url}/v2/models/cnn/infer"
    with ProcessPoolExecutor(processes) as pool:
        parts = list(
            pool.map(_drive_process, [infer] * processes, shares, [duration_s] * processes)
        )
    after = http(f"{url}/v2/models/cnn/stats")["model_stats"][0]
    latencies = sorted(x for part in parts for x in part["latencies"])
    executions = after["execution_count"] - before["execution_count"]
    items = after["inference_count"] - before["inference_count"]
    return {
        "concurrency": concurrency,
        "req_per_s": len(latencies) / duration_s,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
        "errors": sum(part["errors"] for part in parts),
        "avg_batch": items / executions if executions else None,
    }


# -- report -------------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> list[str]:
    best = max(result["in_process"], key=lambda p: p["items_per_s"])
    lines = [
        f"in-process {result['provider']}: best {best['items_per_s']:.0f} items/s at batch "
        f"{best['batch']} ("
        + ", ".join(f"{p['batch']}: {p['items_per_s']:.0f}" for p in result["in_process"])
        + ")",
        "",
        "| concurrency | req/s = items/s | p50 ms | p99 ms | errors | avg batch | vs in-process |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def number(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for point in result["sweep"]:
        ratio = point["req_per_s"] / best["items_per_s"]
        lines.append(
            f"| {point['concurrency']} | {point['req_per_s']:.0f} | {number(point['p50_ms'])} "
            f"| {number(point['p99_ms'])} | {point['errors']} | {number(point['avg_batch'])} "
            f"| {ratio:.2f}x |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cuda")
    parser.add_argument("--duration-s", type=float, default=8.0, help="per concurrency [8]")
    parser.add_argument("--in-process-s", type=float, default=1.0, help="per batch size [1]")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--ready-s", type=float, default=180.0, help="gateway start limit [180]")
    parser.add_argument("--model-repo", default=str(ROOT / "model_repo"))
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--log", help="keep the gateway's log here [a temporary file]")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import onnxruntime as ort

    from gateway.backends.onnxruntime import build_info

    result: dict[str, Any] = {
        "provider": args.provider,
        "onnxruntime": build_info(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "available_providers": ort.get_available_providers(),
    }
    print(f"{result['onnxruntime']}: {result['available_providers']}")
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as scratch:
        repo = Path(scratch) / "repo"
        shutil.copytree(args.model_repo, repo)
        write_cnn(repo)
        print(f"serving {repo} with execution_provider = {args.provider!r}")
        log = Path(args.log) if args.log else Path(scratch) / "gateway.log"
        with gateway(repo, args.provider, log, args.ready_s) as url:
            result["models"] = check_providers(url, PROVIDERS[args.provider])
            result["in_process"] = in_process(
                repo / "cnn" / "1" / "model.onnx", args.provider, args.in_process_s
            )
            result["sweep"] = [sweep_point(url, c, args.duration_s) for c in args.concurrency]
    lines = table(result)
    print("\n".join(lines))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    header = f"# GPU serving check\n\n`{result['command']}` with {result['onnxruntime']}\n\n"
    (out / "gpu.md").write_text(header + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
