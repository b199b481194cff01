"""What tracing costs: the gateway with tracing off, and on at sample ratio 1.0, against the tree
before tracing existed, in interleaved rounds (``variants.py``).

Three variants, each a gateway of its own under ``wrk -c64`` (``mlp``, binary bodies, batching
on), after in-process ONNX Runtime in every round:

- ``base``: the commit given by ``--base`` (default: where this branch left ``main``, so the
  trees differ only by this branch's work), exported with ``git archive``;
- ``off``: this tree, no ``trace_endpoint`` (the shipped default);
- ``on``: this tree, ``trace_endpoint`` an OTLP/HTTP sink in this process (it answers 200 and
  counts what it gets), ``trace_sample_ratio`` 1.0: every request traced and exported.

Off must cost nothing measurable (``off`` / ``base`` within the rounds' noise); ``on`` - ``off``
in event-loop CPU per request is tracing's cost per request (the exporter's own thread is
counted in throughput, not in that figure).

    .venv/bin/python bench/tracing.py                      # 3 rounds of 3 s, ~1.5 min
    .venv/bin/python bench/tracing.py --rounds 1 --duration-s 1 --out /tmp/tracing.md
"""

from __future__ import annotations

import argparse
import http.server
import re
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import harness

ROOT = harness.ROOT


RECEIVED = [0, 0]  # exports, bytes: what the sink got


