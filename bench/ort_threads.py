"""ONNX Runtime's threads in the gateway (issue 21): spinning and intra-op thread count, A/B.

Every variant is a gateway of its own, all started at once; rounds of perf_analyzer (binary
HTTP, one item per request) at each concurrency, the variants' order rotated per round, so the
machine's drift falls on all of them alike. Per model and concurrency: throughput and p50 as
ratios to the shipped settings (medians over rounds).

Variants: ``shipped`` (the defaults: one intra-op thread per usable core, spinning while a run
goes if the pools fit in the cores), ``spin_always`` (``ort_spinning =
true``: ORT's default, spinning after a run too), ``never_spin``
(``session.intra_op.allow_spinning = 0`` in the model's config), ``one_thread``
(``intra_op_threads = 1``), ``ort_default`` (one thread per core, ORT's own count, spinning while
a run goes: the defaults before this bench, and again after it), ``one_less`` (one intra-op
thread less than the cores: this bench's first pick, undone by its quiet run), and any
``--variant name:ENV=V,ENV=V``.

    .venv/bin/python bench/ort_threads.py                  # mlp and resnet50, ~8 minutes
    .venv/bin/python bench/ort_threads.py --quick --out /tmp/ort.md   # CI smoke, ~1 minute
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

ROOT = harness.ROOT


def _entry(key: str, value: str) -> str:
    """A model config parameter (an ONNX Runtime session config entry)."""
    return f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'


def _spin(value: str) -> str:
    return _entry("session.intra_op.allow_spinning", value) + _entry(
        "session.inter_op.allow_spinning", value
    )


# name -> (GATEWAY_* environment, lines added to each model's config)
VARIANTS: dict[str, tuple[dict[str, str], str]] = {
    "shipped": ({}, ""),
    "spin_always": ({"GATEWAY_ORT_SPINNING": "true"}, ""),
    "never_spin": ({}, _spin("0")),
    "one_thread": ({"GATEWAY_INTRA_OP_THREADS": "1"}, ""),
    "ort_default": (
        {"GATEWAY_INTRA_OP_THREADS": str(len(os.sched_getaffinity(0)))},
        _spin("1") + _entry("session.force_spinning_stop", "1"),
    ),
    "one_less": ({"GATEWAY_INTRA_OP_THREADS": str(max(1, len(os.sched_getaffinity(0)) - 1))}, ""),
}


def run_pa(
    pa: str, model: str, address: str, concurrency: int, window_ms: int, work: Path
) -> dict[str, float]:
    """One perf_analyzer point (three windows, no stability retries)."""
    report = work / f"pa-{model}-{concurrency}-{time.monotonic_ns()}.csv"
    cmd = [
        pa, "-m", model, "-u", address, "-i", "http", "--concurrency-range", str(concurrency),
        "-p", str(window_ms), "-s", "999", "-r", "3", "--input-data", "zero", "-f", str(report),
    ]  # fmt: skip
    limit_s = 60 + 6 * window_ms / 1000 * max(1, concurrency / 8)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, check=False)
    if out.returncode != 0 or not report.exists():
        tail = " / ".join((out.stdout + out.stderr).strip().splitlines()[-3:])
        return {"error": 1.0, "why": tail[:200]}  # type: ignore[dict-item]
    with report.open() as f:
        row = next(csv.DictReader(f))
    return {
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": int(row["p50 latency"]) / 1e3,
        "p99_ms": int(row["p99 latency"]) / 1e3,
    }


def build_repo(dest: Path, models: list[str], extra: str) -> Path:
    """The models' directories linked (their ONNX files) with configs of their own."""
    heavy = ROOT / "bench" / "out" / "models"
    for name in models:
        source = (ROOT / "model_repo" / name) if (ROOT / "model_repo" / name).exists() else None
        source = source or heavy / name
        if not source.exists():
            raise SystemExit(f"{name}: not found; build it: scripts/build_models.py --heavy")
        (dest / name).mkdir(parents=True)
        for entry in source.iterdir():
            if entry.name == "config.pbtxt":
                text = entry.read_text() + extra
                (dest / name / "config.pbtxt").write_text(text)
            else:
                (dest / name / entry.name).symlink_to(entry.resolve())
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,resnet50")
    parser.add_argument("--concurrency", default="1,16,64", help="for light models")
    parser.add_argument("--heavy-concurrency", default="1,16", help="for resnet50, bert_encoder")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window-ms", type=int, default=1000)
    parser.add_argument("--heavy-window-ms", type=int, default=3000)
    parser.add_argument("--variant", action="append", default=[], help="name:ENV=V,ENV=V")
    parser.add_argument("--only", default="", help="comma-separated variants to run")
    parser.add_argument("--quick", action="store_true", help="mlp, c=1,16, one round")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "ort_threads.md")
    args = parser.parse_args()
    if args.quick:
        args.models, args.concurrency, args.rounds, args.window_ms = "mlp", "1,16", 1, 500
    variants = dict(VARIANTS)
    for text in args.variant:
        name, _, envs = text.partition(":")
        variants[name] = (dict(item.split("=", 1) for item in envs.split(",") if item), "")
    if args.only:
        variants = {n: variants[n] for n in args.only.split(",")}
    models = args.models.split(",")
    light = [int(c) for c in args.concurrency.split(",")]
    heavy = [int(c) for c in args.heavy_concurrency.split(",")]
    pa = harness.perf_analyzer_path()
    points: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gateways: dict[str, harness.Gateway] = {}
        try:
            for name, (env, extra) in variants.items():
                repo = build_repo(work / f"repo-{name}", models, extra)
                gateways[name] = harness.start_gateway(
                    repo,
                    work,
                    "--log-level",
                    "warning",
                    env={"GATEWAY_ACCESS_LOG": "false", **env},
                    tag=name,
                    ready=tuple(models),
                    detach=True,
                )
            names = list(variants)
            for r in range(args.rounds):
                for model in models:
                    is_heavy = model not in ("mlp", "simple")
                    window = args.heavy_window_ms if is_heavy else args.window_ms
                    for concurrency in heavy if is_heavy else light:
                        order = names[r % len(names) :] + names[: r % len(names)]
                        for name in order:
                            gw = gateways[name]
                            point = run_pa(pa, model, gw.address, concurrency, window, work)
                            points.setdefault((model, concurrency, name), []).append(point)
                            loads.append(os.getloadavg()[0])
                            print(f"round {r + 1} {model} c={concurrency} {name}: {point}")
        finally:
            for gw in gateways.values():
                gw.stop()
            shutil.rmtree(work, ignore_errors=True)

    def med(model: str, c: int, name: str, key: str) -> float | None:
        values = [p[key] for p in points.get((model, c, name), []) if key in p]
        return statistics.median(values) if values else None

    names = list(variants)
    rows = []
    for model in models:
        for c in heavy if model not in ("mlp", "simple") else light:
            base_t, base_p = (
                med(model, c, "shipped", "throughput"),
                med(model, c, "shipped", "p50_ms"),
            )
            cells = []
            for name in names:
                t, p = med(model, c, name, "throughput"), med(model, c, name, "p50_ms")
                if t is None or p is None:
                    cells.append("failed")
                    continue
                ratio = f" ({t / base_t:.2f}x, {p / base_p:.2f}x)" if base_t and base_p else ""
                cells.append(f"{t:.0f}/s, {p:.1f} ms{ratio}")
            rows.append(f"| {model} | {c} | " + " | ".join(cells) + " |")
    load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "?"
    command = "bench/ort_threads.py " + " ".join(sys.argv[1:])
    markdown = f"""# ONNX Runtime threads in the gateway: spinning and thread count

Command: `.venv/bin/python {command.strip()}`

Machine: {harness.machine_info()["nproc"]} CPUs shared with other work (perf_analyzer on the
same cores); 1-minute load average {load} during the run. perf_analyzer, binary HTTP, one item
per request, {args.window_ms} ms windows ({args.heavy_window_ms} ms for heavy models), three
windows a point; {args.rounds} rounds, the variants' order rotated per round; medians over
rounds. Each cell: throughput, p50 (and both as ratios to `shipped`).

Variants: `shipped`: the defaults (one intra-op thread per usable core; spinning while a run
goes only if the pools fit in the cores); `spin_always`: `ort_spinning = true`
(ORT's own default); `never_spin`: `session.intra_op.allow_spinning = "0"` in the configs;
`one_thread`: `intra_op_threads = 1`; `ort_default`: one thread per core, spinning while a run
goes (the defaults before this bench); `one_less`: one thread less than the cores{
        "".join(f"; `{n}`: {e}" for n, (e, _) in variants.items() if n not in VARIANTS)
    }.

| model | c | {" | ".join(names)} |
|---|---:|{"---|" * len(names)}
{chr(10).join(rows)}
"""
    print(markdown)
    harness.write_results(
        args.out, markdown, {f"{m}|{c}|{n}": v for (m, c, n), v in points.items()}
    )


if __name__ == "__main__":
    main()
