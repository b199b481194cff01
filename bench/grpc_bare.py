"""What a gRPC transport costs before any model runs: three bare servers answering a constant.

Each server answers ``ModelInfer`` for ``simple`` with one pre-serialized response (protobuf
parses the request for its model name, as the gateway's would; nothing else runs), and the few
RPCs perf_analyzer asks first from fixed answers. All on uvloop, one process each:

- ``grpc.aio``: ``grpc.aio.server`` with one generic handler (the gateway's transport today);
- ``h2``: an ``asyncio.Protocol`` driving the ``h2`` library's ``H2Connection``;
- ``frames``: an ``asyncio.Protocol`` reading HTTP/2 frames itself (``struct`` headers,
  ``hpack`` for request header blocks, decoded blocks cached by their bytes while the HPACK
  dynamic table does not change; response header blocks pre-encoded without indexing).

Clients: perf_analyzer over gRPC and ``tritonclient.grpc.aio`` (``--clients``), concurrency
``--concurrency``; per point the server's CPU time (all threads, /proc) over the calls it
answered, and the client's calls per second. Rounds interleave the servers in turning order.

    .venv/bin/python bench/grpc_bare.py --rounds 3 --out bench/results/grpc_bare.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import importlib.util
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import sweep

SERVERS = ("grpc.aio", "h2", "frames")
SERVICE = "/inference.GRPCInferenceService/"


# -- fixed answers ------------------------------------------------------------------------------


def answers(counter: list[int]) -> dict[str, Callable[[bytes], bytes]]:
    """Path -> (request bytes -> response bytes) for ``simple``."""
    import numpy as np
    from tritonclient.grpc import model_config_pb2 as mc
    from tritonclient.grpc import service_pb2 as pb

    infer = pb.ModelInferResponse(model_name="simple", model_version="1")
    for name in ("OUTPUT0", "OUTPUT1"):
        infer.outputs.add(name=name, datatype="INT32", shape=[1, 16])
        infer.raw_output_contents.append(np.zeros(16, np.int32).tobytes())
    infer_bytes = infer.SerializeToString()
    meta = pb.ModelMetadataResponse(name="simple", versions=["1"], platform="null")
    for t in ("INPUT0", "INPUT1"):
        meta.inputs.add(name=t, datatype="INT32", shape=[-1, 16])
    for t in ("OUTPUT0", "OUTPUT1"):
        meta.outputs.add(name=t, datatype="INT32", shape=[-1, 16])
    config = pb.ModelConfigResponse(config=mc.ModelConfig(name="simple", max_batch_size=8))
    server = pb.ServerMetadataResponse(name="null", version="0", extensions=[])

    def model_infer(data: bytes) -> bytes:
        pb.ModelInferRequest.FromString(data).model_name  # noqa: B018  # the parse is the cost
        counter[0] += 1
        return infer_bytes

    def stats(data: bytes) -> bytes:
        reply = pb.ModelStatisticsResponse()
        s = reply.model_stats.add(name="simple", version="1")
        s.inference_count = s.execution_count = counter[0]
        for part in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
            getattr(s.inference_stats, part).count = counter[0]
        return reply.SerializeToString()

    fixed = {
        "ModelMetadata": meta.SerializeToString(),
        "ModelConfig": config.SerializeToString(),
        "ServerMetadata": server.SerializeToString(),
        "ServerLive": pb.ServerLiveResponse(live=True).SerializeToString(),
        "ModelReady": pb.ModelReadyResponse(ready=True).SerializeToString(),
    }
    table: dict[str, Callable[[bytes], bytes]] = {
        SERVICE + k: (lambda _d, v=v: v) for k, v in fixed.items()
    }
    table[SERVICE + "ModelInfer"] = model_infer
    table[SERVICE + "ModelStatistics"] = stats
    return table


# -- (a) grpc.aio -------------------------------------------------------------------------------


async def serve_grpc_aio(port: int, table: dict[str, Callable[[bytes], bytes]]) -> Any:
    import grpc  # type: ignore[import-untyped]

    def handler(fn: Callable[[bytes], bytes]) -> Any:
        async def call(request: bytes, context: Any) -> bytes:
            return fn(request)

        return grpc.unary_unary_rpc_method_handler(call)

    handlers = {path.rsplit("/", 1)[1]: handler(fn) for path, fn in table.items()}
    server = grpc.aio.server()
    service = SERVICE.strip("/")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, {"ModelInfer": handlers["ModelInfer"]})
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


# -- (b) the h2 library -------------------------------------------------------------------------


def h2_protocol(table: dict[str, Callable[[bytes], bytes]]) -> Callable[[], asyncio.Protocol]:
    import h2.config
    import h2.connection
    import h2.events

    config = h2.config.H2Configuration(client_side=False, header_encoding=None)
    response_headers = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    trailers = [(b"grpc-status", b"0")]

    class H2Server(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.conn = h2.connection.H2Connection(config=config)
            self.conn.initiate_connection()
            self.conn.increment_flow_control_window(2**30)
            self.paths: dict[int, bytes] = {}
            self.bodies: dict[int, bytearray] = {}
            transport.write(self.conn.data_to_send())

        def data_received(self, data: bytes) -> None:
            conn = self.conn
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self.paths[event.stream_id] = dict(event.headers)[b":path"]
                    self.bodies[event.stream_id] = bytearray()
                elif isinstance(event, h2.events.DataReceived):
                    self.bodies[event.stream_id] += event.data
                    if event.flow_controlled_length:
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                elif isinstance(event, h2.events.StreamEnded):
                    sid = event.stream_id
                    path, body = self.paths.pop(sid), self.bodies.pop(sid)
                    out = table[path.decode()](bytes(body[5:]))
                    conn.send_headers(sid, response_headers)
                    conn.send_data(sid, b"\0" + struct.pack(">I", len(out)) + out)
                    conn.send_headers(sid, trailers, end_stream=True)
            self.transport.write(conn.data_to_send())

    return H2Server


# -- (c) frames read here -----------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST, SETTINGS, PING, GOAWAY, WINDOW, CONT = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 1, 1, 4, 8, 32


def frames_protocol(table: dict[str, Callable[[bytes], bytes]]) -> Callable[[], asyncio.Protocol]:
    # The HPACK parts (header blocks without table state, decoded blocks reused by their bytes)
    # are the gateway's own, from gateway.grpc.http2; the frames are read here, bare.
    from gateway.grpc.http2 import HeaderDecoder, header_block
    from gateway.grpc.http2 import frame as _frame

    settings = _frame(SETTINGS, 0, 0, struct.pack(">HIHI", 4, 2**30, 3, 1000))
    window = _frame(WINDOW, 0, 0, struct.pack(">I", 2**30))
    head_block = header_block([(b":status", b"200"), (b"content-type", b"application/grpc")])
    trailer_block = header_block([(b"grpc-status", b"0")])

    class FrameServer(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.buf = b""
            self.preface = False
            self.decoder = HeaderDecoder()
            self.paths: dict[int, bytes] = {}
            self.bodies: dict[int, list[bytes]] = {}
            self.received = 0
            transport.write(settings + window)

        def headers(self, block: bytes) -> dict[bytes, bytes]:
            return dict(self.decoder.decode(block))

        def data_received(self, data: bytes) -> None:
            buf = self.buf + data if self.buf else data
            pos, n = 0, len(buf)
            if not self.preface:
                if n < 24:
                    self.buf = buf
                    return
                self.preface, pos = True, 24
            out: list[bytes] = []
            acked = 0
            while n - pos >= 9:
                length = buf[pos] << 16 | buf[pos + 1] << 8 | buf[pos + 2]
                if n - pos - 9 < length:
                    break
                kind, flags = buf[pos + 3], buf[pos + 4]
                sid = int.from_bytes(buf[pos + 5 : pos + 9]) & 0x7FFFFFFF
                payload = buf[pos + 9 : pos + 9 + length]
                pos += 9 + length
                if kind == DATA:
                    acked += length
                    self.bodies[sid].append(payload)
                    if flags & END_STREAM:
                        out.append(self.answer(sid))
                elif kind == HEADERS:
                    if flags & PRIORITY:
                        payload = payload[5:]
                    self.paths[sid] = self.headers(payload)[b":path"]
                    self.bodies[sid] = []
                elif kind == SETTINGS and not flags & ACK:
                    out.append(_frame(SETTINGS, ACK, 0, b""))
                elif kind == PING and not flags & ACK:
                    out.append(_frame(PING, ACK, 0, payload))
            self.buf = buf[pos:]
            if acked:
                self.received += acked
                if self.received > 2**29:
                    out.append(_frame(WINDOW, 0, 0, struct.pack(">I", self.received)))
                    self.received = 0
            if out:
                self.transport.write(b"".join(out))

        def answer(self, sid: int) -> bytes:
            body = b"".join(self.bodies.pop(sid))
            reply = table[self.paths.pop(sid).decode()](body[5:])
            return b"".join(
                (
                    _frame(HEADERS, END_HEADERS, sid, head_block),
                    _frame(DATA, 0, sid, b"\0" + struct.pack(">I", len(reply)) + reply),
                    _frame(HEADERS, END_HEADERS | END_STREAM, sid, trailer_block),
                )
            )

    return FrameServer


def serve(kind: str, port: int) -> int:
    import uvloop

    counter = [0]
    table = answers(counter)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if kind == "grpc.aio":
            server: Any = await serve_grpc_aio(port, table)
        else:
            factory = h2_protocol(table) if kind == "h2" else frames_protocol(table)
            server = await loop.create_server(factory, "127.0.0.1", port)
        print("serving", flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        if kind == "grpc.aio":
            await server.stop(0)
        else:
            server.close()

    uvloop.run(main())
    return 0


# -- the driver ---------------------------------------------------------------------------------


@contextlib.contextmanager
def start(kind: str, work: Path) -> Any:
    port = harness.free_port()
    log = work / f"{kind}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port)],
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while b"serving" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start: {log.read_text()[-500:]}")
            time.sleep(0.05)
        yield proc, f"127.0.0.1:{port}"
    finally:
        harness.stop(proc)


def served(url: str) -> int:
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics("simple")
        return int(stats.model_stats[0].inference_count)
    finally:
        client.close()


def run_pa(pa: str, url: str, c: int, window_ms: int, work: Path) -> float:
    report = work / f"pa-{time.monotonic_ns()}.csv"
    cmd = [pa, "-m", "simple", "-u", url, "-i", "grpc", "--concurrency-range", str(c),
           "-p", str(window_ms), "-s", "999", "-r", "3", "--input-data", "zero",
           "-f", str(report)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if out.returncode or not report.exists():
        raise RuntimeError((out.stdout + out.stderr)[-400:])
    with report.open() as f:
        return float(next(csv.DictReader(f))["Inferences/Second"])


def run_tc(url: str, c: int, window_ms: int) -> float:
    """tritonclient.grpc.aio: ``c`` tasks calling ``infer`` in a loop for the window."""
    import numpy as np
    import tritonclient.grpc.aio as tca

    async def main() -> float:
        client = tca.InferenceServerClient(url)
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            t = tca.InferInput(name, [1, 16], "INT32")
            t.set_data_from_numpy(np.zeros((1, 16), np.int32))
            inputs.append(t)
        await client.infer("simple", inputs)
        done = [0]
        end = time.monotonic() + window_ms / 1000

        async def worker() -> None:
            while time.monotonic() < end:
                await client.infer("simple", inputs)
                done[0] += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(c)))
        elapsed = time.monotonic() - t0
        await client.close()
        return done[0] / elapsed

    return asyncio.run(main())


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        return serve(sys.argv[2], int(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--clients", default="perf_analyzer,tritonclient")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window-ms", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    kinds = args.servers.split(",")
    if "h2" in kinds and importlib.util.find_spec("h2") is None:
        print("h2 is not installed (the bench extra): its server is left out", flush=True)
        kinds.remove("h2")
    clients = args.clients.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    pa = sweep.perf_analyzer()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = harness.machine_info().get("loadavg_at_start")
    results: dict[tuple[str, int, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-bare-") as tmp, contextlib.ExitStack() as st:
        work = Path(tmp)
        servers = {k: st.enter_context(start(k, work)) for k in kinds}
        turn = 0
        for rnd in range(args.rounds):
            for client in clients:
                for c in levels:
                    order = kinds[turn % len(kinds) :] + kinds[: turn % len(kinds)]
                    turn += 1
                    for kind in order:
                        proc, url = servers[kind]
                        cpu0, n0 = harness.process_cpu_s(proc.pid), served(url)
                        if client == "perf_analyzer":
                            rate = run_pa(pa, url, c, args.window_ms, work)
                        else:
                            rate = run_tc(url, c, args.window_ms)
                        cpu1, n1 = harness.process_cpu_s(proc.pid), served(url)
                        assert cpu0 is not None and cpu1 is not None
                        cpu_us = (cpu1 - cpu0) / max(1, n1 - n0) * 1e6
                        results.setdefault((client, c, kind), []).append((rate, cpu_us))
                        print(f"r{rnd} {client:13s} c={c:<3d} {kind:9s} {rate:8.0f}/s "
                              f"{cpu_us:6.1f} us CPU/call", flush=True)  # fmt: skip
    loads = ", ".join(f"{x:.1f}" for x in load) if load else "?"
    lines = [
        "# Bare gRPC transports: a constant answer, no model",
        "",
        f"`python bench/grpc_bare.py {' '.join(sys.argv[1:])}`, {started}, load average at "
        f"start {loads}; 2 shared cores (client, servers and other work). Medians of "
        f"{args.rounds} interleaved rounds. CPU: the server process's CPU time per call answered "
        "(including perf_analyzer's warm-up calls).",
        "",
        "| client | c | server | calls/s | CPU us/call | calls/s / grpc.aio | CPU / grpc.aio |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for client in clients:
        for c in levels:
            base = results.get((client, c, "grpc.aio"))
            b_rate = statistics.median(r for r, _ in base) if base else None
            b_cpu = statistics.median(u for _, u in base) if base else None
            for kind in kinds:
                runs = results[(client, c, kind)]
                rate = statistics.median(r for r, _ in runs)
                cpu = statistics.median(u for _, u in runs)
                lines.append(f"| {client} | {c} | {kind} | {rate:.0f} | {cpu:.0f} | "
                             f"{harness.ratio(rate, b_rate) or 0:.2f}x | "
                             f"{harness.ratio(cpu, b_cpu) or 0:.2f}x |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        harness.write_results(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
