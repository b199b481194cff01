"""Where a lone request's time goes (issue 21): one binary HTTP request at a time through the
gateway, timed at every stage, against in-process ONNX Runtime.

A traced gateway (this file as its launcher, ``--serve-traced``) stamps each request on the
shared monotonic clock (``time.perf_counter_ns``, CLOCK_MONOTONIC on Linux, comparable across
processes) as it passes: bytes read, head parsed, decoded, submitted, batch dispatched, executor
thread started, ORT run done, result back on the loop, answer encoded, written. A minimal client
in this process (one connection, a pre-built request, blocking socket) stamps the send and the
whole response read. Per stage the median over the requests, and the sum against in-process
runs of the same item, the model loaded as the gateway loads it (session options, spinning).

    .venv/bin/python bench/lone_request.py --model mlp --requests 400
    .venv/bin/python bench/lone_request.py --quick --out /tmp/lone.md   # CI smoke, ~20 s

The stamps cost a few microseconds per stage; the untraced figure is perf_analyzer's (see
``bench/adaptive_delay.py``).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import csv
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

STAGES = (
    "send",  # client: the request written
    "read",  # gateway: data_received
    "routed",  # the raw path takes it (head parsed)
    "decoded",  # body decoded into tensors
    "submitted",  # validated, handed to the batcher (``Batcher.enqueue`` called)
    "dispatched",  # the batch handed to the backend (execute)
    "thread",  # the executor thread starts the run
    "ran",  # session.run returned (executor thread)
    "back",  # the result back on the event loop (execute returns)
    "answered",  # the request's end reaches the front end (_raw_done)
    "encoded",  # the response built, about to be written
    "written",  # handed to the transport
    "received",  # client: the whole response read
)


def _install_tracing(dump: Path) -> None:
    """Wrap the hot path's functions to stamp each stage (server side); dump at exit."""
    from functools import wraps

    from gateway.backends import onnxruntime as ortb
    from gateway.batching import Batcher
    from gateway.server import connections, infer

    stamps: dict[str, list[int]] = {s: [] for s in STAGES}
    now = time.perf_counter_ns

    def stamp(stage: str, fn: Any, after: bool = False) -> Any:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not after:
                stamps[stage].append(now())
            result = fn(*args, **kwargs)
            if after:
                stamps[stage].append(now())
            return result

        return wrapper

    def astamp(first: str, last: str, fn: Any) -> Any:
        @wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            stamps[first].append(now())
            result = await fn(*args, **kwargs)
            stamps[last].append(now())
            return result

        return wrapper

    protocol = connections.ConnectionProtocol
    protocol.data_received = stamp("read", protocol.data_received)  # type: ignore[method-assign]
    hot = infer.HotPath
    hot.answer_raw = stamp("routed", hot.answer_raw)  # type: ignore[method-assign]
    hot._raw_done = stamp("answered", hot._raw_done)  # type: ignore[method-assign]
    infer._Call.__call__ = stamp("decoded", infer._Call.__call__, after=True)  # type: ignore[method-assign]
    # At the batcher's door, not where ``DataPlane.submit`` returns: a lone batch may run, and
    # its answer be written, within the call.
    Batcher.enqueue = stamp("submitted", Batcher.enqueue)  # type: ignore[method-assign]
    backend = ortb.OnnxRuntimeBackend
    backend.execute = astamp("dispatched", "back", backend.execute)  # type: ignore[method-assign]
    if hasattr(backend, "execute_now"):  # inline: dispatched and back on the loop's thread
        original_now = backend.execute_now

        def traced_now(self: Any, *args: Any) -> Any:
            stamps["dispatched"].append(now())
            ran = original_now(self, *args)
            if ran is not None:
                stamps["back"].append(now())
            else:
                stamps["dispatched"].pop()
            return ran

        backend.execute_now = traced_now  # type: ignore[method-assign]
    original_run = backend._run

    def traced_run(self: Any, *args: Any) -> Any:
        stamps["thread"].append(now())
        ran = original_run(self, *args)
        stamps["ran"].append(now())
        return ran

    backend._run = traced_run  # type: ignore[method-assign]
    exchange = connections.RawExchange
    original_respond = exchange.respond

    def traced_respond(self: Any, status: int, headers: Any, body: bytes) -> None:
        stamps["encoded"].append(now())
        original_respond(self, status, headers, body)
        stamps["written"].append(now())

    exchange.respond = traced_respond  # type: ignore[method-assign]

    def write(*_: Any) -> None:
        part = dump.with_suffix(".part")
        part.write_text(json.dumps(stamps))
        part.rename(dump)

    signal.signal(signal.SIGUSR1, write)  # the bench asks before it stops the gateway


