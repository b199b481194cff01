"""Per-request cost of the gateway's shared-memory path for `simple` (2 INT32[1,16] inputs and
outputs in regions), piece by piece: decode of the JSON body perf_analyzer sends (against the
binary body of the same request), region resolve, output write. Run it on two trees and compare
(the machine's speed drifts; run both in one go):

    PYTHONPATH=/tmp/base .venv/bin/python bench/shm_micro.py
    PYTHONPATH=$PWD .venv/bin/python bench/shm_micro.py
"""

from __future__ import annotations

import os
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.http as httpclient
from tritonclient.http._utils import _get_inference_request

from gateway.protocol import codec
from gateway.protocol.types import (
    InferRequest,
    InferResponse,
    RequestedOutput,
    SharedInput,
    SharedMemoryRef,
)
from gateway.shared_memory import SharedMemoryRegistry, write_outputs

N = 20000


def per_call_us(call: Callable[[], Any]) -> float:
    return min(timeit.repeat(call, number=N, repeat=5)) / N * 1e6


def body(shm: bool) -> tuple[bytes, int | None]:
    """The request body tritonclient (and so perf_analyzer) sends."""
    ins = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    outs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("OUTPUT0", "OUTPUT1")]
    if shm:
        for i, x in enumerate(ins):
            x.set_shared_memory(f"input{i}", 64)
        for i, y in enumerate(outs):
            y.set_shared_memory(f"output{i}", 64)
    else:
        for x in ins:
            x.set_data_from_numpy(np.zeros((1, 16), np.int32), binary_data=True)
    data, length = _get_inference_request(ins, "", outs, 0, 0, 0, 0, None, None)
    return bytes(data), length


def main() -> None:
    for shm in (False, True):
        data, length = body(shm)
        us = per_call_us(lambda: codec.decode_infer_request(data, length))  # noqa: B023
        print(f"decode {'shm JSON' if shm else 'binary'}: {us:.2f} us")
    key = f"gw_shm_micro_{os.getpid()}"
    fd = os.open(f"/dev/shm/{key}", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    os.close(fd)
    registry = SharedMemoryRegistry()
    try:
        for i, name in enumerate(["in0", "in1", "out0", "out1"]):
            registry.register(name, "/" + key, i * 64, 64)

        def request() -> InferRequest:
            return InferRequest(
                {},
                outputs=[
                    RequestedOutput("OUTPUT0", shared=SharedMemoryRef("out0", 64)),
                    RequestedOutput("OUTPUT1", shared=SharedMemoryRef("out1", 64)),
                ],
                shared_inputs={
                    "INPUT0": SharedInput("INT32", (1, 16), SharedMemoryRef("in0", 64)),
                    "INPUT1": SharedInput("INT32", (1, 16), SharedMemoryRef("in1", 64)),
                },
            )

        batch = np.arange(128, dtype=np.int32).reshape(8, 16)

        def response() -> InferResponse:
            return InferResponse("simple", "1", {"OUTPUT0": batch[2:3], "OUTPUT1": batch[3:4]})

        resolved = request()
        registry.resolve(resolved)
        build = per_call_us(request)
        resolve = per_call_us(lambda: registry.resolve(request())) - build
        print(f"resolve (2 in, 2 out): {resolve:.2f} us")
        made = per_call_us(response)
        write = per_call_us(lambda: write_outputs(resolved, response())) - made
        print(f"write_outputs (2): {write:.2f} us")
    finally:
        registry.close()
        os.unlink(f"/dev/shm/{key}")


if __name__ == "__main__":
    main()
