"""Where a request's tensor bytes are copied between the body and ONNX Runtime: nowhere on
the way in for a lone request (views into the body, handed on as they are), once when a batch
of several is formed. The gRPC wire format: ``tests/test_grpc_wire.py``; the raw HTTP path's
body and answer: ``tests/test_uvicorn_seam.py``; bytes copied per request: ``bench/sweep.py``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import numpy as np
import pytest

from gateway.batching import Batcher, BatchPolicy, Executed
from gateway.protocol.codec import decode_infer_request
from gateway.stats import ModelStats

pytestmark = pytest.mark.timeout(10)


def _binary_body(*arrays: np.ndarray) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": f"IN{i}",
                    "datatype": "FP32",
                    "shape": list(a.shape),
                    "parameters": {"binary_data_size": a.nbytes},
                }
                for i, a in enumerate(arrays)
            ]
        }
    ).encode()
    return header + b"".join(a.tobytes() for a in arrays), len(header)


@pytest.mark.parametrize("twice", [False, True])  # the second time from the cached header
def test_binary_inputs_are_read_only_views_into_the_body(twice: bool) -> None:
    image = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    other = np.arange(8, dtype=np.float32).reshape(1, 8)
    body, header_length = _binary_body(image, other)
    if twice:
        decode_infer_request(body, header_length)
    request = decode_infer_request(body, header_length)
    whole = np.frombuffer(body, dtype=np.uint8)
    for name, want in (("IN0", image), ("IN1", other)):
        got = request.inputs[name]
        np.testing.assert_array_equal(got, want)
        assert np.shares_memory(got, whole) and not got.flags.writeable


class _Seen:
    """A backend that keeps what it was handed."""

    def __init__(self) -> None:
        self.inputs: list[dict[str, np.ndarray]] = []

    async def __call__(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str], deadline_s: float | None
    ) -> Executed:
        self.inputs.append(inputs)
        return Executed({"Y": inputs["X"] + 1}, "", None)


async def test_a_lone_request_reaches_the_backend_as_its_own_buffers() -> None:
    seen = _Seen()
    batcher = Batcher(seen, ["Y"], BatchPolicy(max_batch_size=8), ModelStats("m", "1"))
    body = np.arange(12, dtype=np.float32).tobytes()
    view = np.frombuffer(body, dtype=np.float32).reshape(1, 12)  # read-only, as decoded
    out = await batcher.submit({"X": view})
    [handed] = seen.inputs
    assert handed["X"] is view
    np.testing.assert_array_equal(out["Y"], view + 1)
    await batcher.close()


async def test_several_requests_are_copied_once_into_one_batch() -> None:
    seen = _Seen()
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_s=0.05)
    batcher = Batcher(seen, ["Y"], policy, ModelStats("m", "1"))
    rows = [np.full((1, 4), i, dtype=np.float32) for i in range(3)]
    outs = await asyncio.gather(*(batcher.submit({"X": r}) for r in rows))
    [handed] = seen.inputs
    batch = handed["X"]
    assert batch.shape == (3, 4) and batch.flags.c_contiguous
    assert not any(np.shares_memory(batch, r) for r in rows)
    for r, out in zip(rows, outs, strict=True):
        np.testing.assert_array_equal(out["Y"], r + 1)
    await batcher.close()