def serve_traced(dump: Path, argv: list[str]) -> None:
    _install_tracing(dump)
    from gateway import cli

    raise SystemExit(cli.main(argv))


def _request(model: Any, port: int) -> bytes:
    import harness

    body = harness.binary_body(model)
    head = (
        f"POST /v2/models/{model.name}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in body.headers.items())
        + f"Content-Length: {len(body.data)}\r\n\r\n"
    )
    return head.encode() + body.data


def _read_response(sock: socket.socket, buf: bytearray) -> None:
    """Read one whole response (Content-Length framed) into ``buf`` (cleared first)."""
    buf.clear()
    end = -1
    while end < 0:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise RuntimeError("connection closed")
        buf += chunk
        end = buf.find(b"\r\n\r\n")
    head = bytes(buf[:end]).lower()
    if not head.startswith(b"http/1.1 200"):
        raise RuntimeError(f"not a 200: {bytes(buf[:200])!r}")
    at = head.find(b"content-length:")
    length = int(head[at + 15 : head.find(b"\r\n", at)].strip())
    while len(buf) < end + 4 + length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise RuntimeError("connection closed")
        buf += chunk


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def drive(
    port: int, request: bytes, count: int, gap_s: float, sock: socket.socket | None = None
) -> tuple[list[int], list[int]]:
    """``count`` requests one at a time on one connection (``sock``, else a new one): send
    and receive stamps."""
    sent, received = [], []
    buf = bytearray()
    with contextlib.ExitStack() as stack:
        if sock is None:
            sock = stack.enter_context(connect(port))
        for _ in range(count):
            if gap_s:
                time.sleep(gap_s)
            sent.append(time.perf_counter_ns())
            sock.sendall(request)
            _read_response(sock, buf)
            received.append(time.perf_counter_ns())
    return sent, received


