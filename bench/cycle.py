"""Where one batch cycle's time goes: mlp, batching on, ``wrk -c64``, against in-process ORT.

``serving.py`` says how far the gateway is from in-process ONNX Runtime at 64 clients; this says
why. With 64 clients in lock step each batch is one cycle: ORT runs, the loop writes 64 answers,
reads the 64 requests those answers release, queues them, and hands the batch back to ORT. The
gateway runs in a child process (this script, ``--child``) with five points stamped by
``time.perf_counter`` (CLOCK_MONOTONIC, so comparable across processes):

- ``enqueue``: a request queued (``Batcher.enqueue``)
- ``dispatch``/``resume``: the backend's ``execute`` called and returned, on the loop
- ``start``/``end``: ``session.run`` and its conversions, on the ORT pool thread
- ``sent``: an answer written (``HotPath._raw_done``)

Each round measures in-process ``session.run`` at the batch size, then the gateway under wrk; the
phases of every cycle in the wrk window are summed up as means (which add up to the cycle) and
medians. The stamps cost about a microsecond per request.

    .venv/bin/python bench/cycle.py --rounds 3 --out bench/results/cycle.md
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness

ROOT = harness.ROOT
Events = list[tuple[str, float]]


# -- the child: a gateway with stamps ---------------------------------------------------------


def run_child(trace: Path, argv: list[str]) -> int:
    """Serve as ``gateway`` does, stamping events; hand them over when ``<trace>.want`` appears.

    A thread polls for the request file rather than a signal handler: under uvloop a Python
    signal handler waits for the next bytecode, which an idle loop may not run for a while.
    """
    from gateway import cli
    from gateway.backends.onnxruntime import OnnxRuntimeBackend
    from gateway.batching.batcher import Batcher
    from gateway.server.infer import HotPath

    events: Events = []
    clock = time.perf_counter

    def stamp_sync(cls: type, attr: str, before: str | None, after: str | None) -> None:
        original = getattr(cls, attr)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before:
                events.append((before, clock()))
            result = original(*args, **kwargs)
            if after:
                events.append((after, clock()))
            return result

        setattr(cls, attr, wrapper)

    original_execute = OnnxRuntimeBackend.execute

    @functools.wraps(original_execute)
    async def execute(*args: Any, **kwargs: Any) -> Any:
        events.append(("dispatch", clock()))
        result = await original_execute(*args, **kwargs)
        events.append(("resume", clock()))
        return result

    OnnxRuntimeBackend.execute = execute  # type: ignore[method-assign]
    stamp_sync(OnnxRuntimeBackend, "_run", "start", "end")
    stamp_sync(Batcher, "enqueue", "enqueue", None)
    stamp_sync(HotPath, "_raw_done", None, "sent")

    want = trace.with_suffix(".want")

    def hand_over() -> None:
        while True:
            time.sleep(0.05)
            if want.exists():
                count = len(events)  # appends after this stay for the next hand-over
                batch = events[:count]
                del events[:count]
                part = trace.with_suffix(".part")
                part.write_text(json.dumps(batch))
                part.rename(trace)
                want.unlink()

    threading.Thread(target=hand_over, daemon=True, name="cycle-trace").start()
    return cli.main(argv)


def fetch(trace: Path, timeout_s: float = 30.0) -> Events:
    """Ask the child for its events so far and wait for them."""
    trace.unlink(missing_ok=True)
    trace.with_suffix(".want").touch()
    deadline = time.monotonic() + timeout_s
    while not trace.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway did not hand over its trace")
        time.sleep(0.05)
    return [(name, t) for name, t in json.loads(trace.read_text())]


# -- the analysis -----------------------------------------------------------------------------

# A cycle runs from one ``resume`` to the next; its phases in order, which add up to it.
PHASES: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
    ("loop resumes after ORT (hop)", lambda c: c["resume"] - c["prev_end"]),
    ("resume -> first answer written", lambda c: c["sent"][0] - c["resume"]),
    ("answers written", lambda c: c["sent"][-1] - c["sent"][0]),
    ("last answer -> first request queued", lambda c: c["enqueue"][0] - c["sent"][-1]),
    ("requests read and queued", lambda c: c["enqueue"][-1] - c["enqueue"][0]),
    ("last queued -> batch dispatched", lambda c: c["dispatch"] - c["enqueue"][-1]),
    ("dispatch -> ORT starts (hop)", lambda c: c["start"] - c["dispatch"]),
    ("ORT run (session.run + conversions)", lambda c: c["end"] - c["start"]),
]


def cycles(events: Events) -> list[dict[str, Any]]:
    """Split the events at each ``resume``; keep the cycles that have every point, the previous
    cycle's ORT end and the next resume."""
    found: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for name, t in sorted(events, key=lambda e: e[1]):
        if name == "resume":
            prev_end = None
            if current is not None:
                current["next_resume"] = t
                found.append(current)
                prev_end = current.get("end")
            current = {"resume": t, "prev_end": prev_end, "sent": [], "enqueue": []}
        elif current is not None:
            if name in ("sent", "enqueue"):
                current[name].append(t)
            else:
                current.setdefault(name, t)
    return [
        c for c in found
        if c["prev_end"] is not None and c["sent"] and c["enqueue"]
        and all(k in c for k in ("dispatch", "start", "end"))
    ]  # fmt: skip


