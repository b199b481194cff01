"""Triton direct vs gateway -> Triton (over HTTP and over gRPC) vs the gateway's own ORT.

Starts a real ``tritonserver`` (the nvidia-pytriton build: python backend only, so models run
as python-backend ``model.py`` + ONNX Runtime there), two gateways whose only host is that Triton
(``TritonFactory``: they push the models), one with ``protocol = "http"`` and one with
``protocol = "grpc"``, and a plain gateway (in-process ONNX Runtime), all on free loopback ports.
For each model, the same load hits each target in turn: ``--concurrency`` coroutines of
``tritonclient.http.aio`` sending batch-1 binary-tensor requests back to back for
``--duration-s``. "Triton direct" talks to a copy of each model (``<model>_direct``) pushed
with the model's own config, queue delay included, as Triton would run it alone; the gateways
push theirs without the delay, which they wait themselves (``triton_batching = "gateway"``).
Only the gateway -> Triton leg differs between ``gateway_triton_http`` and
``gateway_triton_grpc``.
Models: ``simple`` and ``mlp`` from ``model_repo/`` (64 B and 4 KiB inputs) and ``big``, built
here: 1 MiB of FP32 in and out per request.

    .venv/bin/python bench/triton.py --models simple,mlp,big --concurrency 16 --duration-s 10

Prints req/s, p50, p99, the gateway's added latency over Triton direct (p50, p99), its
throughput ratio, and gRPC vs HTTP to Triton; writes ``bench/results/triton.md``. Read the
ratios, not the absolute numbers. With ``--rounds N`` the target order is reversed every other
round and the median round is kept.

Two CPU layouts (``--layouts``), each with its own Triton and gateways: ``shared``, where the
client, the gateways and Triton share every CPU, and ``split``, where the gateways run alone on
half the CPUs and Triton with the client on the other half, as a gateway on its own host would.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.http.aio as httpaio
from harness import ROOT, Gateway, exit_on_sigterm, start_gateway

from gateway.backends.triton import DEFAULT_PROTOCOL, TritonHost
from gateway.testing.tritonserver import TritonServer, process_cpu_s

BIG_ELEMENTS = 256 * 1024  # 1 MiB of FP32 in and out per request: where transports differ
# model -> (input names, datatype, row shape, dtype, output name)
MODELS: dict[str, tuple[tuple[str, ...], str, tuple[int, ...], Any, str]] = {
    "simple": (("INPUT0", "INPUT1"), "INT32", (16,), np.int32, "OUTPUT0"),
    "mlp": (("INPUT",), "FP32", (1024,), np.float32, "PROBS"),
    "big": (("X",), "FP32", (BIG_ELEMENTS,), np.float32, "Y"),  # built here, not in model_repo
}
TARGETS = ("triton_direct", "gateway_triton_http", "gateway_triton_grpc", "gateway_ort")
PROTOCOLS = {"gateway_triton_http": "http", "gateway_triton_grpc": "grpc"}


@dataclass
class Result:
    model: str
    target: str
    requests: int
    errors: int
    elapsed_s: float
    latencies_s: list[float]
    gateway_cpu_s: float | None  # of the gateway process while measuring (None: no gateway)
    triton_cpu_s: float  # of tritonserver and its python-backend stubs while measuring

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s

    def cpu_us(self, seconds: float | None) -> str:
        """CPU microseconds per request, as a table cell."""
        if seconds is None or not self.requests:
            return "-"
        return f"{1e6 * seconds / self.requests:.0f}"

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
    address: str,
    model: str,
    target: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    cpu: Callable[[], tuple[float | None, float]],
    served_as: str | None = None,
) -> Result:
    """Load one target; ``cpu()`` is (gateway, Triton) CPU seconds so far; ``served_as``: the
    model's name there, when not ``model``."""
    client = httpaio.InferenceServerClient(address, conn_limit=concurrency)
    inputs = _inputs(model)
    outputs = [httpaio.InferRequestedOutput(MODELS[model][4], binary_data=True)]
    # aiohttp asks for gzip by default, and Triton would compress every response for it (about
    # 40 ms of CPU per 1 MiB output); no target compresses, so Triton direct is at its best.
    headers = {"accept-encoding": "identity"}
    name = served_as or model
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop_at = time.perf_counter() + warmup_s + duration_s

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                await client.infer(name, inputs, outputs=outputs, headers=headers)
            except Exception:
                errors += measuring
                continue
            if measuring:
                latencies.append(time.perf_counter() - started)

    try:
        # Fail loudly before the load.
        await client.infer(name, inputs, outputs=outputs, headers=headers)
        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await asyncio.sleep(warmup_s)
        measuring, begin, cpu_before = True, time.perf_counter(), cpu()
        await asyncio.gather(*tasks)
        elapsed, cpu_after = time.perf_counter() - begin, cpu()
    finally:
        await client.close()
    gateway_cpu = None if cpu_after[0] is None else cpu_after[0] - (cpu_before[0] or 0.0)
    return Result(
        model,
        target,
        len(latencies),
        errors,
        elapsed,
        latencies,
        gateway_cpu,
        cpu_after[1] - cpu_before[1],
    )


