"""Where a heavy model's throughput goes between in-process ONNX Runtime and the gateway
(issue 21): per point, what reaches ``session.run`` and who takes the cores.

One gateway serves the model (``resnet50`` by default, built by ``scripts/build_models.py
--heavy``); each round measures, one right after the other:

1. **in-process** ``session.run`` at each batch size (``--in-process``), the session set up as
   the gateway sets it up for this model (its thread count; no spinning), with ONNX Runtime's
   defaults (spinning: the sweep's reference), and as one-thread sessions side by side, one per
   core (``2x1`` on 2 cores: what ``instance_group { count: 2 }`` with ``intra_op_thread_count``
   1 would run), items/s and CPU per item;
2. **the gateway under perf_analyzer** at each concurrency over each protocol: throughput and
   p50; the batch sizes that reached ``session.run`` (statistics extension, ``batch_stats``);
   how much of the window the runner spent in runs (the sum of the batches' compute over the
   wall time: the rest is the runner idle between batches, or perf_analyzer starting and
   stopping); CPU per item of the event loop's thread, of the other threads (ORT's calling
   thread and its pool), and of perf_analyzer itself.

Ratios are to the same round's in-process best (the machine's speed drifts between rounds).

    .venv/bin/python bench/cnn_gap.py --repo bench/out/models --out bench/results/cnn_gap.md
    .venv/bin/python bench/cnn_gap.py --quick --out /tmp/gap.md     # errors only (~1 min)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import harness

POLL_S = 0.2  # how often the statistics are read while perf_analyzer runs


def _levels(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def batch_stats(address: str, model: str) -> dict[int, tuple[int, int]]:
    """batch size -> (executions, ns in them: input + infer + output) so far."""
    with urllib.request.urlopen(f"http://{address}/v2/models/{model}/stats", timeout=10) as r:
        stats = json.loads(r.read())["model_stats"][0]
    out = {}
    for b in stats["batch_stats"]:
        ns = sum(int(b[k]["ns"]) for k in ("compute_input", "compute_infer", "compute_output"))
        out[int(b["batch_size"])] = (int(b["compute_infer"]["count"]), ns)
    return out


def sessions(repo: Path, model: harness.Model, threads: int) -> dict[str, list[Any]]:
    """The in-process session layouts: one session as the gateway loads a model that does not
    spin; ORT's defaults (what ``harness.measure_in_process`` and the sweep measure); and as
    many one-thread sessions as the first has threads, run side by side (``instance_group``
    count ``threads`` with ``intra_op_thread_count`` 1: no thread of a run waits for another)."""
    import onnxruntime as ort

    path = str(repo / model.name / "1" / "model.onnx")

    def session(threads: int, spin: bool) -> Any:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:
            options.intra_op_num_threads = threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    found = {"gateway": [session(threads, False)], "ort-default": [session(0, True)]}
    if threads > 1:
        found[f"{threads}x1"] = [session(1, False) for _ in range(threads)]
    return found


def _drive(
    session: Any,
    outputs: list[str],
    feeds: dict[str, Any],
    until: float,
    durations: list[float],
    counts: list[int],
) -> None:
    """Run ``session`` until ``until`` (twice at least), recording each run's duration."""
    runs = 0
    while runs < 2 or time.perf_counter() < until:
        t0 = time.perf_counter()
        session.run(outputs, feeds)
        durations.append(time.perf_counter() - t0)
        runs += 1
    counts.append(runs)


