"""Python calls per request on the gateway's event-loop thread, under perf_analyzer.

A small model's throughput on this machine is capped by the loop thread's CPU per request, and
about two thirds of that is the interpreter running Python (``perf``: ``libpython``), spread
over a hundred-odd small functions. Timings move by tens of percent with the machine's load;
the number of Python function calls a request makes does not, so this counts them: the gateway
runs under ``cProfile`` switched on for a window of perf_analyzer traffic (after a warm-up), and
the calls (Python functions, and all calls including C ones) are divided by the requests served
in it, then split by module and by function.

    .venv/bin/python bench/hot_calls.py --protocol http,shm
    .venv/bin/python bench/hot_calls.py before:PYTHONPATH=/tmp/base after: --protocol shm

Variants as in ``tree_ab.py`` (``name:ENV=V``; ``PYTHONPATH=`` runs another source tree). The
profiler slows the gateway several times over: read counts here, never its timings.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

LAUNCH = "--launch"  # how the gateway is started: this file, in the gateway's process


def launch(out: str, args: list[str]) -> None:
    """In the gateway's process: SIGUSR1 starts the profiler, SIGUSR2 stops it and writes
    ``out``; then the gateway's own CLI."""
    import cProfile

    profile = cProfile.Profile()

    def start(*_: object) -> None:
        profile.enable()

    def stop(*_: object) -> None:
        profile.disable()
        profile.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    sys.argv = ["gateway", *args]
    from gateway.cli import main

    sys.exit(main())


def served(address: str, model: str) -> int:
    with urllib.request.urlopen(f"http://{address}/v2/models/{model}/stats", timeout=10) as r:
        return int(json.loads(r.read())["model_stats"][0]["inference_count"])


def measure(
    repo: Path,
    model: str,
    protocol: str,
    env: dict[str, str],
    window_s: float,
    work: Path,
    concurrency: int = 16,
) -> dict[str, Any]:
    """One gateway, one protocol: calls per request in a ``window_s`` profiled window."""
    import harness
    import tree_ab

    out = work / f"calls-{time.monotonic_ns()}.pstats"
    gw = harness.start_gateway(
        repo, work, "--log-level", "warning", tag=protocol, ready=(model,), detach=True,
        launcher=[sys.executable, str(Path(__file__).resolve()), LAUNCH, str(out)],
        env={"GATEWAY_LOAD_MODELS": model, "GATEWAY_ACCESS_LOG": "false", **env},
    )  # fmt: skip
    try:
        pa = harness.perf_analyzer_path()
        cmd = [
            pa, "-m", model, "-u", gw.address, "-i", "http",
            "--concurrency-range", str(concurrency), "-s", "999", "--input-data", "zero",
        ]  # fmt: skip
        if protocol == "shm":
            size = tree_ab.output_bytes(repo, model)
            cmd += ["--shared-memory", "system", "--output-shared-memory-size", str(size)]
        subprocess.run([*cmd, "-p", "1000", "-r", "1"], capture_output=True, check=False)
        # Three windows as long as the profiled one: load all through it.
        load = subprocess.Popen(
            [*cmd, "-p", str(int(window_s * 1000)), "-r", "3"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)  # perf_analyzer's own start (metadata, regions) out of the window
            before = served(gw.address, model)
            os.kill(gw.pid, signal.SIGUSR1)
            time.sleep(window_s)
            os.kill(gw.pid, signal.SIGUSR2)  # handled before the loop serves the next read
            requests = served(gw.address, model) - before
        finally:
            load.wait(timeout=120)
        for _ in range(50):
            if out.exists():
                break
            time.sleep(0.1)
    finally:
        gw.stop()
    return split(out, requests)


def split(path: Path, requests: int) -> dict[str, Any]:
    import pstats

    stats: dict[tuple[str, int, str], Any] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    python = {k: v[1] for k, v in stats.items() if k[0] != "~"}
    modules: dict[str, float] = {}
    for (file, _, _), calls in python.items():
        name = "/".join(Path(file).parts[-2:])  # protocol/types.py, config/types.py
        modules[name] = modules.get(name, 0.0) + calls / requests
    functions = sorted(python.items(), key=lambda kv: -kv[1])[:25]
    return {
        "requests": requests,
        "python": sum(python.values()) / requests,
        "all": sum(v[1] for v in stats.values()) / requests,
        "modules": dict(sorted(modules.items(), key=lambda kv: -kv[1])),
        "functions": [
            (f"{Path(f).name}:{line} {fn}", n / requests) for (f, line, fn), n in functions
        ],
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == LAUNCH:
        launch(sys.argv[2], sys.argv[3:])
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import harness
    import tree_ab

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", default=["this:"], help="name:ENV=V,ENV=V")
    parser.add_argument("--model", default="simple")
    parser.add_argument("--protocol", default="http,shm", help="http (binary), shm: comma list")
    parser.add_argument("--window-s", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=16, help="perf_analyzer's [16]")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    repo = (harness.ROOT / "model_repo").resolve()
    variants = [tree_ab.parse_variant(v) for v in args.variants]
    protocols = args.protocol.split(",")
    got: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for protocol in protocols:
            for name, env in variants:
                got[f"{name} {protocol}"] = measure(
                    repo, args.model, protocol, env, args.window_s, Path(tmp), args.concurrency
                )
                print(f"{name} {protocol}: {got[f'{name} {protocol}']['python']:.1f}", flush=True)
    modules = sorted({m for g in got.values() for m in g["modules"]}, key=lambda m: -max(
        g["modules"].get(m, 0.0) for g in got.values()
    ))[:16]  # fmt: skip
    keys = list(got)
    lines = [
        f"# Python calls per request on the loop thread (`{args.model}`, perf_analyzer"
        f" c={args.concurrency})",
        "",
        f"Command: `.venv/bin/python bench/hot_calls.py {' '.join(sys.argv[1:])}`",
        "",
        "| | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
        "| requests in the window | " + " | ".join(str(got[k]["requests"]) for k in keys) + " |",
        "| **Python function calls / request** | "
        + " | ".join(f"**{got[k]['python']:.1f}**" for k in keys)
        + " |",
        "| all calls (C included) / request | "
        + " | ".join(f"{got[k]['all']:.1f}" for k in keys)
        + " |",
    ]
    for module in modules:
        cells = " | ".join(f"{got[k]['modules'].get(module, 0.0):.1f}" for k in keys)
        lines.append(f"| `{module}` | {cells} |")
    for key in keys:
        lines += ["", f"Most called in `{key}` (calls / request):", ""]
        lines += [f"- {n:.2f} `{fn}`" for fn, n in got[key]["functions"][:15]]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if args.out:
        harness.write_results(args.out, markdown, got)


if __name__ == "__main__":
    main()
