"""A 602 KB gRPC request through a link with latency: what HTTP/2 flow-control windows cost.

On loopback a WINDOW_UPDATE comes back at once, so a stream window smaller than the request
costs nothing there; over a real link each refill is a round trip. Here the link is
``gateway.testing.DelayProxy``, which holds everything the server sends (its WINDOW_UPDATEs
included) for ``--delay-ms``. The model (built here) sums an FP32 [150528] input (a 3x224x224
image) into one float: the request is big, the answer small, the model nearly free. One
``tritonclient.grpc`` client sends calls one after the other; per target and delay, the median
call of ``--calls``, in rounds that alternate the targets.

    .venv/bin/python bench/grpc_window.py before:PYTHONPATH=/tmp/base after: --triton \
        --delay-ms 0,5 --out bench/results/grpc_window.md
    .venv/bin/python bench/grpc_window.py now: --quick

A variant is ``name:ENV=V,ENV=V`` as in ``tree_ab.py``; ``PYTHONPATH=`` runs another tree.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import sweep
from tree_ab import parse_variant

from gateway.testing.delay_proxy import DelayProxy

MODEL = "image_sum"
FLOATS = 3 * 224 * 224
CONFIG = f"""name: "{MODEL}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input {{ name: "X" data_type: TYPE_FP32 dims: [ {FLOATS} ] }}
output {{ name: "Y" data_type: TYPE_FP32 dims: [ 1 ] }}
dynamic_batching {{ }}
"""


def build_model(repo: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["X"], ["Y"], keepdims=1)],
        MODEL,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, FLOATS])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 1])],
    )
    folder = repo / MODEL / "1"
    folder.mkdir(parents=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(folder / "model.onnx"))
    (repo / MODEL / "config.pbtxt").write_text(CONFIG)


def calls_ms(grpc_port: int, delay_s: float, calls: int) -> float:
    """The median of ``calls`` sequential calls through a new proxy (warmed by three)."""
    import tritonclient.grpc as grpcclient

    proxy = DelayProxy(grpc_port, delay_s=delay_s).start()
    client = grpcclient.InferenceServerClient(proxy.address)
    try:
        image = grpcclient.InferInput("X", [1, FLOATS], "FP32")
        image.set_data_from_numpy(np.ones((1, FLOATS), np.float32))
        took = []
        for i in range(calls + 3):
            started = time.perf_counter()
            client.infer(MODEL, [image])
            if i >= 3:
                took.append(time.perf_counter() - started)
        return statistics.median(took) * 1e3
    finally:
        client.close()
        proxy.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="name:ENV=V,ENV=V (the first: baseline)")
    parser.add_argument("--delay-ms", default="0,5", help="added to everything servers send")
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--triton", action="store_true", help="standalone tritonserver too")
    parser.add_argument("--quick", action="store_true", help="1 round of 5 calls")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    harness.exit_on_sigterm()  # the servers it starts stop with it
    if args.quick:
        args.rounds, args.calls = 1, 5
    delays = [float(d) for d in args.delay_ms.split(",")]
    got: dict[tuple[str, float], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        repo = work / "repo"
        build_model(repo)
        ports: dict[str, int] = {}
        for name, env in [parse_variant(v) for v in args.variants]:
            ports[name] = harness.free_port()
            gw = harness.start_gateway(
                repo, work, "--log-level", "warning", "--grpc-port", str(ports[name]),
                tag=name, ready=(MODEL,), detach=True,
                env={"GATEWAY_LOAD_MODELS": MODEL, "GATEWAY_ACCESS_LOG": "false", **env},
            )  # fmt: skip
            stack.callback(gw.stop)
        if args.triton:
            from gateway.testing.tritonserver import TritonServer

            triton = stack.enter_context(TritonServer(startup_timeout_s=120.0))
            sweep.push_to_triton(triton.http_url, repo, [MODEL])
            assert triton.grpc_port is not None
            ports["triton"] = triton.grpc_port
        names = list(ports)
        for r in range(args.rounds):
            for delay in delays:
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    ms = calls_ms(ports[name], delay / 1e3, args.calls)
                    got.setdefault((name, delay), []).append(ms)
                    print(f"round {r + 1} delay {delay:g} ms {name}: {ms:.2f} ms", flush=True)
    text = render(args, names, delays, got)
    print(text)
    if args.out:
        harness.write_results(args.out, text, {f"{n} {d:g} ms": v for (n, d), v in got.items()})


def render(
    args: argparse.Namespace,
    names: list[str],
    delays: list[float],
    got: dict[tuple[str, float], list[float]],
) -> str:
    base = names[0]
    rows = []
    for delay in delays:
        for name in names:
            ms = got[(name, delay)]
            ratios = sorted(a / b for a, b in zip(ms, got[(base, delay)], strict=True))
            rows.append(
                f"| {delay:g} | {name} | {statistics.median(ms):.2f} | "
                f"{' / '.join(f'{m:.1f}' for m in ms)} | {statistics.median(ratios):.2f}x |"
            )
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"""# A 602 KB gRPC request through a link with latency

Command: `.venv/bin/python bench/grpc_window.py {" ".join(sys.argv[1:])}`

2 shared CPUs, load average {load} at the end (1/5/15 min). `{MODEL}`: FP32 [{FLOATS}] summed
into one float (built here). One `tritonclient.grpc` client, calls one after the other through
a `DelayProxy` that holds what the server sends for the delay; the median of {args.calls} calls
per round ({args.rounds} rounds, targets alternated), and its ratio to `{base}` per round.

| added delay ms | target | median call ms | per round | vs {base} |
|---:|---|---:|---|---:|
{chr(10).join(rows)}
"""


if __name__ == "__main__":
    main()