def in_process(
    model: harness.Model, found: dict[str, list[Any]], sizes: list[int], seconds: float
) -> list[dict[str, Any]]:
    """items/s (over the whole window) and CPU ms per item at each batch size, per layout (its
    sessions each driven by a thread of its own)."""
    outputs = list(model.outputs)
    points = []
    for batch in sizes:
        feeds = harness.sample_inputs(model, batch)
        for name, group in found.items():
            for session in group:
                session.run(outputs, feeds)
            durations: list[float] = []
            counts: list[int] = []
            before = resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            workers = [
                threading.Thread(
                    target=_drive,
                    args=(session, outputs, feeds, started + seconds, durations, counts),
                )
                for session in group
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            wall = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            runs = sum(counts)
            points.append({
                "session": name, "batch": batch, "items_per_s": runs * batch / wall,
                "cpu_ms_per_item": cpu / (runs * batch) * 1e3,
                "run_p50_ms": statistics.median(durations) * 1e3,
            })  # fmt: skip
    return points


def gateway_point(
    pa: str,
    gw: harness.Gateway,
    grpc_port: int,
    repo: Path,
    model: harness.Model,
    protocol: str,
    c: int,
    window_ms: int,
    work: Path,
    poll_cpu_s: float = 0.0,
) -> dict[str, Any]:
    """One perf_analyzer point; ``poll_cpu_s``: the event loop's CPU per statistics read
    (``poll_cost``), taken off its CPU per item for the reads this point made."""
    report = work / f"pa-{time.monotonic_ns()}.csv"
    url = f"127.0.0.1:{grpc_port}" if protocol == "grpc" else gw.address
    cmd = [
        pa, "-m", model.name, "-u", url, "-i", "grpc" if protocol == "grpc" else "http",
        "--concurrency-range", str(c), "-p", str(window_ms), "-s", "999", "-r", "3",
        "--input-data", "zero", "-f", str(report),
    ]  # fmt: skip
    if protocol == "shm":
        import sweep  # its output-size reader (sweep imports build_models from scripts/)

        out_bytes = sweep.output_bytes(model, repo)
        cmd += ["--shared-memory", "system", "--output-shared-memory-size", str(out_bytes)]
    pid = gw.proc.pid
    stats0, threads0 = batch_stats(gw.address, model.name), harness.thread_cpu_s(pid)
    load = os.getloadavg()[0]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # Batch ends seen while perf_analyzer runs (the statistics polled): the runner's busy share
    # between the first and the last seen, perf_analyzer's start and stop left out.
    ends: list[tuple[float, int, int]] = []
    polls = 0
    deadline = started + 60 + 8 * window_ms / 1000
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            raise RuntimeError("perf_analyzer timed out")
        now = time.monotonic()
        seen = batch_stats(gw.address, model.name)
        polls += 1
        runs, ns = sum(n for n, _ in seen.values()), sum(ns for _, ns in seen.values())
        if not ends or runs != ends[-1][1]:
            ends.append((now, runs, ns))
        time.sleep(POLL_S)
    output = proc.stdout.read() if proc.stdout else b""
    wall = time.monotonic() - started
    stats1, threads1 = batch_stats(gw.address, model.name), harness.thread_cpu_s(pid)
    if proc.returncode != 0 or not report.exists():
        raise RuntimeError(f"perf_analyzer failed: {output.decode()[-600:]}")
    with report.open() as f:
        row = next(csv.DictReader(f))
    sizes, busy_ns, items = {}, 0, 0
    for size, (n, ns) in stats1.items():
        n0, ns0 = stats0.get(size, (0, 0))
        if n > n0:
            sizes[size] = n - n0
            busy_ns += ns - ns0
            items += size * (n - n0)
    deltas = {t: s - threads0.get(t, 0.0) for t, s in threads1.items()}
    per_item = 1e3 / max(1, items)
    return {
        "protocol": protocol, "concurrency": c,
        "throughput": float(row["Inferences/Second"]), "p50_ms": int(row["p50 latency"]) / 1e3,
        "batches": dict(sorted(sizes.items())),
        "mean_batch": items / max(1, sum(sizes.values())),
        "runner_busy": busy_ns / 1e9 / wall,
        "runner_busy_steady": steady(ends[1:]),
        "loop_cpu_ms": max(0.0, deltas.get(pid, 0.0) - (polls + 2) * poll_cpu_s) * per_item,
        "poll_cpu_ms": (polls + 2) * poll_cpu_s * per_item,
        "ort_cpu_ms": sum(v for t, v in deltas.items() if t != pid) * per_item,
        "load": load,
    }  # fmt: skip


def one_thread_repo(repo: Path, name: str, work: Path, layout: str) -> Path:
    """A repository serving ``name`` as ``layout`` ``Nx1``: its config with ``instance_group``
    count N and ``intra_op_thread_count`` 1 (the ONNX file linked, not copied)."""
    count = int(layout.removesuffix("x1"))
    dest = work / f"repo-{layout}" / name
    dest.mkdir(parents=True)
    for entry in (repo / name).iterdir():
        if entry.name != "config.pbtxt":
            (dest / entry.name).symlink_to(entry.resolve(), entry.is_dir())
    text = re.sub(r"instance_group\s*\{[^}]*\}", "", (repo / name / "config.pbtxt").read_text())
    text += (
        f"\ninstance_group {{\n  count: {count}\n  kind: KIND_CPU\n}}\n"
        'parameters {\n  key: "intra_op_thread_count"\n  value: { string_value: "1" }\n}\n'
    )
    (dest / "config.pbtxt").write_text(text)
    return dest.parent


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` (0.0 when unreadable)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def poll_cost(gw: harness.Gateway, model: str, reads: int = 200) -> float:
    """The event loop's CPU seconds per statistics read, on the idle gateway."""
    pid = gw.proc.pid
    before = harness.thread_cpu_s(pid).get(pid, 0.0)
    for _ in range(reads):
        batch_stats(gw.address, model)
    return (harness.thread_cpu_s(pid).get(pid, 0.0) - before) / reads


def steady(ends: list[tuple[float, int, int]]) -> float | None:
    """The runner's busy share between the first and the last batch end seen (each seen within
    ``POLL_S`` of when it happened): compute of the batches that ended in between over the time
    between. None with fewer than three ends."""
    if len(ends) < 3:
        return None
    (t0, _, ns0), (t1, _, ns1) = ends[0], ends[-1]
    return (ns1 - ns0) / 1e9 / (t1 - t0)


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def render(data: dict[str, Any]) -> str:
    lines = [
        f"# Where `{data['model']}` goes through the gateway (`bench/cnn_gap.py`)",
        "",
        f"`{data['command']}`, {data['date']}. {data['machine']['nproc']} CPUs, load average "
        f"at start {data['machine']['loadavg_at_start'][0]:.1f}; perf_analyzer and the gateway "
        "share the cores (and the machine is shared with other work: compare within a round).",
        "",
        "## In-process `session.run` (per round)",
        "",
        "| round | session | batch | items/s | vs batch max | CPU ms/item | run p50 ms |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r, rnd in enumerate(data["rounds"]):
        top = {p["session"]: p for p in rnd["in_process"] if p["batch"] == max(data["sizes"])}
        for p in rnd["in_process"]:
            vs = p["items_per_s"] / top[p["session"]]["items_per_s"]
            lines.append(
                f"| {r + 1} | {p['session']} | {p['batch']} | {p['items_per_s']:.2f} | "
                f"{vs:.2f}x | {p['cpu_ms_per_item']:.1f} | {p['run_p50_ms']:.1f} |"
            )
    lines += [
        "",
        "## The gateway under perf_analyzer",
        "",
        "Ratios to the same round's best in-process items/s of the gateway's session options "
        "(`vs in-process`) and of ORT's defaults (`vs ORT default`). `runner busy`: the batches' "
        "compute over the window's wall time (perf_analyzer's start and stop included); `steady`: "
        "the same between the first and the last batch end seen while it ran (ends polled "
        f"every {POLL_S * 1e3:.0f} ms; the first one after the start left out). CPU per "
        "item: the event loop's thread (less what the statistics reads cost it, "
        f"{data.get('poll_cpu_ms', 0.0):.2f} ms each on the idle gateway), every other gateway "
        "thread (ORT's calling thread and its pool), perf_analyzer.",
        "",
        "| round | layout | protocol | c | items/s | vs in-process | vs ORT default | p50 ms | "
        "batches (size: count) | runner busy | steady | loop ms | ORT ms | perf_analyzer ms | "
        "load |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r, rnd in enumerate(data["rounds"]):
        best = {
            s: max(p["items_per_s"] for p in rnd["in_process"] if p["session"] == s)
            for s in ("gateway", "ort-default")
        }
        for p in rnd["gateway"]:
            hist = ", ".join(f"{k}: {v}" for k, v in p["batches"].items())
            lines.append(
                f"| {r + 1} | {p.get('layout', 'config')} | {p['protocol']} | {p['concurrency']} | "
                f"{p['throughput']:.2f} | "
                f"{p['throughput'] / best['gateway']:.2f}x | "
                f"{p['throughput'] / best['ort-default']:.2f}x | {p['p50_ms']:.1f} | {hist} | "
                f"{p['runner_busy']:.2f} | {_f(p['runner_busy_steady'])} | "
                f"{p['loop_cpu_ms']:.2f} | {p['ort_cpu_ms']:.1f} | "
                f"{p['pa_cpu_ms']:.2f} | {p['load']:.1f} |"
            )
    if data.get("rss_mb"):
        rss = ", ".join(f"`{k}` {v:.0f} MB" for k, v in data["rss_mb"].items())
        lines += ["", f"Gateway RSS at the end (the model alone loaded): {rss}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repo", type=Path, default=None, help="default: build_models' cache")
    parser.add_argument("--protocols", default="grpc,shm")
    parser.add_argument("--concurrency", type=_levels, default=[1, 4, 8, 16])
    parser.add_argument("--in-process", type=_levels, default=[1, 2, 4, 8])
    parser.add_argument("--in-process-s", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window-ms", type=int, default=3000)
    parser.add_argument("--env", action="append", default=[], help="K=V for the gateways")
    parser.add_argument(
        "--layouts",
        default="config",
        help="gateways to compare, points interleaved: 'config' (the model's own config), "
        "'Nx1' (instance_group count N, intra_op_thread_count 1)",
    )
    parser.add_argument("--quick", action="store_true", help="1 round, c=1,4, short windows")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "cnn_gap.md")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.concurrency, args.in_process = 1, [1, 4], [1, 4]
        args.in_process_s, args.window_ms = 0.3, 1000
    repo = args.repo
    if repo is None:
        sys.path.insert(0, str(harness.ROOT / "scripts"))
        import build_models

        repo = build_models.ensure_heavy(names=[args.model])
    repo = repo.resolve()
    model = harness.read_model(repo, args.model)
    from gateway.backends.onnxruntime import default_intra_op_threads, usable_cores

    found = sessions(repo, model, default_intra_op_threads(usable_cores()))
    data: dict[str, Any] = {
        "command": " ".join(["python bench/cnn_gap.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": harness.machine_info(), "model": args.model, "sizes": args.in_process,
        "rounds": [],
    }  # fmt: skip
    pa = harness.perf_analyzer_path()
    protocols = [p for p in args.protocols.split(",") if p]
    layouts = [x for x in args.layouts.split(",") if x]
    with (
        tempfile.TemporaryDirectory(prefix="bench-cnn-gap-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        gateways: dict[str, tuple[harness.Gateway, int, Path]] = {}
        for layout in layouts:
            served = repo if layout == "config" else one_thread_repo(repo, args.model, work,
                                                                      layout)  # fmt: skip
            grpc_port = harness.free_port()
            env = {"GATEWAY_LOAD_MODELS": args.model, "GATEWAY_GRPC_PORT": str(grpc_port)}
            env.update(item.split("=", 1) for item in args.env)
            gw = harness.start_gateway(served, work, "--log-level", "warning", env=env,
                                       tag=f"gap-{layout}", ready=(args.model,))  # fmt: skip
            stack.callback(gw.stop)
            gateways[layout] = (gw, grpc_port, served)
        first = next(iter(gateways.values()))[0]
        poll_cpu_s = poll_cost(first, args.model)
        data["poll_cpu_ms"] = poll_cpu_s * 1e3
        turn = 0
        for r in range(args.rounds):
            rnd: dict[str, Any] = {
                "in_process": in_process(model, found, args.in_process, args.in_process_s),
                "gateway": [],
            }
            for p in rnd["in_process"]:
                print(f"round {r + 1} in-process {p['session']:11s} batch {p['batch']}: "
                      f"{p['items_per_s']:.2f}/s, {p['cpu_ms_per_item']:.1f} ms CPU/item",
                      flush=True)  # fmt: skip
            # A window holds a few requests of each client even while the machine is busy
            # (perf_analyzer refuses a window in which none finished).
            run_ms = min(
                p["run_p50_ms"]
                for p in rnd["in_process"]
                if p["batch"] == min(args.in_process) and p["session"] == "gateway"
            )
            for protocol in protocols:
                for c in args.concurrency:
                    window_ms = max(args.window_ms, round(3 * c * run_ms))
                    order = list(gateways) if turn % 2 == 0 else list(gateways)[::-1]
                    turn += 1
                    for layout in order:
                        gw, grpc_port, served = gateways[layout]
                        cpu0 = children_cpu_s()
                        got = None
                        for attempt in range(3):  # the machine slowed down: longer windows
                            try:
                                got = gateway_point(pa, gw, grpc_port, served, model, protocol,
                                                    c, window_ms << attempt, work,
                                                    poll_cpu_s)  # fmt: skip
                                break
                            except RuntimeError as exc:
                                if "No valid requests" not in str(exc) or attempt == 2:
                                    raise
                        assert got is not None
                        got["layout"] = layout
                        items = sum(k * v for k, v in got["batches"].items())
                        got["pa_cpu_ms"] = (children_cpu_s() - cpu0) / max(1, items) * 1e3
                        rnd["gateway"].append(got)
                        print(f"round {r + 1} {layout} {protocol:4s} c={c:<3d} "
                              f"{got['throughput']:6.2f}/s p50 {got['p50_ms']:7.1f} ms batches "
                              f"{got['batches']} busy {got['runner_busy']:.2f} steady "
                              f"{_f(got['runner_busy_steady'])} CPU ms/item loop "
                              f"{got['loop_cpu_ms']:.2f} ORT {got['ort_cpu_ms']:.1f} "
                              f"pa {got['pa_cpu_ms']:.2f}", flush=True)  # fmt: skip
            data["rounds"].append(rnd)
        data["rss_mb"] = {layout: rss_mb(g[0].proc.pid) for layout, g in gateways.items()}
    text = render(data)
    print(text)
    harness.write_results(args.out, text, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
