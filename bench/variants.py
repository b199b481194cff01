"""Gateway variants against in-process ONNX Runtime, in interleaved rounds.

The machine's speed drifts by tens of percent within minutes, so comparing two separate runs of
``serving.py`` says little about a small change. This starts every variant at once (a gateway
each: its own model repository and ``GATEWAY_*`` environment), then repeats rounds of: in-process
ORT at one batch size, then each variant under ``wrk -c64`` for as long. Each variant's ratio to
the round's in-process figure, and the median over rounds, is what to compare; so is the event
loop's CPU time per request (the main thread's), which the machine's drift moves less.

    .venv/bin/python bench/variants.py --rounds 5 shipped:: \
        b64:/tmp/repo64: nogc::GATEWAY_GC_THRESHOLD=0

A variant's ``PYTHONPATH`` runs another source tree, e.g. the last commit checked out with
``git worktree add /tmp/base HEAD``: ``base::PYTHONPATH=/tmp/base``.

A variant is ``name:repo:ENV=V,ENV=V`` (an empty repo means ``model_repo/``). Writes a table to
``--out`` when given.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

import harness

ROOT = harness.ROOT


def parse_variant(text: str) -> tuple[str, Path, dict[str, str]]:
    name, _, rest = text.partition(":")
    repo, _, envs = rest.partition(":")
    env = dict(item.split("=", 1) for item in envs.split(",") if item)
    return name, Path(repo).resolve() if repo else ROOT / "model_repo", env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="name:repo:ENV=V,ENV=V")
    parser.add_argument("--model", default="mlp", choices=harness.MODELS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration-s", type=float, default=5.0, help="per point [5]")
    parser.add_argument("--batch", type=int, default=0, help="in-process batch [max_batch_size]")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--out", help="markdown file for the table")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    model = harness.read_model(ROOT / "model_repo", args.model)
    batch = args.batch or model.max_batch_size
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    loops: dict[str, list[float]] = {name: [] for name, _, _ in variants}  # loop CPU per request
    lines = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        script = harness.lua_script(harness.binary_body(model), work, args.model)
        gateways = [
            (name, stack.enter_context(harness.gateway(repo, env, work, name)))
            for name, repo, env in variants
        ]
        for number in range(1, args.rounds + 1):
            limit = harness.measure_in_process(
                ROOT / "model_repo", model, 0, args.duration_s, [batch]
            )[0]["items_per_s"]
            cells = [f"{limit:.0f}"]
            for name, gw in gateways:
                url = f"{gw.url}/v2/models/{args.model}/infer"
                harness.run_wrk(url, script, args.connections, 1, 1)  # warm-up
                before = gw.stats(args.model)
                with harness.CpuWindow(gw.proc.pid) as cpu:
                    out = harness.run_wrk(url, script, args.connections, 1, args.duration_s)
                after = gw.stats(args.model)
                served, errors = harness.wrk_figures(out)
                runs = after["execution_count"] - before["execution_count"]
                avg_batch = (after["inference_count"] - before["inference_count"]) / max(1, runs)
                ratio = served / limit
                ratios[name].append(ratio)
                loop_us = cpu.loop_s / max(1, out["requests"]) * 1e6
                loops[name].append(loop_us)
                cells.append(
                    f"{served:.0f} = {ratio:.3f}x (b{avg_batch:.1f}, loop {loop_us:.0f} us/req, "
                    f"p50/p99 "
                    f"{out['p50_us'] / 1e3:.1f}/{out['p99_us'] / 1e3:.1f} ms, errors {errors})"
                )
            lines.append(f"| {number} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    head = f"| round | in-process b{batch} | " + " | ".join(n for n, _, _ in variants) + " |"
    rule = "|---:|---:|" + "---|" * len(variants)
    medians = (
        "| median | | "
        + " | ".join(
            f"{statistics.median(ratios[n]):.3f}x, loop {statistics.median(loops[n]):.0f} us/req"
            for n, _, _ in variants
        )
        + " |"
    )
    table = "\n".join([head, rule, *lines, medians])
    print(table)
    if args.out:
        Path(args.out).write_text(
            f"Command: `{' '.join(['python', 'bench/variants.py', *sys.argv[1:]])}`\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