def _repo(root: Path, models: list[str]) -> Path:
    """The shipped models asked for, plus ``big`` (Neg over FP32 [-1, BIG_ELEMENTS])."""
    from onnx import TensorProto, helper, save

    for model in models:
        if model != "big":
            shutil.copytree(ROOT / "model_repo" / model, root / model)
    if "big" in models:
        shape = [None, BIG_ELEMENTS]
        graph = helper.make_graph(
            [helper.make_node("Neg", ["X"], ["Y"])],
            "big",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)],
        )
        onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx_model.ir_version = 8
        (root / "big" / "1").mkdir(parents=True)
        save(onnx_model, root / "big" / "1" / "model.onnx")
        (root / "big" / "config.pbtxt").write_text(
            'name: "big"\nmax_batch_size: 8\ndynamic_batching { }\n'
        )
    return root


def _push_direct(triton: TritonServer, repo: Path, models: list[str]) -> dict[str, str]:
    """Each model again as ``<model>_direct``, with its own config as Triton would run it alone
    (``batching = "triton"``: Triton waits the queue delay; the gateways push it without one,
    since they wait it themselves). Returns model -> the name Triton direct is asked for."""
    from gateway.backends.onnxruntime import inspect_config
    from gateway.repository.local import LocalRepository
    from gateway.settings import Settings

    root = Path(tempfile.mkdtemp(prefix="bench-triton-direct-"))
    names = {}
    for model in models:
        name = f"{model}_direct"
        shutil.copytree(repo / model, root / name)
        config = root / name / "config.pbtxt"
        if config.exists():
            config.write_text(config.read_text().replace(f'"{model}"', f'"{name}"', 1))
        names[model] = name

    async def push() -> None:
        # Closing the host leaves what it pushed on Triton (only ``release`` unloads).
        host = TritonHost("direct", triton.http_url, batching="triton", timeout_s=60.0)
        max_batch = Settings().default_max_batch_size  # as the gateways complete configs
        try:
            for name in names.values():
                source = LocalRepository(root).source(name)
                for version in source.version_paths:
                    await host.prepare(source, version, inspect_config(source, version, max_batch))
        finally:
            await host.close()

    asyncio.run(push())
    return names


def _cpu(gateway: Gateway | None, triton: TritonServer) -> tuple[float | None, float]:
    gateway_s = None if gateway is None else process_cpu_s(gateway.pid)
    return gateway_s, triton.cpu_s()


