"""The gateway's gRPC front end against standalone Triton's, and against itself before a change.

Starts every target at once, each serving the same models:

- a gateway per source tree: this checkout (``new``; with ``--transports asyncio,grpcio``,
  one per gRPC transport instead, ``gw-asyncio`` and ``gw-grpcio``) and each ``--tree
  name=PATH`` (another checkout's root, e.g. ``git archive HEAD | tar -x -C /tmp/base``; its
  gateway runs with ``PYTHONPATH`` there), and each ``--env name:ENV=V,...`` variant of this
  checkout;
- unless ``--no-triton``, standalone ``tritonserver`` (``gateway.testing.tritonserver``: the
  same ONNX files through its python backend, pushed as ``bench/sweep.py`` does);
- with ``--null``, a bare ``grpc.aio`` server on the gateway's event loop kind (uvloop) that
  answers every ``ModelInfer`` (and each request of a ``ModelStreamInfer``) with one fixed,
  pre-serialized response: protobuf parses the request for its model name, nothing else runs.
  Its figures are the ceiling of any front end built on ``grpc.aio`` here.

Then, for ``--rounds`` rounds, every (model, protocol, concurrency) point (protocols: ``grpc``
unary calls, ``stream``: perf_analyzer's ``--streaming`` over ``ModelStreamInfer``, ``http``)
runs perf_analyzer (``scripts/perf_analyzer.sh``) against each target one after the other, in
an order that turns each round: the machine's speed drifts, so each ratio compares windows
seconds apart.
Besides throughput and latency, each gateway's CPU time per request (all its threads, from
/proc, over the requests its statistics counted) is recorded: on a shared machine it moves
less than throughput. Prints and writes (``--out``) the medians over rounds and the ratios
against Triton and ``--baseline``.

    .venv/bin/python bench/grpc_front.py --tree base=/tmp/base --baseline base --null
    .venv/bin/python bench/grpc_front.py --transports asyncio,grpcio --baseline gw-grpcio
    .venv/bin/python bench/grpc_front.py --quick            # errors only, ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import sweep

ROOT = harness.ROOT
NULL = "grpc.aio-null"


def _levels(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--null-server":
        return null_server(int(sys.argv[2]), Path(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="simple,mlp")
    parser.add_argument("--protocols", default="grpc,stream,http", help="stream: gRPC streaming")
    parser.add_argument("--concurrency", type=_levels, default=[1, 4, 16, 64])
    parser.add_argument("--tree", action="append", default=[], help="name=PATH (another tree)")
    parser.add_argument("--env", action="append", default=[], help="name:ENV=V,ENV=V variant")
    parser.add_argument("--transports", default="",
                        help="one gateway of this tree per gRPC transport (asyncio,grpcio), "
                        "named gw-<transport>, instead of 'new'")  # fmt: skip
    parser.add_argument("--baseline", default="", help="target the others are divided by")
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--null", action="store_true", help="add the bare grpc.aio server")
    parser.add_argument(
        "--queue-delay-us",
        type=int,
        default=None,
        help="set every model's max_queue_delay_microseconds (default: none)",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window-ms", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="errors only: c=1,16, one round")
    parser.add_argument("--out", type=Path, help="markdown file for the table")
    args = parser.parse_args()
    harness.exit_on_sigterm()  # the servers it starts stop with it
    if args.quick:
        args.concurrency, args.rounds, args.window_ms = [1, 16], 1, 300
    models = [m for m in args.models.split(",") if m]
    protocols = [p for p in args.protocols.split(",") if p]
    variants: list[tuple[str, dict[str, str]]] = [("new", {"PYTHONPATH": str(ROOT)})]
    if args.transports:
        variants = [
            (f"gw-{t}", {"PYTHONPATH": str(ROOT), "GATEWAY_GRPC_TRANSPORT": t})
            for t in args.transports.split(",")
            if t
        ]
    for item in args.tree:
        name, _, path = item.partition("=")
        variants.append((name, {"PYTHONPATH": str(Path(path).resolve())}))
    for item in args.env:
        name, _, envs = item.partition(":")
        env = dict(e.split("=", 1) for e in envs.split(",") if e)
        variants.append((name, {"PYTHONPATH": str(ROOT), **env}))
    pa = sweep.perf_analyzer()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = harness.machine_info().get("loadavg_at_start")
    results: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    errors = 0
    with tempfile.TemporaryDirectory(prefix="bench-grpc-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        (work / "repo").mkdir()
        repo = sweep.build_repo(work / "repo", models)
        if args.queue_delay_us is not None:
            for model in models:
                _set_queue_delay(repo, model, args.queue_delay_us)
        targets: dict[str, dict[str, str]] = {}
        gateways: dict[str, harness.Gateway] = {}
        for name, env in variants:
            grpc_port = harness.free_port()
            full = {"GATEWAY_LOAD_MODELS": ",".join(models), "GATEWAY_GRPC_PORT": str(grpc_port),
                    **env}  # fmt: skip
            gw = harness.start_gateway(repo, work, "--log-level", "warning", env=full, tag=name,
                                       ready=tuple(models))  # fmt: skip
            stack.callback(gw.stop)
            targets[name] = {"http": gw.address, "grpc": f"127.0.0.1:{grpc_port}"}
            gateways[name] = gw
        if args.null:
            targets[NULL] = {"grpc": stack.enter_context(_null(repo, models, work))}
        if not args.no_triton:
            from gateway.testing.tritonserver import TritonServer

            triton = stack.enter_context(TritonServer(startup_timeout_s=120.0))
            sweep.push_to_triton(triton.http_url, repo, models)
            targets["triton"] = {"http": triton.http_address, "grpc": triton.grpc_url}
        names = list(targets)
        turn = 0
        for rnd in range(args.rounds):
            for model in models:
                for protocol in protocols:
                    for c in args.concurrency:
                        order = names[turn % len(names) :] + names[: turn % len(names)]
                        turn += 1
                        for name in order:
                            url = targets[name].get("http" if protocol == "http" else "grpc")
                            if url is None:
                                continue
                            got = measure(pa, gateways.get(name), model, url, protocol, c,
                                          args.window_ms, work)  # fmt: skip
                            head = f"r{rnd} {name:14s} {model:7s} {protocol:5s} c={c:<3d}"
                            if "error" in got:
                                errors += 1
                                print(f"{head} ERROR {got['error']}", flush=True)
                                continue
                            results.setdefault((model, protocol, c, name), []).append(got)
                            print(f"{head} {_line(got)}", flush=True)
    text = render(args, results, names, models, protocols, started, load)
    print(text)
    if args.out:
        harness.write_results(args.out, text)
    return 1 if errors else 0


def _set_queue_delay(repo: Path, model: str, delay_us: int) -> None:
    """Give a model's ``dynamic_batching`` a ``max_queue_delay_microseconds``. The repository
    links the shipped models: the model's folder becomes a real one (its files still links)
    and its config a new file, so the checkout's ``model_repo`` stays as it is."""
    folder = repo / model
    if folder.is_symlink():
        source = folder.resolve()
        folder.unlink()
        shutil.copytree(source, folder, copy_function=os.symlink)
    config = folder / "config.pbtxt"
    text = re.sub(r"\s*max_queue_delay_microseconds:\s*\d+", "", config.read_text())
    text, n = re.subn(
        r"dynamic_batching\s*\{",
        f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us}",
        text,
    )
    if not n:
        text += f"\ndynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
    config.unlink()
    config.write_text(text)


