"""Run the benchmarks in bench/ and render their results as PNG plots and one Markdown report.

    .venv/bin/python bench/report.py            # run each benchmark (short), then render
    .venv/bin/python bench/report.py --no-run   # render from the results already there

Each benchmark that exists (``serving``, ``routing``, ``edge``, ``triton``, ``grpc_vs_rest``) runs
in turn with short-duration flags when its ``--help`` offers them (``--quick``, else
``--duration-s``/``--warmup-s``/``--in-process-s``; ``--full`` keeps its defaults), under a
timeout, its output kept in ``bench/out/report/<name>.log``. A failure or a timeout is recorded and
the next one runs. The renderer then reads ``bench/results/<name>.json`` / ``.md``, plots what the
data allows (throughput vs concurrency, throughput and latency per target, latency percentiles per
routing policy, cold vs warm start) and writes ``bench/results/report.md`` with
``report-*.png`` beside it, listing what is missing. Plots need matplotlib (imported only when
rendering; without it the report is written without plots).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
LOGS = BENCH / "out" / "report"
BENCHMARKS = ("serving", "routing", "edge", "triton", "grpc_vs_rest")
TITLES = {
    "serving": "Serving core: gateway vs in-process ONNX Runtime, batching on/off",
    "routing": "Routing policies",
    "edge": "Edge: cold vs warm start",
    "triton": "Gateway -> Triton vs Triton direct vs gateway ONNX Runtime",
    "grpc_vs_rest": "gRPC vs REST (JSON, binary)",
}
# short-duration flags, used when a benchmark's --help offers them and has no --quick
QUICK_FLAGS = {"--duration-s": "3", "--warmup-s": "1", "--in-process-s": "0.5"}

Row = dict[str, Any]


# -- running -------------------------------------------------------------------------------------


@dataclass
class RunResult:
    status: str  # "ok", "failed (exit N)", "timed out after N s", "not run", "no script"
    command: str = ""
    elapsed_s: float = 0.0
    tail: str = ""


def quick_args(script: Path, python: str) -> list[str]:
    """Short-duration flags the script's argparse accepts (empty when --help fails)."""
    try:
        text = subprocess.run(
            [python, str(script), "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    if re.search(r"(^|\s)--quick\b", text):
        return ["--quick"]
    args: list[str] = []
    for flag, value in QUICK_FLAGS.items():
        if re.search(rf"(^|\s){re.escape(flag)}\b", text):
            args += [flag, value]
    return args


def run_benchmark(name: str, python: str, quick: bool, timeout_s: float) -> RunResult:
    script = BENCH / f"{name}.py"
    if not script.exists():
        return RunResult("no script")
    cmd = [python, str(script.relative_to(ROOT)), *(quick_args(script, python) if quick else [])]
    shown = " ".join(["python", *cmd[1:]])
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{name}.log"
    print(f"[report] {shown} (timeout {timeout_s:.0f} s, log {log_path.relative_to(ROOT)})")
    start = time.monotonic()
    with log_path.open("wb") as log:
        # its own process group, so a timeout can stop the benchmark and whatever it started
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        try:
            rc = process.wait(timeout_s)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout_s:.0f} s"
            stop_group(process)
        except KeyboardInterrupt:
            stop_group(process)
            raise
    elapsed_s = time.monotonic() - start
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
    print(f"[report] {name}: {status} in {elapsed_s:.0f} s")
    return RunResult(status, shown, elapsed_s, tail)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the benchmark's process group (benchmarks clean up on it), SIGKILL after 20 s."""
    for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# -- reading results -----------------------------------------------------------------------------


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[Row]


@dataclass
class Results:
    name: str
    files: list[Path] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    data: Any = None  # the parsed JSON, when there is one
    provenance: str = ""  # "Command: ... / Date: ..." lines of the benchmark's own report


def number(value: Any) -> float | None:
    """12.3, "12.3", "1,916", "+3.77", "0.45x", "13.4 ms", "1.96 of 2.0" -> float; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return None
    match = re.fullmatch(r"\s*\**([+-]?[\d,]*\.?\d+(?:[eE][+-]?\d+)?)\**\s*(x|ms|s|%)?\s*", value)
    return float(match.group(1).replace(",", "")) if match else None


def markdown_tables(text: str) -> list[Table]:
    tables: list[Table] = []
    heading = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        is_table = line.startswith("|") and i + 1 < len(lines)
        if is_table and re.fullmatch(r"\|?[\s:|-]+\|?", lines[i + 1].strip()):
            columns = [c.strip() for c in line.strip("|").split("|")]
            rows: list[Row] = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                rows.append(dict(zip(columns, cells, strict=False)))
                i += 1
            tables.append(Table(heading, columns, rows))
            continue
        i += 1
    return tables


def json_tables(data: Any, title: str = "") -> list[Table]:
    """Every list of flat-ish dicts in a JSON document, as tables (nested dicts flattened once)."""
    found: list[Table] = []
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        rows: list[Row] = []
        for item in data:
            row: Row = {}
            for key, value in item.items():
                if isinstance(value, dict):
                    row.update({f"{key}.{k}": v for k, v in value.items() if not _nested(v)})
                elif not _nested(value):
                    row[key] = value
            rows.append(row)
        columns = list(dict.fromkeys(k for r in rows for k in r))
        found.append(Table(title, columns, rows))
    if isinstance(data, dict):
        for key, value in data.items():
            found += json_tables(value, f"{title}.{key}" if title else key)
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, dict | list):
                found += json_tables(item, title)
    return found


def _nested(value: Any) -> bool:
    return isinstance(value, dict | list)


def read_results(name: str, results: Path) -> Results:
    res = Results(name)
    json_path, md_path = results / f"{name}.json", results / f"{name}.md"
    if json_path.exists():
        res.files.append(json_path)
        try:
            res.data = json.loads(json_path.read_text())
            res.tables += json_tables(res.data)
        except ValueError as exc:
            res.provenance += f"(could not parse {json_path.name}: {exc}) "
    if md_path.exists():
        res.files.append(md_path)
        text = md_path.read_text(errors="replace")
        res.tables += markdown_tables(text)
        lines = [
            line.strip().rstrip("\\").strip()
            for line in text.splitlines()
            if re.match(r"\s*(Command|Date|Machine)\s*:", line)
        ]
        res.provenance += "; ".join(lines)
    if not res.provenance and isinstance(res.data, dict):
        bits = [f"{k.capitalize()}: {res.data[k]}" for k in ("command", "date") if k in res.data]
        res.provenance = "; ".join(bits)
    return res


# -- choosing what to plot -----------------------------------------------------------------------


def find(columns: list[str], *patterns: str) -> str | None:
    """The first column whose name matches any pattern (case-insensitive regex search)."""
    for pattern in patterns:
        for column in columns:
            if re.search(pattern, column, re.IGNORECASE):
                return column
    return None


THROUGHPUT = (r"items[_/ ]?(per[_ ])?s", r"req(uests)?[_/ ]?(per[_ ])?s", r"throughput", r"rps")
CONCURRENCY = (r"concurren", r"connections", r"clients", r"^users$", r"^c$")
PERCENTILE = re.compile(r"(?<![a-z])p(50|90|95|99|999)(?!\d)", re.IGNORECASE)
NOT_LATENCY = re.compile(r"added|vs|ratio|x in|_us$|\bus\b", re.IGNORECASE)


def numeric(table: Table, column: str) -> bool:
    return any(number(r.get(column)) is not None for r in table.rows)


def label_columns(table: Table, exclude: set[str]) -> list[str]:
    """Non-numeric columns that tell rows apart (model, target, policy, scenario...)."""
    varying = [
        c
        for c in table.columns
        if c not in exclude and not numeric(table, c) and len({r.get(c) for r in table.rows}) > 1
    ]
    # one column that already tells every row apart (e.g. "scenario") is label enough
    unique = [c for c in varying if len({r.get(c) for r in table.rows}) == len(table.rows)]
    return unique[:1] or varying


def percentile_columns(table: Table) -> list[str]:
    cols = [
        c
        for c in table.columns
        if PERCENTILE.search(c) and not NOT_LATENCY.search(c) and numeric(table, c)
    ]
    return sorted(cols, key=lambda c: float(re.search(r"p(\d+)", c, re.I).group(1)))  # type: ignore[union-attr]


@dataclass
class Plot:
    kind: str  # "lines" (y vs x per series), "bars" (groups x series)
    title: str
    xlabel: str
    ylabel: str
    # lines: series -> [(x, y)]; bars: group -> series -> value
    series: dict[str, Any]
    log_y: bool = False
    slug: str = "plot"  # names the PNG: report-<benchmark>-<slug>.png


def throughput_vs_concurrency(table: Table) -> Plot | None:
    x_col = find(table.columns, *CONCURRENCY)
    y_col = find(table.columns, *THROUGHPUT)
    if not x_col or not y_col or not numeric(table, y_col):
        return None
    if len({number(r.get(x_col)) for r in table.rows} - {None}) < 2:
        return None
    labels = label_columns(table, {x_col, y_col})
    series: dict[str, list[tuple[float, float]]] = {}
    for row in table.rows:
        x, y = number(row.get(x_col)), number(row.get(y_col))
        if x is not None and y is not None:
            key = " ".join(str(row.get(c)) for c in labels) or y_col
            series.setdefault(key, []).append((x, y))
    return Plot("lines", f"{y_col} vs {x_col}", x_col, y_col, series, slug="vs-concurrency")


def bars(
    table: Table, value_cols: list[str], title: str, ylabel: str, slug: str = "bars"
) -> Plot | None:
    """Grouped bars: one group per row label, one bar per value column."""
    if not value_cols:
        return None
    labels = label_columns(table, set(value_cols))
    conc = find(table.columns, *CONCURRENCY)
    if conc and conc not in labels and len({r.get(conc) for r in table.rows}) > 1:
        labels.append(conc)  # e.g. policy x concurrency
    groups: dict[str, dict[str, float]] = {}
    for row in table.rows:
        label = " / ".join(
            f"{c}={row.get(c)}" if c == conc else str(row.get(c)) for c in labels
        ) or str(len(groups) + 1)
        while label in groups:  # rows the labels do not tell apart stay separate bars
            label += "'"
        values = {c: v for c in value_cols if (v := number(row.get(c))) is not None}
        if values:
            groups[label] = values
    if not groups:
        return None
    positive = [v for g in groups.values() for v in g.values() if v > 0]
    log_y = bool(positive) and max(positive) / max(min(positive), 1e-9) > 200
    return Plot("bars", title, "", ylabel, groups, log_y, slug)


def cold_warm(table: Table) -> Plot | None:
    """Rows or columns named cold / warm, with numbers: a cold vs warm bar chart."""
    cw_cols = [c for c in table.columns if re.search(r"cold|warm", c, re.I) and numeric(table, c)]
    if cw_cols:
        return bars(
            table, cw_cols, f"{table.title}: cold vs warm".strip(": "), "value", "cold-warm"
        )
    label_col = next(
        (
            c
            for c in table.columns
            if any(re.search(r"cold|warm", str(r.get(c, "")), re.I) for r in table.rows)
        ),
        None,
    )
    if not label_col:
        return None
    values = [c for c in table.columns if c != label_col and numeric(table, c)]
    timed = [c for c in values if re.search(r"(_|\b)(ms|s|seconds?)\b|time|latency", c, re.I)]
    title = f"{table.title}: cold vs warm".strip(": ")
    return bars(table, timed or values[:4], title, "value", "cold-warm")


def plots_for(res: Results) -> list[Plot]:
    plots: list[Plot] = []
    tables = res.tables
    if res.name == "serving" and isinstance(res.data, dict) and res.data.get("points"):
        tables = [t for t in tables if t.title == "points"]  # the JSON holds everything
    for table in tables:
        if len(table.rows) < 1:
            continue
        if plot := throughput_vs_concurrency(table):
            plots.append(plot)
        y_col = find(table.columns, *THROUGHPUT)
        pcts = percentile_columns(table)
        if res.name == "edge":
            if plot := cold_warm(table):
                plots.append(plot)
            continue
        if res.name == "routing" and find(table.columns, r"polic") and pcts:
            title = f"{table.title}: latency percentiles per policy".strip(": ")
            if plot := bars(table, pcts, title, "ms", "policy-latency"):
                plots.append(plot)
            if y_col and numeric(table, y_col):
                title = f"{table.title}: {y_col} per policy".strip(": ")
                if plot := bars(table, [y_col], title, y_col, "policy-throughput"):
                    plots.append(plot)
            continue
        if y_col and pcts and numeric(table, y_col):
            title = TITLES.get(res.name, res.name)
            if table.title:  # the heading above the table: which layout, which part
                title = f"{title} ({table.title})"
            if plot := bars(table, [y_col], f"{title}: throughput", y_col, "throughput"):
                plots.append(plot)
            if plot := bars(table, pcts, f"{title}: latency", "ms", "latency"):
                plots.append(plot)
    if res.name == "serving" and isinstance(res.data, dict):
        plots += serving_limits(res.data)
    return plots[:6]


def serving_limits(data: dict[str, Any]) -> list[Plot]:
    """Gateway items/s against the in-process ONNX Runtime items/s per batch size, per model."""
    in_process = data.get("in_process") or {}
    points = data.get("points") or []
    series: dict[str, list[tuple[float, float]]] = {}
    for model, info in in_process.items():
        pts = [p for p in info.get("points", []) if not p.get("recheck")]
        series[f"{model} in-process"] = [(p["batch"], p["items_per_s"]) for p in pts]
        for p in points:
            if p.get("model") == model and p.get("avg_batch") and p.get("items_per_s"):
                name = f"{model} gateway {p.get('body', '')} batching {p.get('batching', '')}"
                series[name] = [(p["avg_batch"], p["items_per_s"])]
    if not series:
        return []
    return [
        Plot(
            "lines",
            "Serving: items/s per batch size, in-process vs gateway (at its average batch)",
            "batch size",
            "items/s",
            series,
            log_y=True,
            slug="vs-in-process",
        )
    ]


# -- rendering -----------------------------------------------------------------------------------


def render_png(plot: Plot, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=100)
    if plot.kind == "lines":
        for name, pts in plot.series.items():
            pts = sorted(pts)
            style = "o-" if len(pts) > 1 else "*"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, markersize=8)
        if all(p[0] > 0 for pts in plot.series.values() for p in pts):
            ax.set_xscale("log", base=2)
    else:
        groups = list(plot.series)
        names = list(dict.fromkeys(k for g in plot.series.values() for k in g))
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
            ys = [plot.series[g].get(name, 0.0) for g in groups]
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=25 if len(groups) > 3 else 0, ha="right", fontsize=8)
    if plot.log_y:
        ax.set_yscale("log")
    ax.set_title(plot.title, fontsize=10)
    ax.set_xlabel(plot.xlabel)
    ax.set_ylabel(plot.ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render(runs: dict[str, RunResult], command: str, ran: bool, results: Path) -> Path:
    for old in results.glob("report-*.png"):  # only the plots this script made before
        old.unlink()
    can_plot = have_matplotlib()
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out: list[str] = [
        "# Benchmark report",
        "",
        f"Command: `{command}`  ",
        f"Date: {now}  ",
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}",
        "",
    ]
    if ran:
        out.append(
            "The benchmarks below were run by this command one after another (short durations "
            "unless `--full`), on this one machine; each benchmark's own report has its load "
            "and caveats."
        )
    else:
        out.append(
            f"Rendered with `--no-run` from the results already in `{shown(results)}/`; each "
            "result's own command and date are given in its section."
        )
    if not can_plot:
        out += ["", "**No plots**: matplotlib is not installed (`pip install matplotlib`)."]
    out += ["", "| benchmark | script | this run | results | plots |", "|---|---|---|---|---|"]
    sections: list[str] = []
    missing: list[str] = []
    for name in BENCHMARKS:
        script = BENCH / f"{name}.py"
        run = runs.get(name, RunResult("not run" if script.exists() else "no script"))
        res = read_results(name, results)
        plots = plots_for(res)
        images: list[str] = []
        if can_plot:
            used: set[str] = set()
            for plot in plots:
                stem = f"report-{name}-{plot.slug}"
                stem = next(f"{stem}-{i}" for i in range(1, 99) if f"{stem}-{i}" not in used)
                used.add(stem)
                stem = stem[:-2] if stem.endswith("-1") else stem
                path = results / f"{stem}.png"
                try:
                    render_png(plot, path)
                    images.append(path.name)
                except Exception as exc:  # one bad plot must not lose the report
                    print(f"[report] {name}: plot {plot.title!r} failed: {exc}", file=sys.stderr)
        files = ", ".join(f"[{p.name}]({p.name})" for p in res.files) or "none"
        script_cell = f"`bench/{name}.py`" if script.exists() else "missing"
        out.append(f"| {name} | {script_cell} | {run.status} | {files} | {len(images)} |")
        if not script.exists() and not res.files:
            missing.append(f"`{name}`: no `bench/{name}.py` and no results yet")
            continue
        section = [f"## {name}: {TITLES[name]}", ""]
        if res.provenance:
            section += [f"Results from: {res.provenance}", ""]
        if run.command:
            section += [f"This run: `{run.command}`: {run.status} in {run.elapsed_s:.0f} s", ""]
        if run.status not in ("ok", "not run", "no script"):
            log = f"bench/out/report/{name}.log"
            section += [f"Last lines of its output (full log: `{log}`):", "", "```"]
            section += [run.tail or "(no output)", "```", ""]
        if not res.files:
            missing.append(f"`{name}`: no results in `bench/results/` ({name}.json / {name}.md)")
            section += ["No results yet.", ""]
        elif not plots:
            section += ["No plottable table found in its results; see the files above.", ""]
        for image in images:
            section += [f"![{image}]({image})", ""]
        sections += section
    out += [""]
    if missing:
        out += ["Missing:", "", *[f"- {m}" for m in missing], ""]
    out += sections
    report = results / "report.md"
    report.write_text("\n".join(out).rstrip() + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-run", action="store_true", help="render from existing results only")
    parser.add_argument(
        "--full", action="store_true", help="run each benchmark with its own defaults (long)"
    )
    parser.add_argument(
        "--only", nargs="*", choices=BENCHMARKS, help="run only these benchmarks (all are rendered)"
    )
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per benchmark [600]")
    parser.add_argument(
        "--results-dir",
        default=str(RESULTS),
        help="where the benchmarks' results are read and the report is written [bench/results]",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for the benchmarks")
    args = parser.parse_args(argv)
    command = "python bench/report.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    runs: dict[str, RunResult] = {}
    if not args.no_run:
        for name in args.only or BENCHMARKS:
            runs[name] = run_benchmark(name, args.python, not args.full, args.timeout_s)
    report = render(runs, command, not args.no_run, results)
    print(f"[report] wrote {report}")
    for name, run in runs.items():
        if run.status not in ("ok", "no script"):
            print(f"[report] {name}: {run.status} (see bench/out/report/{name}.log)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
