"""What tracing costs: the gateway with tracing off, and on at sample ratio 1.0, against the tree
before tracing existed, in interleaved rounds (``variants.py``).

Three variants, each a gateway of its own under ``wrk -c64`` (``mlp``, binary bodies, batching
on), after in-process ONNX Runtime in every round:

- ``base``: the commit given by ``--base`` (default ``main``), exported with ``git archive``;
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="commit before tracing [main]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "tracing.md"))
    args = parser.parse_args()
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
            subprocess.run(command, cwd=ROOT, check=True)
            table = table_file.read_text().split("\n\n", 1)[1]
    finally:
        sink.shutdown()
    rounds = _rounds(table, names)
    off_served, off_loop = _paired(rounds, "off", "base")
    on_served, on_loop = _paired(rounds, "on", "off")
    extra_us = statistics.median(r["on"][1] - r["off"][1] for r in rounds)
    exports, size = RECEIVED
    summary = (
        "Medians over rounds of each round's paired ratio:\n\n"
        f"- off / base: throughput {off_served:.3f}x, event-loop CPU per request "
        f"{off_loop:.3f}x\n"
        f"- on (ratio 1.0) / off: throughput {on_served:.3f}x, event-loop CPU per request "
        f"{on_loop:.3f}x: +{extra_us:.0f} us per request traced\n"
        f"- the OTLP sink got {exports} exports, {size / 1e6:.1f} MB of spans\n"
    )
    print(summary)
    command_line = " ".join(["python", "bench/tracing.py", *sys.argv[1:]])
    Path(args.out).write_text(
        f"Command: `{command_line}` (variants.py rounds; base = `{args.base}`)\n\n"
        f"{table}\n\n{summary}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