def measure(
    pa: str,
    gw: harness.Gateway | None,
    model: str,
    url: str,
    protocol: str,
    concurrency: int,
    window_ms: int,
    work: Path,
) -> dict[str, Any]:
    """One perf_analyzer point (``stream``: gRPC's bidirectional ``ModelStreamInfer``), with a
    gateway's CPU time per request."""
    report = work / f"pa-{model}-{protocol}-{concurrency}-{time.monotonic_ns()}.csv"
    cmd = [pa, "-m", model, "-u", url, "-i", "http" if protocol == "http" else "grpc",
           "--concurrency-range", str(concurrency), "-p", str(window_ms), "-s", "999", "-r", "3",
           "--input-data", "zero", "-f", str(report)]  # fmt: skip
    if protocol == "stream":
        cmd.append("--streaming")
    before = _cpu_and_count(gw, model)
    limit_s = 30 + 6 * window_ms / 1000 * max(1, concurrency / 8)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {limit_s:.0f} s"}
    after = _cpu_and_count(gw, model)
    if out.returncode != 0 or not report.exists():
        return {"error": " / ".join((out.stdout + out.stderr).strip().splitlines()[-3:])[:300]}
    with report.open() as f:
        row = next(csv.DictReader(f))
    got: dict[str, Any] = {
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": int(row["p50 latency"]) / 1e3,
        "p99_ms": int(row["p99 latency"]) / 1e3,
    }
    if before and after and after[1] > before[1]:
        got["cpu_us"] = (after[0] - before[0]) / (after[1] - before[1]) * 1e6
        if after[2] > before[2]:  # requests per execution: the batch size the batcher formed
            got["batch"] = (after[3] - before[3]) / (after[2] - before[2])
    return got


