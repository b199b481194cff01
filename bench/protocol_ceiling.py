"""What the HTTP layer costs: the gateway against a bare httptools protocol over the same core.

The gateway's inference requests cross uvicorn (httptools parsing into an ASGI scope, a
``RequestResponseCycle`` per request, ``receive``/``send`` messages), the connection layer
(timeouts, disconnect hooks, gathered writes), the hot path and the access log. This measures
how much of the event loop's time per request that is, and what it would buy for issue 2's goal,
by serving the same ``DataPlane`` (batcher, ONNX Runtime backend, codec) from a minimal
``asyncio.Protocol`` on ``httptools`` that only knows binary ``POST .../infer`` with a
Content-Length: no guards, limits, timeouts, pipelining or access log. It is a measuring
instrument, not a server to deploy.

    .venv/bin/python bench/protocol_ceiling.py --rounds 6

Each round: in-process ONNX Runtime at batch 64 for ``--duration-s``, then under
``wrk -t1 -c64`` for as long each of: the gateway as shipped (``raw_infer`` on: inference
answered by the connection layer without ASGI), the gateway with ``GATEWAY_RAW_INFER=false``
(every request through uvicorn's ASGI cycle), and the bare protocol. Prints and writes
``bench/results/protocol_ceiling.md``: items/s as a ratio to that round's in-process figure, and
the event loop's CPU per request (the server's main thread, from ``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

ROOT = harness.ROOT
MODEL = "mlp"


# -- the bare server (run as a subprocess: ``--serve PORT``) ----------------------------------


def serve_bare(port: int) -> None:
    import httptools
    import uvloop

    from gateway.cli import build_app, tune_interpreter
    from gateway.protocol.codec import decode_infer_request, encode_infer_response
    from gateway.settings import Settings

    settings = Settings(model_repo=str(ROOT / "model_repo"), access_log=False)
    tune_interpreter(settings.gc_threshold, settings.gil_switch_interval_us)
    dataplane = build_app(settings).dataplane
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n"
        b"inference-header-content-length: %d\r\n\r\n"
    )

    class Bare(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)
            self.url, self.body, self.header_length = b"", [], None

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            if name.lower() == b"inference-header-content-length":
                self.header_length = int(value)

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            work = self.answer(self.url, b"".join(self.body), self.header_length)
            self.url, self.body, self.header_length = b"", [], None
            asyncio.get_running_loop().create_task(work)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        async def answer(self, url: bytes, body: bytes, header_length: int | None) -> None:
            name = url.split(b"/")[3].decode()
            request = decode_infer_request(body, header_length)
            result = await dataplane.infer(name, None, request)
            payload, json_length = encode_infer_response(
                result, request.outputs, request.binary_output
            )
            if not self.transport.is_closing():
                self.transport.write(head % (len(payload), json_length or 0) + payload)

    async def main() -> None:
        await dataplane.start()
        server = await asyncio.get_running_loop().create_server(Bare, "127.0.0.1", port)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    uvloop.install()
    asyncio.run(main())


@contextlib.contextmanager
def bare_server(workdir: Path) -> Any:
    port = harness.free_port()
    log = workdir / "bare.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"GATEWAY_LOAD_MODELS": MODEL, "PATH": "/usr/bin:/bin"},
        )
    try:
        deadline = time.monotonic() + 120
        while b"ready" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bare server did not start; see {log}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        harness.stop(proc)


# -- the rounds -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--out", default=str(ROOT / "bench/results/protocol_ceiling.md"))
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_bare(args.serve)
        return 0
    model = harness.read_model(ROOT / "model_repo", MODEL)
    ratios: dict[str, list[float]] = {}
    lines = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        script = harness.lua_script(harness.binary_body(model), work, MODEL)
        shipped = stack.enter_context(harness.gateway(ROOT / "model_repo", {}, work, "shipped"))
        asgi = stack.enter_context(
            harness.gateway(ROOT / "model_repo", {"GATEWAY_RAW_INFER": "false"}, work, "asgi")
        )
        bare_url, bare_pid = stack.enter_context(bare_server(work))
        targets = [
            ("gateway", shipped.url, shipped.proc.pid),
            ("gateway, raw_infer off (all ASGI)", asgi.url, asgi.proc.pid),
            ("bare httptools protocol", bare_url, bare_pid),
        ]
        for number in range(1, args.rounds + 1):
            limit = harness.measure_in_process(
                ROOT / "model_repo", model, 0, args.duration_s, [model.max_batch_size]
            )[0]["items_per_s"]
            cells = [f"{limit:.0f}"]
            for name, base, pid in targets:
                url = f"{base}/v2/models/{MODEL}/infer"
                harness.run_wrk(url, script, 64, 1, 1)  # warm-up
                before = harness.thread_cpu_s(pid).get(pid, 0.0)
                out = harness.run_wrk(url, script, 64, 1, args.duration_s)
                loop_s = harness.thread_cpu_s(pid).get(pid, 0.0) - before
                served, errors = harness.wrk_figures(out)
                ratios.setdefault(name, []).append(served / limit)
                loop_ms = loop_s / max(1, out["requests"]) * 1e3
                cells.append(
                    f"{served:.0f} = {served / limit:.3f}x, loop {loop_ms:.3f} ms/req, "
                    f"errors {errors}"
                )
            lines.append(f"| {number} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    head = "| round | in-process b64 | " + " | ".join(ratios) + " |"
    rule = "|---:|---:|" + "---|" * len(ratios)
    medians = "| median | | " + " | ".join(f"{statistics.median(r):.3f}x" for r in ratios.values())
    table = "\n".join([head, rule, *lines, medians + " |"])
    print(table)
    command = " ".join(["python", "bench/protocol_ceiling.py", *sys.argv[1:]])
    Path(args.out).write_text(
        f"# What the HTTP layer costs\n\nCommand: `{command}`  \n"
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: "
        f"{harness.machine_info()['nproc']} CPUs, shared. `mlp`, binary bodies, one item per "
        f"request, `wrk -t1 -c64`, {args.duration_s:g} s per point after 1 s of warm-up.\n\n"
        f"{table}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
