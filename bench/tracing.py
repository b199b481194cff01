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


def _median(table: str, name: str, names: list[str]) -> tuple[float, float]:
    """(ratio to in-process, loop us per request) of ``name`` in the table's median row."""
    row = next(line for line in table.splitlines() if line.startswith("| median"))
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    found = re.match(r"([\d.]+)x, loop (\d+) us/req", cells[names.index(name)])
    assert found, row
    return float(found[1]), float(found[2])


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
    base_ratio, base_loop = _median(table, "base", names)
    off_ratio, off_loop = _median(table, "off", names)
    on_ratio, on_loop = _median(table, "on", names)
    exports, size = RECEIVED
    summary = (
        f"- off / base: throughput {off_ratio / base_ratio:.3f}x, event-loop CPU "
        f"{off_loop:.0f} vs {base_loop:.0f} us per request\n"
        f"- on (ratio 1.0) / off: throughput {on_ratio / off_ratio:.3f}x, event-loop CPU "
        f"+{on_loop - off_loop:.0f} us per request ({on_loop:.0f} vs {off_loop:.0f})\n"
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