class _Loaded:
    """A loaded backend with ``InferenceSession.run``'s call shape."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def run(self, outputs: list[str], feeds: Any) -> Any:
        return self.backend.run_sync(feeds, outputs)


def in_process_session(
    repo: Path, model_name: str, ort_defaults: bool = False
) -> tuple[Any, Any, list[str]]:
    """The model loaded as the gateway loads it (its session options and its spinning
    decision, ``ort_spin_max_run_ms``), or with ``ort_defaults`` a plain session with ONNX
    Runtime's defaults (its pool spins: issue 21's in-process baseline), warmed, with one
    item's feeds."""
    import asyncio

    import harness
    import onnxruntime

    from gateway.backends.onnxruntime import OnnxRuntimeFactory
    from gateway.repository.local import LocalRepository
    from gateway.settings import Settings

    session: Any
    if ort_defaults:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = onnxruntime.InferenceSession(
            str(repo / model_name / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
    else:
        factory = OnnxRuntimeFactory(Settings())
        backend = asyncio.run(factory.load(LocalRepository(repo).source(model_name), 1))
        session = _Loaded(backend)
    model = harness.read_model(repo, model_name)
    feeds = harness.sample_inputs(model, 1)
    outputs = list(model.outputs)
    for _ in range(10):
        session.run(outputs, feeds)
    return session, feeds, outputs


def pa_point(pa: str, model: str, address: str, work: Path) -> float:
    """perf_analyzer's p50 ms at concurrency 1 (binary HTTP, three 500 ms windows)."""
    report = work / f"pa-{time.monotonic_ns()}.csv"
    cmd = [
        pa, "-m", model, "-u", address, "-i", "http", "--concurrency-range", "1", "-p", "500",
        "-s", "999", "-r", "3", "--input-data", "zero", "-f", str(report),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0 or not report.exists():
        raise RuntimeError(f"perf_analyzer failed:\n{out.stdout[-500:]}\n{out.stderr[-500:]}")
    with report.open() as f:
        return int(next(csv.DictReader(f))["p50 latency"]) / 1e3


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``name:ENV=V,ENV=V`` (``PYTHONPATH=/tree`` runs another source tree)."""
    name, _, envs = text.partition(":")
    return name, dict(item.split("=", 1) for item in envs.split(",") if item)


def chain(stamps: dict[str, list[int]], sent: list[int], received: list[int]) -> list[list[int]]:
    """Each request's stamp of each stage: the first one at or after its stamp of the stage
    before (a large body is read in several pieces; readiness probes come before)."""
    rows = []
    for s, r in zip(sent, received, strict=True):
        row, at_ns = [s], s
        for stage in STAGES[1:-1]:
            values = stamps[stage]
            i = bisect.bisect_left(values, at_ns)
            at_ns = values[i] if i < len(values) else at_ns
            row.append(at_ns if i < len(values) else -1)
        rows.append([*row, r])
    return rows


def run(
    repo: Path,
    model_name: str,
    variants: list[tuple[str, dict[str, str]]],
    rounds: int,
    block: int,
    gap_s: float,
    extra: list[str],
    perf_analyzer: str | None = None,
    spaced_s: float = 0.001,
    ort_defaults: bool = False,
) -> dict[str, Any]:
    """Every variant's traced gateway at once; rounds of: in-process ``block`` runs, then
    ``block`` lone requests to each variant (the order rotated per round), and with
    ``perf_analyzer`` (its path) one perf_analyzer point at concurrency 1 after each block: its
    p50 beside this bench's client's says what the load generator itself costs."""
    import harness

    model = harness.read_model(repo, model_name)
    session, feeds, outputs = in_process_session(repo, model_name, ort_defaults)
    in_process: list[float] = []
    in_process_spaced: list[float] = []
    client: dict[str, list[int]] = {name: [] for name, _ in variants}
    sent: dict[str, list[int]] = {name: [] for name, _ in variants}
    received: dict[str, list[int]] = {name: [] for name, _ in variants}
    stamps: dict[str, dict[str, list[int]]] = {}
    pa_p50: dict[str, list[float]] = {name: [] for name, _ in variants}
    rss_mb: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        gateways = {}
        sockets: dict[str, socket.socket] = {}
        for name, env in variants:
            dump = workdir / f"stamps-{name}.json"
            launcher = [sys.executable, str(Path(__file__).resolve()), "--serve-traced", str(dump)]
            gw = harness.start_gateway(
                repo,
                workdir,
                "--log-level",
                "warning",
                *extra,
                env={
                    "GATEWAY_LOAD_MODELS": model_name,
                    "GATEWAY_ACCESS_LOG": "false",
                    # the kept connection idles through the other variants' turns
                    "GATEWAY_KEEPALIVE_TIMEOUT_S": "600",
                    **env,
                },
                launcher=launcher,
                tag=name,
                ready=(model_name,),
                detach=True,
            )
            stack.callback(gw.stop)
            gateways[name] = (gw, dump, _request(model, gw.port))
            # One connection kept, as a lone client keeps its own (and perf_analyzer).
            sockets[name] = stack.enter_context(connect(gw.port))
            drive(gw.port, gateways[name][2], 20, gap_s, sockets[name])  # warm-up
        # Past the second after a connection's first request, in which the gateway takes it
        # that clients may connect per request (``gateway.batching.clients``), as a lone
        # client's would be.
        time.sleep(1.2)
        for r in range(rounds):
            for _ in range(block):
                started = time.perf_counter_ns()
                session.run(outputs, feeds)
                in_process.append(time.perf_counter_ns() - started)
            for _ in range(block):  # as the gateway's runs come: after an idle gap
                time.sleep(spaced_s)
                started = time.perf_counter_ns()
                session.run(outputs, feeds)
                in_process_spaced.append(time.perf_counter_ns() - started)
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for name, _ in order:
                gw, _, request = gateways[name]
                s, e = drive(gw.port, request, block, gap_s, sockets[name])
                sent[name] += s
                received[name] += e
                client[name] += [b - a for a, b in zip(s, e, strict=True)]
                if perf_analyzer:
                    pa_p50[name].append(pa_point(perf_analyzer, model_name, gw.address, Path(tmp)))
        for name, (gw, dump, _) in gateways.items():
            rss_mb[name] = _rss_mb(gw.proc.pid)
            os.kill(gw.proc.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while not dump.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            stamps[name] = json.loads(dump.read_text())
    stages: dict[str, dict[str, float]] = {}
    overhead: dict[str, list[int]] = {}
    ort: dict[str, list[int]] = {}
    thread, ran = STAGES.index("thread"), STAGES.index("ran")
    for name, _ in variants:
        rows = chain(stamps[name], sent[name], received[name])
        ort[name] = [row[ran] - row[thread] for row in rows if min(row) >= 0]
        overhead[name] = [
            row[-1] - row[0] - (row[ran] - row[thread]) for row in rows if min(row) >= 0
        ]
        stages[name] = {}
        for i, (prev, stage) in enumerate(itertools.pairwise(STAGES)):
            gaps = [row[i + 1] - row[i] for row in rows if row[i] >= 0 and row[i + 1] >= 0]
            stages[name][f"{prev} -> {stage}"] = statistics.median(gaps) / 1e6 if gaps else -1
    return {
        "in_process_p50_ms": statistics.median(in_process) / 1e6,
        "in_process_mean_ms": statistics.mean(in_process) / 1e6,
        "in_process_spaced_p50_ms": statistics.median(in_process_spaced) / 1e6,
        "in_process_spaced_mean_ms": statistics.mean(in_process_spaced) / 1e6,
        "ort_mean_ms": {n: statistics.mean(v) / 1e6 for n, v in ort.items() if v},
        "p50_ms": {name: statistics.median(v) / 1e6 for name, v in client.items()},
        "p90_ms": {name: float(np.percentile(v, 90)) / 1e6 for name, v in client.items()},
        "overhead_p50_ms": {n: statistics.median(v) / 1e6 for n, v in overhead.items() if v},
        "ort_p50_ms": {n: statistics.median(v) / 1e6 for n, v in ort.items() if v},
        "stages": stages,
        "perf_analyzer_p50_ms": {n: statistics.median(v) for n, v in pa_p50.items() if v},
        "rss_mb": rss_mb,
    }


def _rss_mb(pid: int) -> float:
    """A process's resident memory (VmRSS) in MiB, -1 where /proc cannot tell."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return -1.0


def main() -> None:
    import harness

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help="name:ENV=V,ENV=V [shipped:]")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--repo", type=Path, default=None, help="model repository")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=50, help="requests per variant per round")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="client think time")
    parser.add_argument(
        "--in-process-gap-ms",
        type=float,
        default=1.0,
        help="idle time before each spaced in-process run (a lone request's round trip) [1]",
    )
    parser.add_argument(
        "--in-process-ort-defaults",
        action="store_true",
        help="in-process runs on a session with ONNX Runtime's defaults (spinning), issue 21's "
        "baseline, instead of as the gateway loads the model",
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds of 20")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--serve-arg", action="append", default=[], help="for gateway serve")
    parser.add_argument(
        "--perf-analyzer", action="store_true", help="also perf_analyzer at c=1 each round"
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.block = 2, 20
    repo = (args.repo or harness.ROOT / "model_repo").resolve()
    variants = [parse_variant(v) for v in args.variants] or [("shipped", {})]
    pa = harness.perf_analyzer_path() if args.perf_analyzer else None
    result = run(
        repo,
        args.model,
        variants,
        args.rounds,
        args.block,
        args.gap_ms / 1e3,
        args.serve_arg,
        pa,
        args.in_process_gap_ms / 1e3,
        args.in_process_ort_defaults,
    )
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    ip50 = result["in_process_p50_ms"]
    base = variants[0][0]
    head = "| | " + " | ".join(name for name, _ in variants) + " |"
    rule = "|---|" + "---:|" * len(variants)
    summary = [
        "| p50 ms | " + " | ".join(f"{result['p50_ms'][n]:.3f}" for n, _ in variants) + " |",
        "| vs in-process p50 | "
        + " | ".join(f"{result['p50_ms'][n] - ip50:+.3f}" for n, _ in variants)
        + " |",
        f"| vs {base} | "
        + " | ".join(f"{result['p50_ms'][n] / result['p50_ms'][base]:.3f}x" for n, _ in variants)
        + " |",
        "| p90 ms | " + " | ".join(f"{result['p90_ms'][n]:.3f}" for n, _ in variants) + " |",
        *(
            [
                "| perf_analyzer c=1 p50 ms | "
                + " | ".join(f"{result['perf_analyzer_p50_ms'][n]:.3f}" for n, _ in variants)
                + " |"
            ]
            if result["perf_analyzer_p50_ms"]
            else []
        ),
        "| ORT run p50 ms | "
        + " | ".join(f"{result['ort_p50_ms'].get(n, -1):.3f}" for n, _ in variants)
        + " |",
        "| ORT run mean ms | "
        + " | ".join(f"{result['ort_mean_ms'].get(n, -1):.3f}" for n, _ in variants)
        + " |",
        "| ORT run p50 vs in-process spaced p50 | "
        + " | ".join(
            f"{result['ort_p50_ms'].get(n, -1) / result['in_process_spaced_p50_ms']:.3f}x"
            for n, _ in variants
        )
        + " |",
        "| **overhead p50 ms** (client total - ORT run) | "
        + " | ".join(f"{result['overhead_p50_ms'].get(n, -1):.3f}" for n, _ in variants)
        + " |",
        f"| overhead vs {base} | "
        + " | ".join(
            f"{result['overhead_p50_ms'].get(n, -1) / result['overhead_p50_ms'][base]:.3f}x"
            for n, _ in variants
        )
        + " |",
        "| gateway RSS MiB (after the run) | "
        + " | ".join(f"{result['rss_mb'].get(n, -1):.0f}" for n, _ in variants)
        + " |",
    ]
    stage_rows = [
        f"| {stage} | "
        + " | ".join(f"{result['stages'][n][stage]:.3f}" for n, _ in variants)
        + " |"
        for stage in result["stages"][base]
    ]
    described = "; ".join(f"`{n}`: {env or 'defaults'}" for n, env in variants)
    baseline = "ORT's defaults" if args.in_process_ort_defaults else "as the gateway loads it"
    markdown = f"""# A lone request's stages (`{args.model}`)

Command: `.venv/bin/python bench/lone_request.py {" ".join(sys.argv[1:])}`

2 shared CPUs, load average {load} at the end (1/5/15 min); one client connection, one request
at a time, binary HTTP, the connection kept; {args.rounds} rounds of {args.block} requests per
variant, in-process
`session.run` ({baseline}) interleaved: back to back {ip50:.3f} ms p50
(mean {result["in_process_mean_ms"]:.3f}),
and each after {args.in_process_gap_ms:g} ms idle, as the gateway's runs come,
{result["in_process_spaced_p50_ms"]:.3f} ms p50 (mean {result["in_process_spaced_mean_ms"]:.3f}).
Variants: {described}.

{head}
{rule}
{chr(10).join(summary)}

Per stage (median ms; the traced gateway stamps each request as it passes):

{head}
{rule}
{chr(10).join(stage_rows)}
"""
    print(markdown)
    if args.out:
        harness.write_results(args.out, markdown, result)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-traced":
        serve_traced(Path(sys.argv[2]), sys.argv[3:])
    main()
