"""A 4 MiB FP32 input through system shared memory against the binary HTTP path, in one run.

Starts ``gateway serve`` (HTTP and gRPC) with one model, ``sum4m``: FP32 [1, 1048576] (4 MiB)
-> its sum, so ONNX Runtime's share of each request is small and the way the input travels is
what differs. One ``tritonclient`` client sends requests back to back (latency, not
throughput: the point of shared memory is what one big request costs) in each mode:

- ``rest_binary``: the baseline, the tensor in the HTTP body (binary tensor extension);
- ``rest_shm``: the tensor in a registered region, the body only names it;
- ``rest_shm_write``: the same, the client also writing a fresh tensor into the region before
  each request (what a client producing new data pays);
- ``grpc_raw`` / ``grpc_shm``: the same two over gRPC.

Prints median and p90 latency, the gateway's CPU per request and the request's bytes on the
wire, each as a ratio to ``rest_binary`` measured in the same run, and writes a Markdown table.

    .venv/bin/python bench/shared_memory.py            # 60 requests per mode
    .venv/bin/python bench/shared_memory.py --quick    # 15 per mode (CI-style smoke run)

That the shared-memory input reaches ONNX Runtime without a copy (the array handed to the
backend shares memory with the client's region) is shown by
``tests/test_shared_memory.py::test_a_4mb_input_is_a_view_of_the_mapping_up_to_the_backend``;
this bench shows what that saves end to end. Client and gateway share the machine's cores.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from harness import (
    RESULTS,
    free_port,
    percentile,
    process_cpu_s,
    ratio,
    start_gateway,
    write_results,
)
from onnx import TensorProto, helper

ELEMENTS = 1 << 20  # 4 MiB of FP32
MODEL = "sum4m"
CONFIG = f"""
name: "{MODEL}"
max_batch_size: 1
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ {ELEMENTS} ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 1 ] }} ]
"""
ROUNDS = 3
MODES = ("rest_binary", "rest_shm", "rest_shm_write", "grpc_raw", "grpc_shm")


def write_model(repo: Path) -> None:
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["X", "axes"], ["Y"], keepdims=1)],
        MODEL,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", ELEMENTS])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 1])],
        [axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    (repo / MODEL / "1").mkdir(parents=True)
    onnx.save(model, str(repo / MODEL / "1" / "model.onnx"))
    (repo / MODEL / "config.pbtxt").write_text(CONFIG)


def _bytes(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def run_mode(send: Callable[[], float], requests: int) -> list[float]:
    """Latencies (s) of ``requests`` sequential requests, after 3 warm-up ones (not timed)."""
    for _ in range(3):
        send()
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        got = send()
        latencies.append(time.perf_counter() - started)
        if not np.isfinite(got):
            raise RuntimeError("bad answer")
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60, help="per mode [60]")
    parser.add_argument("--quick", action="store_true", help="15 requests per mode")
    parser.add_argument("--out", type=Path, default=RESULTS / "shared_memory.md")
    args = parser.parse_args()
    requests = 15 if args.quick else args.requests

    x = np.random.default_rng(0).standard_normal((1, ELEMENTS)).astype(np.float32)
    expected = float(x.sum())
    tag = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_model(work / "repo")
        grpc_port = free_port()
        gw = start_gateway(
            work / "repo",
            work,
            "--grpc-port",
            str(grpc_port),
            "--log-level",
            "warning",
            env={"GATEWAY_ACCESS_LOG": "false"},
            ready=(MODEL,),
        )
        region = shm.create_shared_memory_region("x", f"/gwbench_{tag}", x.nbytes, True)
        try:
            shm.set_shared_memory_region(region, [x])
            rest = httpclient.InferenceServerClient(gw.address, network_timeout=60)
            grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            rest.register_system_shared_memory("x", f"/gwbench_{tag}", x.nbytes)

            rest_binary = httpclient.InferInput("X", [1, ELEMENTS], "FP32")
            rest_binary.set_data_from_numpy(x, binary_data=True)
            rest_shm = httpclient.InferInput("X", [1, ELEMENTS], "FP32")
            rest_shm.set_shared_memory("x", x.nbytes)
            grpc_raw = grpcclient.InferInput("X", [1, ELEMENTS], "FP32").set_data_from_numpy(x)
            grpc_shm = grpcclient.InferInput("X", [1, ELEMENTS], "FP32")
            grpc_shm.set_shared_memory("x", x.nbytes)
            out = [httpclient.InferRequestedOutput("Y", binary_data=True)]

            def rest_call(tensor: Any, write: bool = False) -> Callable[[], float]:
                def send() -> float:
                    if write:
                        shm.set_shared_memory_region(region, [x])
                    return float(rest.infer(MODEL, [tensor], outputs=out).as_numpy("Y")[0, 0])

                return send

            def grpc_call(tensor: Any) -> Callable[[], float]:
                return lambda: float(grpc.infer(MODEL, [tensor]).as_numpy("Y")[0, 0])

            sends = {
                "rest_binary": rest_call(rest_binary),
                "rest_shm": rest_call(rest_shm),
                "rest_shm_write": rest_call(rest_shm, write=True),
                "grpc_raw": grpc_call(grpc_raw),
                "grpc_shm": grpc_call(grpc_shm),
            }
            for send in sends.values():  # right answers before timing anything
                got = send()
                if abs(got - expected) > 1e-2 * max(1.0, abs(expected)):
                    raise RuntimeError(f"wrong sum {got}, expected {expected}")
            wire: dict[str, Any] = {
                "rest_binary": len(rest.generate_request_body([rest_binary], outputs=out)[0]),
                "rest_shm": len(rest.generate_request_body([rest_shm], outputs=out)[0]),
                "grpc_raw": f"{x.nbytes:,} + header",  # raw_input_contents
                "grpc_shm": "header only",
            }
            wire["rest_shm_write"] = wire["rest_shm"]
            # Modes interleaved in rounds, so a burst of other load on the shared machine
            # falls on all of them alike.
            latencies: dict[str, list[float]] = {m: [] for m in MODES}
            cpu_s: dict[str, float | None] = dict.fromkeys(MODES, 0.0)
            per_round = max(1, requests // ROUNDS)
            for _ in range(ROUNDS):
                for mode in MODES:
                    cpu_before = process_cpu_s(gw.pid)
                    latencies[mode] += run_mode(sends[mode], per_round)
                    cpu_after = process_cpu_s(gw.pid)
                    spent = cpu_s[mode]
                    if spent is None or cpu_before is None or cpu_after is None:
                        cpu_s[mode] = None
                    else:
                        cpu_s[mode] = spent + cpu_after - cpu_before
            results: dict[str, dict[str, Any]] = {}
            for mode in MODES:
                spent = cpu_s[mode]
                sent = ROUNDS * (per_round + 3)  # warm-up requests included
                results[mode] = {
                    "p50_ms": statistics.median(latencies[mode]) * 1e3,
                    "p90_ms": (percentile(latencies[mode], 90) or 0.0) * 1e3,
                    "cpu_us": None if spent is None else spent / sent * 1e6,
                    "wire_bytes": wire[mode],
                }
                print(f"{mode:15s} p50 {results[mode]['p50_ms']:7.2f} ms", flush=True)
            rest.unregister_system_shared_memory()
        finally:
            shm.destroy_shared_memory_region(region)
            gw.stop()

    base = results["rest_binary"]
    rows = [
        "| mode | p50 ms | p90 ms | p50 vs rest_binary | gateway CPU us/request | CPU vs "
        "rest_binary | request bytes on the wire |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        r = results[mode]
        lat = ratio(r["p50_ms"], base["p50_ms"])
        cpu = ratio(r["cpu_us"], base["cpu_us"])
        rows.append(
            f"| {mode} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {lat:.2f}x | "
            f"{r['cpu_us']:.0f} | {cpu:.2f}x | {_bytes(r['wire_bytes'])} |"
            if lat is not None and cpu is not None
            else f"| {mode} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | n/a | n/a | n/a | "
            f"{_bytes(r['wire_bytes'])} |"
        )
    table = "\n".join(rows)
    print("\n" + table)
    command = "python bench/shared_memory.py" + (" --quick" if args.quick else "")
    markdown = f"""# System shared memory vs the binary HTTP path: one 4 MiB FP32 input

`{command}` ({requests} sequential requests per mode in {ROUNDS} interleaved rounds, each
after 3 warm-up ones; one client, batch 1;
{platform.machine()}, {platform.python_version()}, the client on the same 2 shared cores).
Model `{MODEL}`: FP32 [1, {ELEMENTS}] -> its sum. Ratios are against `rest_binary` in this run.

{table}

`rest_shm_write` includes the client's own copy of the tensor into the region before each
request. The input reaches ONNX Runtime as a view of the region (no copy in the gateway):
`tests/test_shared_memory.py::test_a_4mb_input_is_a_view_of_the_mapping_up_to_the_backend`.
"""
    write_results(args.out, markdown, {"requests": requests, "results": results})


if __name__ == "__main__":
    sys.exit(main())