def summarize(found: list[dict[str, Any]]) -> dict[str, Any]:
    cycle = [c["next_resume"] - c["resume"] for c in found]
    rows = []
    for name, phase in PHASES:
        values = [phase(c) for c in found]
        rows.append((name, statistics.mean(values), statistics.median(values)))
    answers = [len(c["sent"]) for c in found]
    requests = [len(c["enqueue"]) for c in found]
    return {
        "cycles": len(found),
        "cycle_mean": statistics.mean(cycle),
        "cycle_median": statistics.median(cycle),
        "rows": rows,
        "answers": statistics.median(answers),
        "requests": statistics.median(requests),
        "per_answer": statistics.median(
            (c["sent"][-1] - c["sent"][0]) / (len(c["sent"]) - 1)
            for c in found
            if len(c["sent"]) > 1
        ),
        "per_request": statistics.median(
            (c["enqueue"][-1] - c["enqueue"][0]) / (len(c["enqueue"]) - 1)
            for c in found
            if len(c["enqueue"]) > 1
        ),
        "ort_median": statistics.median(c["end"] - c["start"] for c in found),
    }


def render(command: str, rounds: list[dict[str, Any]], pooled: dict[str, Any], batch: int) -> str:
    lines = [
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"| round | gateway items/s | in-process b{batch} items/s | ratio | cycle median ms "
        f"| ORT in gateway ms | in-process run ms | per answer us | per request us |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, r in enumerate(rounds, 1):
        s = r["summary"]
        lines.append(
            f"| {n} | {r['served']:.0f} | {r['in_process']:.0f} "
            f"| {r['served'] / r['in_process']:.3f}x "
            f"| {s['cycle_median'] * 1e3:.2f} | {s['ort_median'] * 1e3:.2f} "
            f"| {r['run_ms']:.2f} | {s['per_answer'] * 1e6:.0f} | {s['per_request'] * 1e6:.0f} |"
        )
    lines += [
        "",
        f"All rounds' cycles pooled ({pooled['cycles']}; median {pooled['answers']:.0f} answers "
        f"and {pooled['requests']:.0f} requests per cycle). Means add up to the mean cycle.",
        "",
        "| phase | mean ms | share | median ms |",
        "|---|---:|---:|---:|",
    ]
    for name, mean, median in pooled["rows"]:
        share = mean / pooled["cycle_mean"]
        lines.append(f"| {name} | {mean * 1e3:.3f} | {share:.0%} | {median * 1e3:.3f} |")
    mean, median = pooled["cycle_mean"], pooled["cycle_median"]
    lines.append(f"| **cycle** | {mean * 1e3:.3f} | 100% | {median * 1e3:.3f} |")
    return "\n".join(lines) + "\n"


# -- the driver -------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return run_child(Path(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=5.0, help="per measurement [5]")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--out", help="markdown file for the tables")
    args = parser.parse_args()
    repo = ROOT / "model_repo"
    model = harness.read_model(repo, "mlp")
    batch = model.max_batch_size
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-cycle-") as tmp:
        work = Path(tmp)
        trace = work / "trace.json"
        launcher = [sys.executable, str(Path(__file__).resolve()), "--child", str(trace)]
        script = harness.lua_script(harness.binary_body(model), work, "mlp")
        with harness.gateway(repo, {}, work, "cycle", launcher) as gw:
            url = f"{gw.url}/v2/models/mlp/infer"
            for number in range(1, args.rounds + 1):
                point = harness.measure_in_process(repo, model, 0, args.duration_s, [batch])[0]
                harness.run_wrk(url, script, args.connections, 1, 1)  # warm-up
                fetch(trace)  # drop the warm-up's events
                out = harness.run_wrk(url, script, args.connections, 1, args.duration_s)
                served, errors = harness.wrk_figures(out)
                if errors:
                    raise RuntimeError(f"round {number}: {errors} errors from wrk")
                found = cycles(fetch(trace))
                if not found:
                    raise RuntimeError(f"round {number}: no complete cycle traced")
                rounds.append(
                    {
                        "served": served,
                        "in_process": point["items_per_s"],
                        "run_ms": point["ms_per_run_median"],
                        "cycles": found,
                        "summary": summarize(found),
                    }
                )
                s = rounds[-1]["summary"]
                print(
                    f"round {number}: {served:.0f} items/s = "
                    f"{served / point['items_per_s']:.3f}x in-process; cycle "
                    f"{s['cycle_median'] * 1e3:.2f} ms, ORT {s['ort_median'] * 1e3:.2f} ms "
                    f"(in-process {point['ms_per_run_median']:.2f})",
                    flush=True,
                )
    pooled = summarize([c for r in rounds for c in r["cycles"]])
    command = " ".join(["python", "bench/cycle.py", *sys.argv[1:]])
    text = render(command, rounds, pooled, batch)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
