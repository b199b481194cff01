"""Latency against throughput, side by side: the gateway, standalone Triton and in-process ORT.

In one run, for each model (``simple``, ``mlp``, ``resnet50``, ``bert_encoder``; the last two
built on demand by ``scripts/build_models.py``, see ``ensure_heavy``):

1. **in-process ONNX Runtime**: ``session.run`` at batch 1, 2, 4, ... ``max_batch_size``
   (``harness.measure_in_process``): its best items/s and its batch-1 latency are the limits;
2. **perf_analyzer** (``scripts/perf_analyzer.sh``) at concurrency 1, 2, 4, ... against
   - the gateway (HTTP binary tensors, gRPC, and system shared memory when ``/v2`` lists
     ``system_shared_memory``), and
   - standalone ``tritonserver`` (``gateway.testing.tritonserver``, python backend running the
     same ONNX file through ONNX Runtime, the model's own config and dynamic batching) over the
     same protocols;
3. **memory**: the RSS a gateway gains by loading each model (a gateway with that model alone
   against one with only ``simple``, both after one request) next to what an ONNX Runtime
   session of it alone adds to a bare Python process (after one run);
4. **copies** (``resnet50``): a gateway under ``tracemalloc`` (this script, ``--traced``) answers
   sequential requests; the most memory traced above the idle level during them, in units of
   the request's input bytes, says how many copies of the payload were alive at once.

Writes ``sweep.md`` (tables, goals as ratios), ``sweep.json`` and one latency-vs-throughput plot
per model (``sweep-<model>.png``, matplotlib from the ``bench`` extra) to ``--out-dir``.

    .venv/bin/python bench/sweep.py                         # the reduced sweep (~15 min)
    .venv/bin/python bench/sweep.py --quick --out-dir /tmp/sweep   # errors only (~3 min)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from pathlib import Path
from typing import Any

import harness

ROOT = harness.ROOT
sys.path.insert(0, str(ROOT / "scripts"))
import build_models  # noqa: E402  (scripts/ is not a package)

MODELS = ("simple", "mlp", "resnet50", "bert_encoder")
HEAVY = ("resnet50", "bert_encoder")
PROTOCOLS = ("http", "grpc", "shm")
TARGETS = ("gateway", "triton")


# -- the traced child: a gateway under tracemalloc --------------------------------------------


def run_traced(control: Path, argv: list[str]) -> int:
    """Serve as ``gateway`` does, under tracemalloc. A thread polls for ``<control>.reset``
    (reset the peak, remember the level) and ``<control>.want`` (write the peak above that
    level): under uvloop a signal handler may wait for the next request to run."""
    from gateway import cli

    tracemalloc.start()

    def poll() -> None:
        base = 0
        while True:
            reset, want = control.with_suffix(".reset"), control.with_suffix(".want")
            if reset.exists():
                base = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                reset.unlink()
            if want.exists():
                current, peak = tracemalloc.get_traced_memory()
                control.write_text(json.dumps({"base": base, "current": current, "peak": peak}))
                want.unlink()
            time.sleep(0.01)

    threading.Thread(target=poll, daemon=True).start()
    return cli.main(argv)


def _ask(control: Path, what: str) -> dict[str, int]:
    control.unlink(missing_ok=True)
    control.with_suffix(f".{what}").touch()
    deadline = time.monotonic() + 10
    while control.with_suffix(f".{what}").exists() or (what == "want" and not control.exists()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the traced gateway did not answer {what}")
        time.sleep(0.01)
    return json.loads(control.read_text()) if what == "want" else {}


# -- models and the repository ----------------------------------------------------------------


def build_repo(dest: Path, models: list[str]) -> Path:
    """One repository with the shipped and the heavy models (links, not copies)."""
    heavy = [m for m in models if m in HEAVY]
    cache = build_models.ensure_heavy(names=heavy) if heavy else None
    for name in models:
        source = (cache if name in HEAVY and cache else ROOT / "model_repo") / name
        (dest / name).symlink_to(source.resolve(), target_is_directory=True)
    return dest


def output_bytes(model: harness.Model, repo: Path) -> int:
    """Bytes of every output of one item (for perf_analyzer's output shared memory)."""
    text = (repo / model.name / "config.pbtxt").read_text()
    total = 0
    import re

    for body in re.findall(r"\boutput\s*\{([^}]*)\}", text):
        dims = [int(d) for d in re.findall(r"dims:\s*(-?\d+)", body)]
        total += 8 * math.prod(dims)  # 8: the widest element of these models
    return total


def in_process(repo: Path, models: list[str], seconds: float) -> dict[str, dict[str, Any]]:
    """Per model: every batch size's point, the best items/s and batch 1's median latency."""
    found = {}
    for name in models:
        model = harness.read_model(repo, name)
        points = harness.measure_in_process(
            repo, model, 0, seconds, harness.batch_sizes(model.max_batch_size)
        )
        best = max(points, key=lambda p: p["items_per_s"])
        found[name] = {
            "points": points,
            "best_items_per_s": best["items_per_s"],
            "best_batch": best["batch"],
            "batch1_p50_ms": points[0]["ms_per_run_median"],
        }
        print(
            f"in-process {name:13s} best {best['items_per_s']:9.1f} items/s at batch "
            f"{best['batch']}, batch 1 p50 {points[0]['ms_per_run_median']:.2f} ms",
            flush=True,
        )
    return found


# -- perf_analyzer ----------------------------------------------------------------------------


def perf_analyzer() -> str:
    out = subprocess.run(
        [str(ROOT / "scripts" / "perf_analyzer.sh")], capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def run_pa(
    pa: str,
    model: str,
    url: str,
    protocol: str,
    concurrency: int,
    window_ms: int,
    out_bytes: int,
    work: Path,
) -> dict[str, Any]:
    """One perf_analyzer point; {'error': ...} when it fails (the sweep goes on)."""
    report = work / f"pa-{model}-{protocol}-{concurrency}-{time.monotonic_ns()}.csv"
    cmd = [
        pa, "-m", model, "-u", url, "-i", "grpc" if protocol == "grpc" else "http",
        "--concurrency-range", str(concurrency), "-p", str(window_ms),
        "-s", "999", "-r", "3",  # three windows, no stability retries: a bounded run
        "--input-data", "zero", "-f", str(report),
    ]  # fmt: skip
    if protocol == "shm":
        cmd += ["--shared-memory", "system", "--output-shared-memory-size", str(out_bytes)]
    limit_s = 30 + 6 * window_ms / 1000 * max(1, concurrency / 8)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {limit_s:.0f} s"}
    if out.returncode != 0 or not report.exists():
        tail = (out.stdout + out.stderr).strip().splitlines()[-3:]
        return {"error": " / ".join(tail)[:300]}
    with report.open() as f:
        row = next(csv.DictReader(f))
    return {
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": int(row["p50 latency"]) / 1e3,
        "p99_ms": int(row["p99 latency"]) / 1e3,
        "queue_ms": int(row["Server Queue"]) / 1e3,
        "compute_ms": int(row["Server Compute Infer"]) / 1e3,
    }


def has_shm(http_url: str) -> bool:
    with urllib.request.urlopen(f"{http_url}/v2", timeout=5) as resp:
        return "system_shared_memory" in json.loads(resp.read()).get("extensions", [])


def sweep_target(
    pa: str,
    target: str,
    urls: dict[str, str],
    repo: Path,
    models: list[str],
    levels: dict[str, list[int]],
    protocols: list[str],
    window_ms: int,
    work: Path,
) -> list[dict[str, Any]]:
    points = []
    for model in models:
        out_bytes = output_bytes(harness.read_model(repo, model), repo)
        for protocol in protocols:
            url = urls["grpc" if protocol == "grpc" else "http"]
            for concurrency in levels[model]:
                got = run_pa(pa, model, url, protocol, concurrency, window_ms, out_bytes, work)
                point = {"target": target, "model": model, "protocol": protocol,
                         "concurrency": concurrency, **got}  # fmt: skip
                points.append(point)
                if "error" in got:
                    print(f"{target:8s} {model:13s} {protocol:5s} c={concurrency:<3d} "
                          f"ERROR {got['error']}", flush=True)  # fmt: skip
                else:
                    print(
                        f"{target:8s} {model:13s} {protocol:5s} c={concurrency:<3d} "
                        f"{got['throughput']:9.1f}/s  p50 {got['p50_ms']:8.2f}  "
                        f"p99 {got['p99_ms']:8.2f} ms",
                        flush=True,
                    )
    return points


def push_to_triton(http_url: str, repo: Path, models: list[str]) -> None:
    """Each model with its own config, run by Triton's python backend through ONNX Runtime
    (``gateway/backends/triton_model``), batching as Triton does it (``batching="triton"``)."""
    from gateway.backends.onnxruntime import inspect_config
    from gateway.backends.triton import TritonHost
    from gateway.repository.local import LocalRepository
    from gateway.settings import Settings

    async def push() -> None:
        host = TritonHost("sweep", http_url, batching="triton", timeout_s=300.0)
        max_batch = Settings().default_max_batch_size
        try:
            for name in models:
                source = LocalRepository(repo).source(name)
                for version in source.version_paths:
                    await host.prepare(source, version, inspect_config(source, version, max_batch))
        finally:
            await host.close()

    asyncio.run(push())


# -- memory and copies ------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


_SESSION_RSS = """
import sys, numpy as np, onnxruntime as ort
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
path, feeds = sys.argv[1], {}
before = rss()
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
s = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
types = {'tensor(float)': np.float32, 'tensor(int32)': np.int32, 'tensor(int64)': np.int64}
for i in s.get_inputs():
    shape = [1 if not isinstance(d, int) else d for d in i.shape]
    feeds[i.name] = np.zeros(shape, dtype=types[i.type])
s.run(None, feeds)
print(rss() - before)
"""


def one_request(url: str, model: harness.Model) -> None:
    body = harness.binary_body(model)
    status, raw, headers = harness.http(f"{url}/v2/models/{model.name}/infer", body.data,
                                        body.headers)  # fmt: skip
    if status != 200:
        raise RuntimeError(f"{model.name}: HTTP {status}: {raw[:200]!r}")
    harness.check_response(raw, headers, model)


def memory(repo: Path, models: list[str], work: Path) -> list[dict[str, Any]]:
    """Per model: the gateway's RSS gain for loading and running it against an ORT session's."""
    rows = []
    simple = harness.read_model(repo, "simple")
    with harness.gateway(repo, {}, work, "mem-base", models=("simple",)) as gw:
        one_request(gw.url, simple)
        base = rss_mb(gw.pid)
    for name in models:
        if name == "simple":
            continue
        model = harness.read_model(repo, name)
        with harness.gateway(repo, {}, work, f"mem-{name}", models=("simple", name)) as gw:
            one_request(gw.url, simple)
            one_request(gw.url, model)
            loaded = rss_mb(gw.pid)
        out = subprocess.run(
            [sys.executable, "-c", _SESSION_RSS, str(repo / name / "1" / "model.onnx")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        session = float(out.stdout.strip().splitlines()[-1])
        size = (repo / name / "1" / "model.onnx").stat().st_size / 2**20
        rows.append({"model": name, "file_mb": size, "gateway_mb": loaded - base,
                     "session_mb": session})  # fmt: skip
        print(f"memory {name:13s} gateway +{loaded - base:7.1f} MB, ORT session alone "
              f"+{session:7.1f} MB (file {size:.1f} MB)", flush=True)  # fmt: skip
    return rows


def copies(repo: Path, model_name: str, work: Path, requests: int) -> dict[str, Any]:
    """Peak traced bytes above idle while a tracemalloc'ed gateway answers ``requests``
    sequential requests, over HTTP binary and over gRPC with raw contents."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    model = harness.read_model(repo, model_name)
    payload = sum(
        4 * math.prod(t.dims) if t.datatype in ("FP32", "INT32") else 8 * math.prod(t.dims)
        for t in model.inputs
    )
    control = work / "traced.json"
    launcher = [sys.executable, str(Path(__file__).resolve()), "--traced", str(control)]
    grpc_port = harness.free_port()
    env = {"GATEWAY_LOAD_MODELS": model_name, "GATEWAY_GRPC_PORT": str(grpc_port)}
    found: dict[str, Any] = {"model": model_name, "payload_bytes": payload}
    gw = harness.start_gateway(repo, work, "--log-level", "warning", env=env, tag="traced",
                               ready=(model_name,), launcher=launcher)  # fmt: skip
    try:
        body = harness.binary_body(model)
        url = f"{gw.url}/v2/models/{model_name}/infer"
        for _ in range(3):
            one_request(gw.url, model)
        _ask(control, "reset")
        for _ in range(requests):
            harness.http(url, body.data, body.headers)
        http = _ask(control, "want")
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        feeds = harness.sample_inputs(model, 1, seed=1)
        inputs = []
        for t in model.inputs:
            tensor = grpcclient.InferInput(t.name, [1, *t.dims], t.datatype)
            tensor.set_data_from_numpy(np.ascontiguousarray(feeds[t.name]))
            inputs.append(tensor)
        for _ in range(3):
            client.infer(model_name, inputs)
        _ask(control, "reset")
        for _ in range(requests):
            client.infer(model_name, inputs)
        grpc = _ask(control, "want")
        client.close()
    finally:
        gw.stop()
    for name, got in (("http", http), ("grpc", grpc)):
        extra = got["peak"] - got["base"]
        found[name] = {"peak_extra_bytes": extra, "payloads": extra / payload}
        print(f"copies {model_name} {name}: peak {extra:,d} B above idle = "
              f"{extra / payload:.2f}x the {payload:,d} B input", flush=True)  # fmt: skip
    return found


# -- the report -------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _point(points: list[dict[str, Any]], **key: Any) -> dict[str, Any] | None:
    for p in points:
        if all(p.get(k) == v for k, v in key.items()) and "error" not in p:
            return p
    return None


def goals(
    points: list[dict[str, Any]], ort: dict[str, dict[str, Any]], mem: list[dict[str, Any]],
    models: list[str], protocols: list[str],
) -> list[str]:  # fmt: skip
    lines = ["| goal | figure | met |", "|---|---|---|"]
    for model in ("mlp", "resnet50"):
        p = _point(points, target="gateway", model=model, protocol="http", concurrency=1)
        if model in ort and p is not None:
            extra = p["p50_ms"] - ort[model]["batch1_p50_ms"]
            lines.append(
                f"| c=1 `{model}` p50 <= in-process p50 + 0.3 ms | {p['p50_ms']:.2f} ms vs "
                f"{ort[model]['batch1_p50_ms']:.2f} ms: {extra:+.2f} ms | {extra <= 0.3} |"
            )
    if "resnet50" in ort:
        for protocol, want in (("http", 0.9), ("grpc", 0.9), ("shm", 0.95)):
            got = [
                p["throughput"]
                for p in points
                if (p["target"], p["model"], p["protocol"]) == ("gateway", "resnet50", protocol)
                and "error" not in p
            ]
            if got:
                r = max(got) / ort["resnet50"]["best_items_per_s"]
                lines.append(f"| `resnet50` {protocol} best >= {want}x in-process best batch | "
                             f"{r:.2f}x | {r >= want} |")  # fmt: skip
    p = _point(points, target="gateway", model="mlp", protocol="http", concurrency=64)
    if p is not None and "mlp" in ort:
        r = p["throughput"] / ort["mlp"]["best_items_per_s"]
        lines.append(f"| `mlp` c=64 binary >= 0.55x in-process best | {r:.2f}x | {r >= 0.55} |")
    for model in models:
        wins, total, worst_tp, worst_p99 = 0, 0, math.inf, 0.0
        for p in points:
            if p["target"] != "gateway" or p["model"] != model or "error" in p:
                continue
            t = _point(points, target="triton", model=model, protocol=p["protocol"],
                       concurrency=p["concurrency"])  # fmt: skip
            if t is None:
                continue
            total += 1
            tp, p99 = p["throughput"] / t["throughput"], p["p99_ms"] / t["p99_ms"]
            worst_tp, worst_p99 = min(worst_tp, tp), max(worst_p99, p99)
            wins += tp > 1 and p99 < 1
        if total:
            lines.append(
                f"| `{model}` vs Triton: higher throughput and lower p99 at every point | "
                f"{wins}/{total} points; worst throughput {worst_tp:.2f}x, worst p99 "
                f"{worst_p99:.2f}x | {wins == total} |"
            )
    for row in mem:
        gap = row["gateway_mb"] - row["session_mb"]
        lines.append(f"| `{row['model']}` RSS <= ORT session + 50 MB | +{row['gateway_mb']:.0f} "
                     f"vs +{row['session_mb']:.0f} MB ({gap:+.0f}) | {gap <= 50} |")  # fmt: skip
    return lines


def plot(points: list[dict[str, Any]], ort: dict[str, dict[str, Any]], model: str,
         path: Path) -> bool:  # fmt: skip
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for target in TARGETS:
        for protocol in PROTOCOLS:
            curve = sorted(
                (p for p in points if p["model"] == model and p["target"] == target
                 and p["protocol"] == protocol and "error" not in p),
                key=lambda p: p["concurrency"],
            )  # fmt: skip
            if not curve:
                continue
            style = "-o" if target == "gateway" else "--s"
            ax.plot([p["throughput"] for p in curve], [p["p99_ms"] for p in curve], style,
                    label=f"{target} {protocol} (p99)")  # fmt: skip
            for p in curve:
                ax.annotate(str(p["concurrency"]), (p["throughput"], p["p99_ms"]), fontsize=7)
    if model in ort:
        for q in ort[model]["points"]:
            ax.plot(q["items_per_s"], q["ms_per_run_median"], "k^")
        ax.plot([], [], "k^", label="in-process ORT, per batch size (run time)")
    ax.set_xlabel("items/s")
    ax.set_ylabel("latency ms (log)")
    ax.set_yscale("log")
    ax.set_title(f"{model}: latency vs throughput (labels: concurrency)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def render(data: dict[str, Any]) -> str:
    points, ort, mem = data["points"], data["in_process"], data["memory"]
    lines = [
        "# Sweep: gateway vs standalone Triton vs in-process ONNX Runtime",
        "",
        f"`{data['command']}`, {data['date']}. {data['machine']['nproc']} CPUs "
        f"({data['machine']['cpu']}), load average at start "
        f"{', '.join(f'{x:.1f}' for x in data['machine']['loadavg_at_start'])}. "
        "perf_analyzer shares the cores with the servers; this machine was shared with other "
        "work during the run, so figures are noisy: compare within one run only.",
        f"perf_analyzer windows {data['window_ms']} ms x 3 per point, batch 1 per request, "
        "`--input-data zero`. Triton: `tritonserver` (nvidia-pytriton build) running each "
        "model's ONNX file with ONNX Runtime in its python backend, the model's own config.",
        "",
        "## Goals (ratios from this run)",
        "",
        *goals(points, ort, mem, data["models"], data["protocols"]),
        "",
        "## In-process ONNX Runtime",
        "",
        "| model | best items/s | at batch | batch 1 p50 ms |",
        "|---|---:|---:|---:|",
    ]
    for name, o in ort.items():
        lines.append(f"| {name} | {o['best_items_per_s']:.1f} | {o['best_batch']} | "
                     f"{o['batch1_p50_ms']:.2f} |")  # fmt: skip
    for model in data["models"]:
        lines += [
            "",
            f"## `{model}`",
            "",
        ]
        if model in data.get("plots", []):
            lines += [f"![{model}](sweep-{model}.png)", ""]
        lines += [
            "| protocol | c | gateway /s | p50 ms | p99 ms | Triton /s | p50 ms | p99 ms | "
            "throughput vs Triton | p99 vs Triton | vs in-process best |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        best = ort.get(model, {}).get("best_items_per_s")
        for protocol in data["protocols"]:
            for c in data["levels"][model]:
                g = _point(points, target="gateway", model=model, protocol=protocol,
                           concurrency=c)  # fmt: skip
                t = _point(points, target="triton", model=model, protocol=protocol,
                           concurrency=c)  # fmt: skip
                if g is None and t is None:
                    continue
                gv = [g and g["throughput"], g and g["p50_ms"], g and g["p99_ms"]]
                tv = [t and t["throughput"], t and t["p50_ms"], t and t["p99_ms"]]
                lines.append(
                    f"| {protocol} | {c} | {_fmt(gv[0], '.1f')} | {_fmt(gv[1])} | {_fmt(gv[2])} "
                    f"| {_fmt(tv[0], '.1f')} | {_fmt(tv[1])} | {_fmt(tv[2])} "
                    f"| {_fmt(harness.ratio(gv[0], tv[0]), '.2f', 'x')} "
                    f"| {_fmt(harness.ratio(gv[2], tv[2]), '.2f', 'x')} "
                    f"| {_fmt(harness.ratio(gv[0], best), '.2f', 'x')} |"
                )
    errors = [p for p in points if "error" in p]
    if errors:
        lines += ["", "## Points that failed", ""]
        lines += [f"- {p['target']} {p['model']} {p['protocol']} c={p['concurrency']}: "
                  f"{p['error']}" for p in errors]  # fmt: skip
    if mem:
        lines += [
            "",
            "## Memory",
            "",
            "RSS gained by a gateway loading the model (a gateway serving `simple` and the model, "
            "against one serving `simple` alone, each after one request) and by a bare Python "
            "process creating an ORT session of the file and running it once.",
            "",
            "| model | file MB | gateway +MB | ORT session +MB | gateway - session |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in mem:
            lines.append(f"| {row['model']} | {row['file_mb']:.1f} | {row['gateway_mb']:.1f} | "
                         f"{row['session_mb']:.1f} | "
                         f"{row['gateway_mb'] - row['session_mb']:+.1f} |")  # fmt: skip
    cp = data.get("copies")
    if cp:
        lines += [
            "",
            "## Payload copies (`resnet50`)",
            "",
            f"A gateway under `tracemalloc` answers {data['copy_requests']} sequential batch-1 "
            "requests; the table gives the most memory traced (Python objects and numpy "
            "buffers; ORT's own arena is not traced) above the idle level during them, in "
            f"units of one request's input ({cp['payload_bytes']:,d} bytes). 1.0x: the body "
            "alone, decoded as a view and run in place.",
            "",
            "| transport | peak bytes above idle | in inputs |",
            "|---|---:|---:|",
        ]
        for name in ("http", "grpc"):
            lines.append(f"| {name} | {cp[name]['peak_extra_bytes']:,d} | "
                         f"{cp[name]['payloads']:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


# -- the driver -------------------------------------------------------------------------------


def _levels(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--traced":
        return run_traced(Path(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--concurrency", type=_levels, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument(
        "--heavy-concurrency",
        type=_levels,
        default=[1, 2, 4, 8],
        help="levels for resnet50 and bert_encoder (~0.1-0.2 s per item here)",
    )
    parser.add_argument("--window-ms", type=int, default=2000)
    parser.add_argument("--in-process-s", type=float, default=1.5)
    parser.add_argument("--copy-requests", type=int, default=20)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-copies", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="errors only: c=1,4,16 (heavy c=1,2), 500 ms windows"
    )
    parser.add_argument("--out-dir", type=Path, default=harness.RESULTS)
    args = parser.parse_args()  # fmt: skip
    if args.quick:
        args.concurrency, args.heavy_concurrency = [1, 4, 16], [1, 2]
        args.window_ms, args.in_process_s, args.copy_requests = 500, 0.3, 3
    models = [m for m in args.models.split(",") if m]
    protocols = [p for p in args.protocols.split(",") if p]
    targets = [t for t in args.targets.split(",") if t]
    levels = {m: args.heavy_concurrency if m in HEAVY else args.concurrency for m in models}
    data: dict[str, Any] = {
        "command": " ".join(["python bench/sweep.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": harness.machine_info(),
        "models": models, "protocols": protocols, "levels": levels,
        "window_ms": args.window_ms, "copy_requests": args.copy_requests,
        "points": [], "memory": [], "copies": None,
    }  # fmt: skip
    pa = perf_analyzer()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work = Path(tmp)
        (work / "repo").mkdir()
        repo = build_repo(work / "repo", models)
        data["in_process"] = in_process(repo, models, args.in_process_s)
        if "gateway" in targets:
            grpc_port = harness.free_port()
            env = {"GATEWAY_LOAD_MODELS": ",".join(models), "GATEWAY_GRPC_PORT": str(grpc_port)}
            gw = harness.start_gateway(repo, work, "--log-level", "warning", env=env,
                                       tag="sweep", ready=tuple(models))  # fmt: skip
            try:
                wanted = [p for p in protocols if p != "shm" or has_shm(gw.url)]
                urls = {"http": gw.address, "grpc": f"127.0.0.1:{grpc_port}"}
                data["points"] += sweep_target(pa, "gateway", urls, repo, models, levels,
                                               wanted, args.window_ms, work)  # fmt: skip
            finally:
                gw.stop()
        if "triton" in targets:
            from gateway.testing.tritonserver import TritonServer

            with TritonServer(startup_timeout_s=120.0) as triton:
                push_to_triton(triton.http_url, repo, models)
                wanted = [p for p in protocols if p != "shm" or has_shm(triton.http_url)]
                urls = {"http": triton.http_address, "grpc": triton.grpc_url}
                data["points"] += sweep_target(pa, "triton", urls, repo, models, levels,
                                               wanted, args.window_ms, work)  # fmt: skip
        if not args.no_memory:
            data["memory"] = memory(repo, models, work)
        if not args.no_copies and "resnet50" in models:
            data["copies"] = copies(repo, "resnet50", work, args.copy_requests)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data["plots"] = [m for m in models if plot(data["points"], data["in_process"], m,
                                                args.out_dir / f"sweep-{m}.png")]  # fmt: skip
    text = render(data)
    print(text)
    harness.write_results(args.out_dir / "sweep.md", text, data)
    return 1 if any("error" in p for p in data["points"]) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
