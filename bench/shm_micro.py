"""Per-request cost of the gateway's shared-memory path for `simple` (2 INT32[1,16] inputs and
outputs in regions), piece by piece: decode of the JSON body perf_analyzer sends (against the
binary body of the same request), region resolve (perf_analyzer's layout, a region per tensor,
and tritonclient's examples', both inputs in one region and both outputs in another), output
write, response encoding. Each piece's thread CPU time (preemption by the machine's other work
does not count), best of three repeats.

    .venv/bin/python bench/shm_micro.py                     # this tree
    .venv/bin/python bench/shm_micro.py before:PYTHONPATH=/tmp/base after: --rounds 9 \
        --out bench/results/shm_micro.md

With variants (``name:PYTHONPATH=<tree>``, as in ``tree_ab.py``) each round runs every tree
in a process of its own, one after the other; per piece: the best time of each and the
ratio to the first, taken per round (median and range), and each tree's median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

N = 20000
ONE = "--one"  # run in a tree's process: print the pieces as JSON


def per_call_us(call: Callable[[], Any]) -> float:
    return min(timeit.repeat(call, number=N, repeat=3, timer=time.thread_time)) / N * 1e6


def body(shm: bool) -> tuple[bytes, int | None]:
    """The request body perf_analyzer sends (it opens with an empty id; regions named as
    perf_analyzer names them)."""
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.http._utils import _get_inference_request

    ins = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    outs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("OUTPUT0", "OUTPUT1")]
    if shm:
        for x in ins:
            x.set_shared_memory(f"{x.name()}_0_0", 64)
        for y in outs:
            y.set_shared_memory(y.name(), 64)
    else:
        for x in ins:
            x.set_data_from_numpy(np.zeros((1, 16), np.int32), binary_data=True)
    data, length = _get_inference_request(ins, "", outs, 0, 0, 0, 0, None, None)
    return b'{"id":"",' + bytes(data)[1:], None if length is None else length + 8


def pieces() -> dict[str, float]:
    """Microseconds per call of each piece, in this process's tree."""
    import numpy as np

    from gateway.protocol import codec
    from gateway.protocol.types import (
        InferRequest,
        InferResponse,
        RequestedOutput,
        SharedInput,
        SharedMemoryRef,
    )
    from gateway.shared_memory import SharedMemoryRegistry, write_outputs

    got: dict[str, float] = {}
    for shm in (False, True):
        data, length = body(shm)
        us = per_call_us(lambda: codec.decode_infer_request(data, length))  # noqa: B023
        got["decode perf_analyzer's shm JSON body" if shm else "decode its binary body"] = us
    key = f"gw_shm_micro_{os.getpid()}"
    fd = os.open(f"/dev/shm/{key}", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    os.close(fd)
    registry = SharedMemoryRegistry()
    try:
        names = ["INPUT0_0_0", "INPUT1_0_0", "OUTPUT0", "OUTPUT1", "in", "out"]
        for i, name in enumerate(names):
            registry.register(name, "/" + key, i * 128, 128)

        def request(ins: tuple[str, str], outs: tuple[str, str]) -> Callable[[], InferRequest]:
            step = 64 if ins[0] == ins[1] else 0  # two tensors in one region: side by side
            return lambda: InferRequest(
                {},
                outputs=[
                    RequestedOutput("OUTPUT0", shared=SharedMemoryRef(outs[0], 64)),
                    RequestedOutput("OUTPUT1", shared=SharedMemoryRef(outs[1], 64, step)),
                ],
                shared_inputs={
                    "INPUT0": SharedInput("INT32", (1, 16), SharedMemoryRef(ins[0], 64)),
                    "INPUT1": SharedInput("INT32", (1, 16), SharedMemoryRef(ins[1], 64, step)),
                },
            )

        for label, make in (
            ("resolve, a region per tensor (perf_analyzer)", request(
                ("INPUT0_0_0", "INPUT1_0_0"), ("OUTPUT0", "OUTPUT1"))),
            ("resolve, two regions (tritonclient's examples)", request(
                ("in", "in"), ("out", "out"))),
        ):  # fmt: skip
            made = make()  # resolved again and again: the same work each time
            got[label] = per_call_us(lambda: registry.resolve(made))  # noqa: B023
        resolved = request(("INPUT0_0_0", "INPUT1_0_0"), ("OUTPUT0", "OUTPUT1"))()
        registry.resolve(resolved)
        batch = np.arange(128, dtype=np.int32).reshape(8, 16)

        def response(shared: bool = False) -> InferResponse:
            made = InferResponse("simple", "1", {"OUTPUT0": batch[2:3], "OUTPUT1": batch[3:4]})
            made.id = ""
            if shared:
                made.shared.update(("OUTPUT0", "OUTPUT1"))
            return made

        answer, shm_answer = response(), response(True)
        got["write_outputs (2)"] = per_call_us(lambda: write_outputs(resolved, answer))
        binary = [RequestedOutput(n, binary=True) for n in ("OUTPUT0", "OUTPUT1")]
        got["encode the shm answer"] = per_call_us(
            lambda: codec.encode_infer_response(shm_answer, resolved.outputs)
        )
        got["encode the binary answer"] = per_call_us(
            lambda: codec.encode_infer_response(response(), binary)
        )
        got["(make a response, in the line above)"] = per_call_us(response)
    finally:
        registry.close()
        os.unlink(f"/dev/shm/{key}")
    return got


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == ONE:
        print(json.dumps(pieces()))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import harness
    from tree_ab import parse_variant

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help="name:PYTHONPATH=<tree> (the first: baseline)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not args.variants:
        for piece, us in pieces().items():
            print(f"{piece}: {us:.2f} us")
        return
    variants = [parse_variant(v) for v in args.variants]
    got: dict[str, list[dict[str, float]]] = {name: [] for name, _ in variants}
    for _ in range(args.rounds):
        for name, env in variants:
            out = subprocess.run(
                [sys.executable, __file__, ONE],
                env={**os.environ, **env},
                cwd=harness.ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            got[name].append(json.loads(out.stdout))
    base = variants[0][0]
    header = " | ".join(f"{name} us" for name, _ in variants)
    ratios = " | ".join(f"{name} vs {base}" for name, _ in variants[1:])
    lines = [
        "# Per-request pieces of the shared-memory path (`simple`)",
        "",
        f"Command: `.venv/bin/python bench/shm_micro.py {' '.join(sys.argv[1:])}`",
        "",
        f"Thread CPU time per call (best of 3 repeats), median of {args.rounds} rounds (each tree",
        "in a process of its own, one after the other); ratios taken per round, median and range.",
        "2 shared CPUs, load",
        f"average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end.",
        "",
        f"| piece | {header} | {ratios} |",
        "|---|" + "---:|" * (2 * len(variants) - 1),
    ]
    for piece in got[base][0]:
        best = " | ".join(
            f"{statistics.median(r[piece] for r in got[name]):.2f}" for name, _ in variants
        )
        cells = []
        for name, _ in variants[1:]:
            per = sorted(
                a[piece] / b[piece] for a, b in zip(got[name], got[base], strict=True) if b[piece]
            )
            cells.append(f"{statistics.median(per):.2f}x ({per[0]:.2f}-{per[-1]:.2f})")
        lines.append(f"| {piece} | {best} | {' | '.join(cells)} |")
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if args.out:
        harness.write_results(args.out, markdown, got)


if __name__ == "__main__":
    main()