def _gateway_config(
    path: Path, triton: TritonServer | None, models: list[str], probe_s: float, protocol: str
) -> Path:
    lines = [f"load_models = {json.dumps(models)}"]
    if triton is not None:
        lines += [
            f"host_probe_interval_s = {probe_s}",
            "[[hosts]]",
            'kind = "triton"',
            'name = "triton"',
            f'url = "{triton.http_url}"',
            f'grpc_url = "{triton.grpc_url}"',
            f'protocol = "{protocol}"',
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def protocol_table(results: list[Result], models: list[str]) -> list[str]:
    """Gateway -> Triton over gRPC against over HTTP, per model."""
    by_key = {(r.model, r.target): r for r in results}
    lines = [
        "| model | HTTP req/s | gRPC req/s | gRPC/HTTP throughput | HTTP p50 ms | gRPC p50 ms "
        "| HTTP p99 ms | gRPC p99 ms | gateway CPU us/req HTTP | gRPC "
        "| Triton CPU us/req HTTP | gRPC |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model in models:
        h, g = by_key[(model, "gateway_triton_http")], by_key[(model, "gateway_triton_grpc")]
        lines.append(
            f"| {model} | {h.rps:.0f} | {g.rps:.0f} | {g.rps / h.rps:.2f}x | "
            f"{h.pct_ms(0.5):.2f} | {g.pct_ms(0.5):.2f} | {h.pct_ms(0.99):.2f} | "
            f"{g.pct_ms(0.99):.2f} | {h.cpu_us(h.gateway_cpu_s)} | {g.cpu_us(g.gateway_cpu_s)} "
            f"| {h.cpu_us(h.triton_cpu_s)} | {g.cpu_us(g.triton_cpu_s)} |"
        )
    return lines


def table(results: list[Result]) -> list[str]:
    lines = [
        "| model | target | req/s | p50 ms | p99 ms | errors | added p50 ms | added p99 ms "
        "| throughput vs Triton direct | gateway CPU us/req | Triton CPU us/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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
            f"{r.pct_ms(0.99):.2f} | {r.errors} | {added50} | {added99} | {ratio} | "
            f"{r.cpu_us(r.gateway_cpu_s)} | {r.cpu_us(r.triton_cpu_s)} |"
        )
    return lines


LAYOUTS = ("shared", "split")


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpus``; threads and processes it starts later inherit it."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except OSError:  # the thread ended meanwhile
            pass


def _cpu_sets(layout: str) -> tuple[set[int], set[int]] | None:
    """(gateway CPUs, Triton + client CPUs) for ``split``; None: everything shares every CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if layout == "shared":
        return None
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


def run_layout(
    layout: str, args: argparse.Namespace, models: list[str], repo: Path
) -> list[Result]:
    """Every model against every target, with a fresh Triton and gateways placed per layout."""
    everything = os.sched_getaffinity(0)
    sets = _cpu_sets(layout)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-triton-{layout}-"))
    results: list[Result] = []
    if sets is not None:
        _pin(os.getpid(), sets[1])  # the load generator, beside Triton
    try:
        with TritonServer() as triton:
            if sets is not None and triton.pid is not None:
                _pin(triton.pid, sets[1])  # before any model (python-backend stub) starts
            gateways = {}
            try:
                # One after the other: the second push of a model reloads it in Triton.
                for target, protocol in (*PROTOCOLS.items(), ("gateway_ort", "")):
                    config = _gateway_config(
                        tmp / f"{target}.toml",
                        triton if protocol else None,
                        models,
                        2.0,
                        protocol,
                    )
                    gateways[target] = start_gateway(repo, tmp, "--config", str(config))
                    if sets is not None:
                        _pin(gateways[target].pid, sets[0])
                direct_names = _push_direct(triton, repo, models)
                addresses = {"triton_direct": triton.http_address}
                addresses.update({t: g.address for t, g in gateways.items()})
                for model in models:
                    for round_ in range(args.rounds):
                        for target in TARGETS if round_ % 2 == 0 else TARGETS[::-1]:
                            result = asyncio.run(
                                run_load(
                                    addresses[target],
                                    model,
                                    target,
                                    args.concurrency,
                                    args.duration_s,
                                    args.warmup_s,
                                    functools.partial(_cpu, gateways.get(target), triton),
                                    direct_names[model] if target == "triton_direct" else None,
                                )
                            )
                            print(
                                f"{layout:6s} {model:7s} {target:19s} {result.rps:8.0f} req/s  "
                                f"p50 {result.pct_ms(0.5):6.2f} ms  "
                                f"p99 {result.pct_ms(0.99):6.2f} ms  errors {result.errors}  "
                                f"CPU us/req gateway {result.cpu_us(result.gateway_cpu_s)} "
                                f"Triton {result.cpu_us(result.triton_cpu_s)}",
                                flush=True,
                            )
                            results.append(result)
            finally:
                for gateway in gateways.values():
                    gateway.stop()
    finally:
        _pin(os.getpid(), everything)
    if args.rounds > 1:  # the median round per (model, target)
        merged = []
        for model in models:
            for target in TARGETS:
                runs = [r for r in results if (r.model, r.target) == (model, target)]
                merged.append(sorted(runs, key=lambda r: r.rps)[len(runs) // 2])
        results = merged
    return results


def layout_report(layout: str, results: list[Result], models: list[str]) -> list[str]:
    """The tables and verdicts of one layout."""
    lines = table(results)
    by_key = {(r.model, r.target): r for r in results}
    for model in models:
        base = by_key[(model, "triton_direct")]
        for target, protocol in PROTOCOLS.items():
            via = by_key[(model, target)]
            added_ms, ratio = via.pct_ms(0.5) - base.pct_ms(0.5), via.rps / base.rps
            met = "met" if added_ms <= 1.0 and ratio >= 0.8 else "NOT met"
            lines.append(
                f"\n{layout}, `{model}`: gateway -> Triton over {protocol} adds "
                f"{added_ms:+.2f} ms p50 and keeps {ratio:.2f}x Triton-direct throughput: "
                f"goal {met}."
            )
    ratios = [
        by_key[(m, "gateway_triton_grpc")].rps / by_key[(m, "gateway_triton_http")].rps
        for m in models
    ]
    return [
        *lines,
        "",
        f"#### {layout}: gateway -> Triton, gRPC vs HTTP",
        "",
        *protocol_table(results, models),
        "",
        f"gRPC/HTTP throughput, geometric mean over {', '.join(models)}: "
        f"{statistics.geometric_mean(ratios):.2f}x.",
    ]


LAYOUT_TEXT = {
    "shared": "Client, Triton and the three gateways share every CPU: the gateway's CPU per "
    "request competes with Triton's own (a gateway on the Triton host).",
    "split": "The gateways alone on the first half of the CPUs, Triton and the client on the "
    "other half (`sched_setaffinity`, every thread): the gateway as on a host of its own, "
    "which is how a remote Triton host is deployed. Triton direct gets the same CPUs as "
    "behind the gateway.",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="simple,mlp,big")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the four targets")
    parser.add_argument(
        "--layouts", default=",".join(LAYOUTS), help="shared, split or both (see LAYOUT_TEXT)"
    )
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "triton.md"))
    args = parser.parse_args()
    exit_on_sigterm()  # the servers it starts stop with it
    models = [m for m in args.models.split(",") if m]
    for model in models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {sorted(MODELS)}")
    layouts = [x for x in args.layouts.split(",") if x]
    for layout in layouts:
        if layout not in LAYOUTS:
            parser.error(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    if "split" in layouts and len(os.sched_getaffinity(0)) < 2:
        parser.error("the split layout needs at least 2 CPUs")

    repo = _repo(Path(tempfile.mkdtemp(prefix="bench-triton-")) / "repo", models)
    lines: list[str] = []
    for layout in layouts:
        results = run_layout(layout, args, models, repo)
        lines += [
            "",
            f"## Layout: {layout}",
            "",
            LAYOUT_TEXT[layout],
            "",
            *layout_report(layout, results, models),
        ]
    print("\n".join(lines))
    command = "  ".join(["python bench/triton.py", *sys.argv[1:]]).replace("  ", " ")
    cpu = os.cpu_count()
    text = [
        "# Gateway -> Triton (HTTP, gRPC) vs Triton direct vs the gateway's own ONNX Runtime",
        "",
        f"Command: `.venv/bin/{command}`",
        "",
        f"Machine: {platform.platform()}, {cpu} CPUs, Python {platform.python_version()}. "
        "Triton is the nvidia-pytriton "
        "build (python backend only): its models run as python-backend `model.py` + ONNX "
        "Runtime, pushed there by the gateways. `gateway_triton_http` and `gateway_triton_grpc` "
        "differ only in the host's `protocol` (tritonclient.http.aio binary tensors vs "
        "tritonclient.grpc.aio raw contents); the client always speaks HTTP to the gateway. "
        "Triton direct runs `<model>_direct`, a copy pushed with the model's own config (queue "
        "delay included); the gateways push theirs without the delay, which they wait "
        "themselves. "
        "Batch-1 binary requests from "
        f"{args.concurrency} `tritonclient.http.aio` coroutines (asking for uncompressed "
        f"responses), {args.duration_s:g} s per target after {args.warmup_s:g} s warm-up"
        + (f", median of {args.rounds} rounds." if args.rounds > 1 else "."),
        "",
        "CPU us/req: CPU time of the gateway process, and of tritonserver plus its "
        "python-backend stubs, over the measured window divided by the requests served "
        "(less sensitive than req/s to other load on the machine).",
        "",
        "Goal: gateway -> Triton adds <= 1 ms p50 and keeps >= 0.8x Triton-direct throughput. "
        f"The gateway's default `protocol` for a Triton host with a `grpc_url` "
        f"(`DEFAULT_PROTOCOL`): `{DEFAULT_PROTOCOL}`.",
        *lines,
        "",
    ]
    Path(args.output).write_text("\n".join(text))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
