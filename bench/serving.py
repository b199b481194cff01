"""Serving-core benchmark: the gateway under load against ONNX Runtime in-process.

Run (from the repository root, with the project's virtual environment)::

    python bench/serving.py                      # ~2.5 minutes with the defaults
    python bench/serving.py --duration-s 10 --connections 64 --intra-op-threads 0

Needs ``wrk`` on PATH (Debian/Ubuntu: ``apt-get install -y wrk``). ``--py-spy`` also needs
``pip install py-spy``.

One run does three things:

1. the in-process limit: ``InferenceSession.run`` in a loop (no HTTP, no asyncio) for every batch
   size up to the model's ``max_batch_size``; the best items/s is the baseline;
2. the gateway, started twice as a subprocess on a free loopback port: batching ON (the shipped
   ``model_repo``) and batching OFF (a temporary copy whose ``mlp`` / ``simple`` configs have their
   ``dynamic_batching`` block removed, so every request runs alone); each is driven by ``wrk`` at a
   fixed concurrency, one item per request, binary-tensor bodies (and JSON bodies for ``mlp``);
3. a table of req/s, items/s, p50/p99, errors, average batch size (from the gateway's statistics
   endpoint), the ratio to the in-process limit and the batching on/off ratio, printed and written
   to ``bench/results/serving.md`` and ``bench/results/serving.json``.

The goal it reports against: ``mlp`` with 64 concurrent single-item clients and batching on reaches
at least 0.6x the in-process best-batch items/s, and at least 2x batching off.

Every process it starts (gateways, wrk, py-spy) is stopped on exit, Ctrl-C and errors included.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    MODELS,
    ROOT,
    CpuWindow,
    Gateway,
    Model,
    batch_sizes,
    binary_body,
    check_response,
    copy_repo,
    gateway,
    http,
    json_body,
    lua_script,
    machine_info,
    measure_in_process,
    read_model,
    run_wrk,
    stop,
    wrk_figures,
)

GOAL_VS_INPROC = 0.6
GOAL_ON_OFF = 2.0


# -- 1. in-process limit ----------------------------------------------------------------------


def in_process_limit(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The best items/s over every thread setting, batch size and pass: the in-process limit."""
    top = max(points, key=lambda p: p["items_per_s"])
    return {
        "points": points,
        "best_items_per_s": top["items_per_s"],
        "best_batch": top["batch"],
        "best_threads": top["threads"],
    }


# -- py-spy (optional) ------------------------------------------------------------------------