class _Sink(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that keeps nothing: 200 to every export, bytes counted."""

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(size)
        RECEIVED[0] += 1
        RECEIVED[1] += size
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _rounds(table: str, names: list[str]) -> list[dict[str, tuple[float, float]]]:
    """Each round's (requests/s, loop us per request) per variant, from the table's rows."""
    rounds = []
    for line in table.splitlines():
        if not re.match(r"\| \d+ \|", line):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")][2:]
        figures = {}
        for name, cell in zip(names, cells, strict=True):
            found = re.match(r"(\d+) = [\d.]+x \(b[\d.]+, loop (\d+) us/req", cell)
            assert found, cell
            figures[name] = (float(found[1]), float(found[2]))
        rounds.append(figures)
    return rounds


def _paired(rounds: list[dict[str, tuple[float, float]]], a: str, b: str) -> tuple[float, float]:
    """Medians over rounds of ``a``'s throughput and loop CPU per request relative to ``b``'s
    in the same round (both saw the machine at about the same speed)."""
    served = statistics.median(r[a][0] / r[b][0] for r in rounds)
    loop = statistics.median(r[a][1] / r[b][1] for r in rounds)
    return served, loop


_PROBE_BODY = {
    "inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
    ]
}


def _probe(seconds: float, traced: bool) -> None:
    """In this process, with the ``gateway`` on PYTHONPATH: ``DataPlane.submit`` of ``simple``
    requests in waves of 64 for ``seconds``; prints process CPU us per request (JSON). With
    ``traced``, every request is traced to an exporter that drops the spans."""
    import asyncio
    import json
    import time

    from gateway.backends.onnxruntime import OnnxRuntimeFactory
    from gateway.dataplane import DataPlane
    from gateway.protocol.codec import decode_infer_request
    from gateway.repository.local import LocalRepository
    from gateway.settings import Settings

    if traced:
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

        from gateway import tracing

        class Drop(SpanExporter):
            def export(self, spans: object) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        tracing.install(Drop(), ratio=1.0)
    settings = Settings(
        model_repo=str(ROOT / "model_repo"), load_models=("simple",), access_log=False
    )
    body = json.dumps(_PROBE_BODY).encode()

    async def run() -> None:
        repository = LocalRepository(settings.model_repo_path)
        dataplane = DataPlane(settings, repository, OnnxRuntimeFactory(settings))
        await dataplane.start()
        for warm in (True, False):
            count, started, cpu = 0, time.monotonic(), time.process_time()
            while time.monotonic() - started < (0.5 if warm else seconds):
                wave = [
                    dataplane.submit("simple", None, decode_infer_request(body, None))
                    for _ in range(64)
                ]
                for pending in wave:
                    await pending
                count += len(wave)
        print(json.dumps({"us": (time.process_time() - cpu) / count * 1e6, "requests": count}))
        await dataplane.stop()

    asyncio.run(run())


def _core(base: Path, rounds: int, seconds: float) -> str:
    """``DataPlane.submit`` alone (no HTTP, no wrk), process CPU per request: the tree before,
    this tree off, this tree on, one after the other in each round."""
    import json
    import os

    runs: list[dict[str, float]] = []
    for _ in range(rounds):
        figures = {}
        for name, tree, traced in (("base", base, False), ("off", ROOT, False), ("on", ROOT, True)):
            command = [sys.executable, __file__, "--probe", "--duration-s", str(seconds)]
            if traced:
                command.append("--traced")
            env = {**os.environ, "PYTHONPATH": str(tree)}
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
            figures[name] = json.loads(out.stdout.strip().splitlines()[-1])["us"]
        runs.append(figures)
        print(figures, flush=True)
    rows = [
        f"| {i} | {r['base']:.1f} | {r['off']:.1f} | {r['on']:.1f} | {r['off'] / r['base']:.3f} "
        f"| +{r['on'] - r['off']:.1f} |"
        for i, r in enumerate(runs, 1)
    ]
    off_base = statistics.median(r["off"] / r["base"] for r in runs)
    on_off = statistics.median(r["on"] - r["off"] for r in runs)
    return "\n".join(
        [
            "In-process `DataPlane.submit` (`simple`, waves of 64, no HTTP), process CPU "
            "us per request:",
            "",
            "| round | base | off | on | off / base | on - off |",
            "|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"- median off / base: {off_base:.3f}x; median on - off: +{on_off:.1f} us per request "
            "(spans made and handed to an exporter that drops them: no OTLP encoding)",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base", default="", help="commit before tracing [where this branch left main]"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "tracing.md"))
    parser.add_argument("--core-rounds", type=int, default=5, help="in-process A/B rounds [5]")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        _probe(args.duration_s, args.traced)
        return 0
    if not args.base:
        args.base = subprocess.run(
            ["git", "merge-base", "HEAD", "main"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "base"
            base.mkdir()
            archive = subprocess.run(
                ["git", "archive", args.base, "gateway"], cwd=ROOT, check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
            table_file = Path(tmp) / "variants.md"
            names = ["base", "off", "on"]
            variants = [
                f"base::PYTHONPATH={base}",
                f"off::PYTHONPATH={ROOT}",
                f"on::PYTHONPATH={ROOT},GATEWAY_TRACE_ENDPOINT={endpoint},"
                "GATEWAY_TRACE_SAMPLE_RATIO=1.0",
            ]
            command = [
                sys.executable,
                str(ROOT / "bench" / "variants.py"),
                "--rounds",
                str(args.rounds),
                "--duration-s",
                str(args.duration_s),
                "--out",
                str(table_file),
                *variants,
            ]
            table = ""
            if args.rounds:  # 0: the in-process A/B only
                subprocess.run(command, cwd=ROOT, check=True)
                table = table_file.read_text().split("\n\n", 1)[1]
            core = _core(base, args.core_rounds, args.duration_s) if args.core_rounds else ""
    finally:
        sink.shutdown()
    summary = ""
    if table:
        summary = _summary(table, names)
    print(summary)
    command_line = " ".join(["python", "bench/tracing.py", *sys.argv[1:]])
    Path(args.out).write_text(
        f"Command: `{command_line}` (variants.py rounds; base = `{args.base}`)\n\n"
        f"{table}\n\n{summary}\n{core}\n"
    )
    return 0


def _summary(table: str, names: list[str]) -> str:
    rounds = _rounds(table, names)
    off_served, off_loop = _paired(rounds, "off", "base")
    on_served, on_loop = _paired(rounds, "on", "off")
    extra_us = statistics.median(r["on"][1] - r["off"][1] for r in rounds)
    exports, size = RECEIVED
    return (
        "Medians over rounds of each round's paired ratio:\n\n"
        f"- off / base: throughput {off_served:.3f}x, event-loop CPU per request "
        f"{off_loop:.3f}x\n"
        f"- on (ratio 1.0) / off: throughput {on_served:.3f}x, event-loop CPU per request "
        f"{on_loop:.3f}x: +{extra_us:.0f} us per request traced\n"
        f"- the OTLP sink got {exports} exports, {size / 1e6:.1f} MB of spans\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