def _line(got: dict[str, Any]) -> str:
    cpu = f" cpu {got['cpu_us']:6.0f} us/req" if "cpu_us" in got else ""
    batch = f" batch {got['batch']:5.2f}" if "batch" in got else ""
    return (f"{got['throughput']:8.1f}/s p50 {got['p50_ms']:7.2f} p99 {got['p99_ms']:7.2f} "
            f"ms{cpu}{batch}")  # fmt: skip


def _cpu_and_count(gw: harness.Gateway | None, model: str) -> tuple[float, int, int, int] | None:
    """(the gateway's CPU seconds, requests it counted for ``model``, its executions and the
    inferences in them): their deltas over a run are its CPU per request and batch size."""
    if gw is None:
        return None
    cpu = harness.process_cpu_s(gw.pid)
    stats = gw.stats(model)
    count = int(stats["inference_stats"]["success"]["count"])
    executions, inferences = int(stats["execution_count"]), int(stats["inference_count"])
    return None if cpu is None else (cpu, count, executions, inferences)


# -- the bare grpc.aio server ------------------------------------------------------------------


@contextlib.contextmanager
def _null(repo: Path, models: list[str], work: Path) -> Any:
    """The ``--null`` target as a child process; yields its gRPC address."""
    port = harness.free_port()
    log = work / "null.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--null-server", str(port), str(repo)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NULL_MODELS": ",".join(models)},
        )
    try:
        deadline = time.monotonic() + 30
        while b"serving" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"null server did not start; see {log}")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        harness.stop(proc)