def top_functions(collapsed: Path, limit: int = 15) -> list[dict[str, Any]]:
    """Self and inclusive sample shares per function from py-spy's collapsed-stack output."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r"\s*\(.*?/([^/]+:\d+)\)$", r" (\1)", f) for f in stack.split(";")]
        frames = [re.sub(r":\d+\)$", ")", f) for f in frames]
        total += count
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + count
        for frame in set(frames):
            incl_n[frame] = incl_n.get(frame, 0) + count
    rows = [
        {"function": f, "self_pct": 100 * n / total, "incl_pct": 100 * incl_n[f] / total}
        for f, n in sorted(self_n.items(), key=lambda kv: -kv[1])[:limit]
    ]
    return rows


# -- 3. the run -------------------------------------------------------------------------------


@dataclass
class Point:
    scenario: str
    model: str
    batching: str
    body: str
    connections: int
    req_per_s: float
    items_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    avg_batch: float
    vs_in_process: float
    on_off: float | None = None
    exec_ms: float = 0.0  # mean backend execution time per batch (gateway statistics)
    queue_ms: float = 0.0  # mean time a request waited in the batcher queue
    cpu: dict[str, float] = field(default_factory=dict)
    wrk: dict[str, Any] = field(default_factory=dict)


def render_markdown(result: dict[str, Any]) -> str:
    info, args = result["machine"], result["args"]
    lines = [
        "# Serving-core benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}  ",
        f"Machine: {info['nproc']} CPUs, {info['cpu']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in info['loadavg_at_start'])}  ",
        f"Software: Python {info['python']}, onnxruntime {info['onnxruntime']}, {info['wrk']}  ",
        f"Load: wrk -t{args['threads']} -c{args['connections']}, {args['duration_s']} s per point "
        f"after {args['warmup_s']} s warm-up, one item per request; "
        "wrk runs on the same machine.  ",
        f"Gateway environment: `{result['gateway_env'] or '(defaults)'}`",
        "",
        "## In-process ONNX Runtime (no HTTP), items/s per batch size",
        "",
    ]
    for name, ip in result["in_process"].items():
        lines.append(
            f"- **{name}**: limit {ip['best_items_per_s']:.0f} items/s at batch "
            f"{ip['best_batch']}, intra_op_threads {ip['best_threads']}"
        )
        for threads in sorted({p["threads"] for p in ip["points"]}):
            cells = ", ".join(
                f"b{p['batch']}{' again' if p.get('recheck') else ''}: {p['items_per_s']:.0f}"
                for p in ip["points"]
                if p["threads"] == threads
            )
            lines.append(f"  - threads {threads}: {cells}")
    lines += ["", "## Through the gateway", "", *table(result["points"], markdown=True), ""]
    lines += [
        "## Where the time and CPU went (same runs)",
        "",
        "exec ms: mean backend execution per batch, from the gateway's statistics (includes the "
        "hop to the ORT worker thread). Cores: CPU seconds per wall second during the measured "
        "run; loop = the gateway's main (event-loop) thread, workers = its other threads (ORT), "
        "machine = every process on the machine, other tenants included.",
        "",
        *cpu_table(result["points"]),
        "",
    ]
    if result.get("paired"):
        lines += [
            "## Paired rounds: in-process best batch, then the gateway at once",
            "",
            "Each round measures in-process ONNX Runtime at its best batch size and then the "
            "gateway (mlp, binary, batching ON), back to back and for as long, so both see the "
            "machine at the same speed. The goal's in-process figure is its best of three "
            "slices; the window mean is its whole window, counted as wrk counts the gateway's.",
            "",
            "| round | in-process items/s (best slice) | in-process window mean | gateway items/s "
            "| ratio | ratio to window mean | errors |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            *(
                f"| {r['round']} | {r['in_process_items_per_s']:.0f} | "
                f"{r['in_process_mean_items_per_s']:.0f} | "
                f"{r['gateway_items_per_s']:.0f} | {r['ratio']:.3f} | "
                f"{r['ratio_to_mean']:.3f} | {r['errors']} |"
                for r in result["paired"]
            ),
            "",
        ]
    lines += ["## Goal", ""]
    lines += [f"- {g}" for g in result["goals"]]
    if result.get("profile"):
        lines += ["", "## py-spy, gateway during `mlp` binary batching ON", ""]
        lines += ["| function | self % | inclusive % |", "|---|---:|---:|"]
        lines += [
            f"| `{r['function']}` | {r['self_pct']:.1f} | {r['incl_pct']:.1f} |"
            for r in result["profile"]
        ]
    return "\n".join(lines) + "\n"


def table(points: list[dict[str, Any]], markdown: bool = False) -> list[str]:
    head = [
        "scenario", "req/s", "items/s", "p50 ms", "p99 ms", "errors", "avg batch",
        "x in-process", "on/off",
    ]  # fmt: skip
    rows = [
        [
            p["scenario"],
            f"{p['req_per_s']:.0f}",
            f"{p['items_per_s']:.0f}",
            f"{p['p50_ms']:.2f}",
            f"{p['p99_ms']:.2f}",
            str(p["errors"]),
            f"{p['avg_batch']:.1f}",
            f"{p['vs_in_process']:.3g}",
            f"{p['on_off']:.2f}" if p["on_off"] is not None else "",
        ]
        for p in points
    ]
    if markdown:
        return [
            "| " + " | ".join(head) + " |",
            "|---" + "|---:" * (len(head) - 1) + "|",
            *("| " + " | ".join(r) + " |" for r in rows),
        ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*head), *(fmt.format(*r) for r in rows)]


def cpu_table(points: list[dict[str, Any]]) -> list[str]:
    head = [
        "scenario", "exec ms/batch", "queue ms", "loop cores", "workers cores", "wrk cores",
        "machine busy cores", "loop CPU ms/req", "workers CPU ms/item",
    ]  # fmt: skip
    rows = [
        [
            p["scenario"],
            f"{p['exec_ms']:.2f}",
            f"{p['queue_ms']:.2f}",
            f"{p['cpu']['loop_cores']:.2f}",
            f"{p['cpu']['workers_cores']:.2f}",
            f"{p['cpu']['wrk_cores']:.2f}",
            f"{p['cpu']['machine_busy_cores']:.2f} of {p['cpu']['machine_cores']:.1f}",
            f"{p['cpu']['loop_ms_per_request']:.3f}",
            f"{p['cpu']['workers_ms_per_item']:.3f}",
        ]
        for p in points
    ]
    return [
        "| " + " | ".join(head) + " |",
        "|---" + "|---:" * (len(head) - 1) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def scenarios(only: list[str] | None) -> list[tuple[str, str]]:
    """(model, body kind) pairs; JSON bodies for mlp only."""
    all_ = [("mlp", "binary"), ("mlp", "json"), ("simple", "binary")]
    return [s for s in all_ if not only or s[0] in only]


def run(args: argparse.Namespace) -> dict[str, Any]:
    repo = Path(args.model_repo).resolve()
    models = {name: read_model(repo, name) for name in MODELS}
    gateway_env = {}
    if args.intra_op_threads is not None:
        gateway_env["GATEWAY_INTRA_OP_THREADS"] = str(args.intra_op_threads)
    inherited = {k: v for k, v in os.environ.items() if k.startswith("GATEWAY_")}
    result: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "args": vars(args),
        "gateway_env": " ".join(f"{k}={v}" for k, v in {**inherited, **gateway_env}.items()),
    }
    intra = args.intra_op_threads or int(os.environ.get("GATEWAY_INTRA_OP_THREADS", "0"))

    # ORT's default thread count and the gateway's setting; the limit is the best of both.
    thread_settings = sorted({0, intra})
    print(f"in-process ONNX Runtime, intra_op_threads {thread_settings} (0: ORT's default) ...")
    chosen = {name: m for name, m in models.items() if not args.models or name in args.models}
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
    for name, m in chosen.items():
        for threads in thread_settings:
            sizes = batch_sizes(m.max_batch_size)
            measured[name] += measure_in_process(repo, m, threads, args.in_process_s, sizes)
            cells = ", ".join(
                f"b{p['batch']}={p['items_per_s']:.0f}"
                for p in measured[name]
                if p["threads"] == threads
            )
            print(f"  {name} threads={threads}: {cells}", flush=True)

    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        workdir = Path(tmp)
        repos = {
            "on": copy_repo(repo, workdir / "repo-on", True, args.instance_count),
            "off": copy_repo(repo, workdir / "repo-off", False, args.instance_count),
        }
        bodies = {
            (m, kind): (binary_body if kind == "binary" else json_body)(models[m])
            for m, kind in scenarios(args.models)
        }
        for batching in ("on", "off"):
            print(f"gateway, batching {batching.upper()} ...", flush=True)
            with gateway(repos[batching], gateway_env, workdir, batching) as gw:
                for (model_name, kind), body in bodies.items():
                    model = models[model_name]
                    url = f"{gw.url}/v2/models/{model_name}/infer"
                    status, raw, headers = http(url, body.data, body.headers)
                    if status != 200:
                        raise RuntimeError(f"{model_name} {kind}: HTTP {status}: {raw[:300]!r}")
                    check_response(raw, headers, model)
                    tag = f"{model_name}-{kind}-{batching}"
                    script = lua_script(body, workdir, tag)
                    if args.warmup_s > 0:
                        run_wrk(url, script, args.connections, args.threads, args.warmup_s)
                    before = gw.stats(model_name)
                    spy = None
                    if args.py_spy and (model_name, kind, batching) == ("mlp", "binary", "on"):
                        spy = start_py_spy(gw.proc.pid, workdir / "pyspy.txt", args.duration_s)
                    try:
                        with CpuWindow(gw.proc.pid) as cpu:
                            out = run_wrk(
                                url, script, args.connections, args.threads, args.duration_s
                            )
                    finally:
                        if spy is not None:
                            finish_py_spy(spy, workdir / "pyspy.txt", result)
                    after = gw.stats(model_name)
                    points.append(
                        make_point(out, before, after, model_name, kind, batching, args, cpu)
                    )
                    p = points[-1]
                    print(
                        f"  {p.scenario}: {p.req_per_s:.0f} req/s, p50 {p.p50_ms:.2f} ms, "
                        f"p99 {p.p99_ms:.2f} ms, errors {p.errors}, avg batch {p.avg_batch:.1f}, "
                        f"exec {p.exec_ms:.1f} ms/batch; CPU cores: loop "
                        f"{p.cpu['loop_cores']:.2f}, ORT+workers {p.cpu['workers_cores']:.2f}, "
                        f"wrk {p.cpu['wrk_cores']:.2f}, machine {p.cpu['machine_busy_cores']:.2f}",
                        flush=True,
                    )
                if batching == "on" and args.paired_rounds and ("mlp", "binary") in bodies:
                    result["paired"] = paired_rounds(
                        args, repo, models["mlp"], measured["mlp"], gw, workdir
                    )
            if gw.proc.returncode not in (0, None, -signal.SIGTERM):
                print(f"  note: gateway exited with {gw.proc.returncode}", flush=True)

    # The machine is shared: measure the best batch sizes again now, keep the best of both passes.
    print("in-process ONNX Runtime again, best batch size per thread setting ...", flush=True)
    for name, m in chosen.items():
        for threads in thread_settings:
            mine = [p for p in measured[name] if p["threads"] == threads]
            best = max(mine, key=lambda p: p["items_per_s"])["batch"]
            again = measure_in_process(repo, m, threads, args.in_process_s, [best])
            measured[name] += [{**p, "recheck": True} for p in again]
    in_process = {name: in_process_limit(points) for name, points in measured.items()}
    for name, ip in in_process.items():
        print(
            f"  {name}: in-process limit {ip['best_items_per_s']:.0f} items/s "
            f"(batch {ip['best_batch']}, threads {ip['best_threads']})",
            flush=True,
        )
    result["in_process"] = in_process
    for p in points:
        limit = in_process[p.model]["best_items_per_s"]
        p.vs_in_process = p.items_per_s / limit
        if p.batching == "on":
            off = next(
                (q for q in points if (q.model, q.body, q.batching) == (p.model, p.body, "off")),
                None,
            )
            if off is not None and off.items_per_s > 0:
                p.on_off = p.items_per_s / off.items_per_s
    result["points"] = [asdict(p) for p in points]
    result["goals"] = goals(points, result.get("paired", []))
    return result


def paired_rounds(
    args: argparse.Namespace,
    repo: Path,
    model: Model,
    measured: list[dict[str, Any]],
    gw: Gateway,
    workdir: Path,
) -> list[dict[str, Any]]:
    """The goal's ratio measured in adjacent pairs: in-process ONNX Runtime at its best batch
    size, then at once the gateway (mlp, binary, batching ON) for as long, ``--paired-rounds``
    times. The machine is shared and its speed drifts by tens of percent within a run; a limit
    taken as the best of many passes and set against one gateway run minutes away measures the
    drift as much as the gateway. Each pair sees the same machine."""
    best = max(measured, key=lambda p: p["items_per_s"])
    url = f"{gw.url}/v2/models/{model.name}/infer"
    script = workdir / f"{model.name}-binary-on.lua"
    rounds = []
    print(f"paired rounds: in-process b{best['batch']} then the gateway ...", flush=True)
    for number in range(1, args.paired_rounds + 1):
        limit = measure_in_process(repo, model, best["threads"], args.duration_s, [best["batch"]])
        out = run_wrk(url, script, args.connections, args.threads, args.duration_s)
        served, errors = wrk_figures(out)
        rounds.append(
            {
                "round": number,
                "in_process_items_per_s": limit[0]["items_per_s"],
                "in_process_mean_items_per_s": limit[0]["items_per_s_mean"],
                "gateway_items_per_s": served,
                "ratio": served / limit[0]["items_per_s"],
                "ratio_to_mean": served / limit[0]["items_per_s_mean"],
                "errors": errors,
            }
        )
        r = rounds[-1]
        print(
            f"  round {number}: in-process {r['in_process_items_per_s']:.0f}, gateway "
            f"{served:.0f} items/s = {r['ratio']:.3f}x, errors {errors}",
            flush=True,
        )
    return rounds


def make_point(
    out: dict[str, Any],
    before: dict[str, Any],
    after: dict[str, Any],
    model: str,
    kind: str,
    batching: str,
    args: argparse.Namespace,
    cpu: CpuWindow,
) -> Point:
    seconds = out["duration_us"] / 1e6
    req_per_s, errors = wrk_figures(out)
    executions = after["execution_count"] - before["execution_count"]
    items = after["inference_count"] - before["inference_count"]
    stats_a, stats_b = before["inference_stats"], after["inference_stats"]
    exec_ns = stats_b["compute_infer"]["ns"] - stats_a["compute_infer"]["ns"]
    queue = {k: stats_b["queue"][k] - stats_a["queue"][k] for k in ("count", "ns")}
    requests = max(1, out["requests"])
    return Point(
        scenario=f"{model} {kind} batching {batching.upper()}",
        model=model,
        batching=batching,
        body=kind,
        connections=args.connections,
        req_per_s=req_per_s,
        items_per_s=req_per_s,  # one item per request
        p50_ms=out["p50_us"] / 1e3,
        p90_ms=out["p90_us"] / 1e3,
        p99_ms=out["p99_us"] / 1e3,
        errors=errors,
        avg_batch=items / executions if executions else 0.0,
        vs_in_process=0.0,
        exec_ms=exec_ns / executions / 1e6 if executions else 0.0,
        queue_ms=queue["ns"] / queue["count"] / 1e6 if queue["count"] else 0.0,
        cpu={
            "seconds": seconds,
            "loop_cores": cpu.loop_s / seconds,
            "workers_cores": cpu.workers_s / seconds,
            "wrk_cores": cpu.wrk_s / seconds,
            "machine_busy_cores": cpu.machine_busy_s / seconds,
            "machine_cores": cpu.machine_total_s / seconds,
            "loop_ms_per_request": cpu.loop_s / requests * 1e3,
            "workers_ms_per_item": cpu.workers_s / requests * 1e3,
        },
        wrk=out,
    )


def goals(points: list[Point], paired: list[dict[str, Any]]) -> list[str]:
    lines = []
    on = next((p for p in points if (p.model, p.body, p.batching) == ("mlp", "binary", "on")), None)
    if on is not None:
        ok = on.vs_in_process >= GOAL_VS_INPROC
        lines.append(
            f"mlp binary batching ON = {on.vs_in_process:.2f}x in-process best-batch items/s, "
            f"the best of every pass (goal >= {GOAL_VS_INPROC}): {'MET' if ok else 'MISSED'}"
        )
    if paired:
        median = statistics.median(r["ratio"] for r in paired)
        ok = median >= GOAL_VS_INPROC
        each = ", ".join(f"{r['ratio']:.2f}" for r in paired)
        lines.append(
            f"mlp binary batching ON / in-process best batch, paired rounds: median "
            f"{median:.2f}x ({each}) (goal >= {GOAL_VS_INPROC}): {'MET' if ok else 'MISSED'}"
        )
        to_mean = statistics.median(r["ratio_to_mean"] for r in paired)
        lines.append(
            f"the same rounds against in-process's whole-window mean, like for like (the "
            f"verdict above uses its best slice): median {to_mean:.2f}x"
        )
    if on is not None:
        if on.on_off is not None:
            ok = on.on_off >= GOAL_ON_OFF
            lines.append(
                f"mlp binary batching ON / OFF = {on.on_off:.2f}x (goal >= {GOAL_ON_OFF}): "
                f"{'MET' if ok else 'MISSED'}"
            )
    errors = sum(p.errors for p in points) + sum(r["errors"] for r in paired)
    lines.append(f"errors (non-2xx, socket, timeouts) over all points: {errors} (must be 0)")
    return lines


def py_spy_path() -> str | None:
    """py-spy on PATH or next to this interpreter (a virtual environment's bin/)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def start_py_spy(pid: int, out: Path, seconds: float) -> subprocess.Popen[Any]:
    cmd = [
        py_spy_path() or "py-spy", "record", "--pid", str(pid), "--format", "raw",
        "--output", str(out),
        "--duration", str(max(1, round(seconds))), "--rate", "200", "--threads", "--nonblocking",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finish_py_spy(spy: subprocess.Popen[Any], out: Path, result: dict[str, Any]) -> None:
    try:
        spy.wait(timeout=30)
    except subprocess.TimeoutExpired:
        stop(spy)
    if out.exists():
        result["profile"] = top_functions(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=10.0, help="wrk time per point [10]")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="wrk warm-up per point [2]")
    parser.add_argument("--connections", type=int, default=64, help="wrk -c [64]")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t [1]")
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=5,
        help="rounds of in-process best batch then gateway mlp binary ON, back to back [5]",
    )
    parser.add_argument(
        "--in-process-s", type=float, default=1.5, help="seconds per in-process batch size [1.5]"
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=None,
        help="ONNX Runtime intra-op threads for both the in-process run and the gateway "
        "(GATEWAY_INTRA_OP_THREADS); default: inherit, 0 = ORT's default",
    )
    parser.add_argument(
        "--instance-count",
        type=int,
        default=None,
        help="rewrite instance_group.count of the benchmarked models (default: as shipped)",
    )
    parser.add_argument("--models", nargs="*", choices=MODELS, help="only these models")
    parser.add_argument("--model-repo", default=str(ROOT / "model_repo"))
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument(
        "--py-spy", action="store_true", help="profile the gateway during mlp binary batching ON"
    )
    args = parser.parse_args()

    if shutil.which("wrk") is None:
        print(
            "wrk not found on PATH. Install it: apt-get install -y wrk (Debian/Ubuntu), "
            "brew install wrk (macOS).",
            file=sys.stderr,
        )
        return 2
    if args.py_spy and py_spy_path() is None:
        print("--py-spy needs py-spy: pip install py-spy", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so the context managers stop what we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = run(args)
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        return 130

    print()
    print("\n".join(table(result["points"])))
    print()
    print("\n".join(result["goals"]))
    if result.get("profile"):
        print("\npy-spy (gateway, mlp binary batching ON), by self time:")
        for r in result["profile"]:
            print(f"  {r['self_pct']:5.1f}% self {r['incl_pct']:5.1f}% incl  {r['function']}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving.md").write_text(render_markdown(result))
    (out_dir / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out_dir / 'serving.md'} and {out_dir / 'serving.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