def null_server(port: int, repo: Path) -> int:
    """Serve what perf_analyzer asks before it measures (server and model metadata, config)
    from the models' own metadata, then answer every ``ModelInfer`` with zeros of each
    output's shape at batch 1, serialized once."""
    import grpc  # type: ignore[import-untyped]
    import numpy as np
    from tritonclient.grpc import model_config_pb2 as mc
    from tritonclient.grpc import service_pb2 as pb

    models = {m: harness.read_model(repo, m) for m in os.environ["NULL_MODELS"].split(",")}
    answers: dict[str, bytes] = {}
    for name in models:
        response = pb.ModelInferResponse(model_name=name, model_version="1")
        for out, datatype, dims in _outputs(repo, name):
            response.outputs.add(name=out, datatype=datatype, shape=[1, *dims])
            response.raw_output_contents.append(np.zeros(dims, harness._NUMPY[datatype]).tobytes())
        answers[name] = response.SerializeToString()

    served: dict[str, int] = {}

    async def infer(request: bytes, context: Any) -> bytes:
        name = pb.ModelInferRequest.FromString(request).model_name
        served[name] = served.get(name, 0) + 1
        return answers[name]

    async def stream(requests: Any, context: Any) -> Any:
        async for raw in requests:
            request = pb.ModelInferRequest.FromString(raw)
            served[request.model_name] = served.get(request.model_name, 0) + 1
            response = pb.ModelInferResponse.FromString(answers[request.model_name])
            response.id = request.id
            yield pb.ModelStreamInferResponse(infer_response=response).SerializeToString()

    async def metadata(request: Any, context: Any) -> Any:
        model = models[request.name]
        reply = pb.ModelMetadataResponse(name=request.name, versions=["1"], platform="null")
        for t in model.inputs:
            reply.inputs.add(name=t.name, datatype=t.datatype, shape=[-1, *t.dims])
        for out, datatype, dims in _outputs(repo, request.name):
            reply.outputs.add(name=out, datatype=datatype, shape=[-1, *dims])
        return reply

    async def config(request: Any, context: Any) -> Any:
        cfg = mc.ModelConfig(name=request.name, max_batch_size=models[request.name].max_batch_size)
        return pb.ModelConfigResponse(config=cfg)

    async def server_metadata(request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name="null", version="0", extensions=[])

    async def statistics(request: Any, context: Any) -> Any:
        """Counts, no times: perf_analyzer writes its server columns only from counts."""
        reply = pb.ModelStatisticsResponse()
        for name in [request.name] if request.name else list(models):
            n = served.get(name, 0)
            stats = reply.model_stats.add(name=name, version="1")
            stats.inference_count = stats.execution_count = n
            for part in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
                getattr(stats.inference_stats, part).count = n
        return reply

    def unary(fn: Any, kind: str) -> Any:
        request, response = getattr(pb, kind + "Request"), getattr(pb, kind + "Response")
        return grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )

    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),  # bytes in, bytes out
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(stream),
        "ModelMetadata": unary(metadata, "ModelMetadata"),
        "ModelConfig": unary(config, "ModelConfig"),
        "ServerMetadata": unary(server_metadata, "ServerMetadata"),
        "ModelStatistics": unary(statistics, "ModelStatistics"),
    }

    async def serve() -> None:
        server = grpc.aio.server()
        service = "inference.GRPCInferenceService"
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("serving", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(1)

    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(serve())
    return 0


def _outputs(repo: Path, model: str) -> list[tuple[str, str, list[int]]]:
    """(name, v2 datatype, dims) of each output in a model's config.pbtxt."""
    text = (repo / model / "config.pbtxt").read_text()
    found = []
    for body in re.findall(r"\boutput\s*\{([^}]*)\}", text):
        name = re.search(r'name:\s*"([^"]+)"', body)
        kind = re.search(r"data_type:\s*(\w+)", body)
        dims = [int(d) for d in re.findall(r"dims:\s*(-?\d+)", body)]
        if name and kind:
            found.append((name.group(1), harness._PBTXT_TYPE[kind.group(1)], dims))
    return found


# -- the table ----------------------------------------------------------------------------------


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def render(
    args: argparse.Namespace,
    results: dict[tuple[str, str, int, str], list[dict[str, Any]]],
    names: list[str],
    models: list[str],
    protocols: list[str],
    started: str,
    load: Any,
) -> str:
    refs = [n for n in (args.baseline, "triton") if n and n in names]
    loads = ", ".join(f"{x:.1f}" for x in load) if load else "?"
    lines = [
        "# gRPC front end: the gateway against standalone Triton",
        "",
        f"`python bench/grpc_front.py {' '.join(sys.argv[1:])}`, {started}; load average at "
        f"start {loads}. perf_analyzer shares 2 cores with the servers and other work ran on "
        f"the machine: medians of {args.rounds} interleaved round(s) of {args.window_ms} ms "
        "windows; compare within this table only. CPU: the gateway's CPU time (all threads) "
        "per request; batch: the model's inferences per execution in the window. "
        f"`{NULL}`: a bare grpc.aio server answering a fixed response.",
        "",
    ]
    head = "| model | protocol | c | target | infer/s | p50 ms | p99 ms | CPU us/req | batch |"
    rule = "|---|---|---|---|---|---|---|---|---|"
    for ref in refs:
        head += f" thr / {ref} | p99 / {ref} | CPU / {ref} |"
        rule += "---|---|---|"
    lines += [head, rule]
    for model in models:
        for protocol in protocols:
            for c in args.concurrency:
                for name in names:
                    runs = results.get((model, protocol, c, name), [])
                    if not runs:
                        continue
                    thr, p50, p99, cpu, batch = (
                        _median(runs, k)
                        for k in ("throughput", "p50_ms", "p99_ms", "cpu_us", "batch")
                    )
                    row = (f"| {model} | {protocol} | {c} | {name} | {_f(thr, '.0f')} | "
                           f"{_f(p50)} | {_f(p99)} | {_f(cpu, '.0f')} | {_f(batch)} |")  # fmt: skip
                    for ref in refs:
                        base = results.get((model, protocol, c, ref), [])
                        bthr, bp99, bcpu = (
                            _median(base, k) for k in ("throughput", "p99_ms", "cpu_us")
                        )
                        row += f" {_ratio(thr, bthr)} | {_ratio(p99, bp99)} | {_ratio(cpu, bcpu)} |"
                    lines.append(row)
    return "\n".join(lines) + "\n"


def _f(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
