"""v2 request bodies (JSON and binary tensor extension) for the shipped models, and the check that
decides whether a response is a failure.

No Locust import here: the tests use it without gevent's monkey-patching of the test process.
"""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass
from typing import Any

# Built once at import with the standard library: the load generator should spend its CPU on
# sending, not on encoding. Values are seeded so runs are comparable.

_rng = random.Random(0)

# struct format per v2 datatype (little-endian, as the binary tensor extension requires)
_FORMATS = {"BOOL": "?", "INT32": "i", "INT64": "q", "FP16": "e", "FP32": "f"}


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]

    def raw(self) -> bytes:
        if self.datatype == "BYTES":  # 4-byte little-endian length before each element
            return b"".join(struct.pack("<I", len(s)) + s for s in map(str.encode, self.data))
        return struct.pack(f"<{len(self.data)}{_FORMATS[self.datatype]}", *self.data)


@dataclass(frozen=True)
class Payload:
    """One request body for one model, in either encoding."""

    model: str
    inputs: list[Tensor]
    outputs: list[str]

    @property
    def path(self) -> str:
        return f"/v2/models/{self.model}/infer"

    def json_body(self) -> bytes:
        return json.dumps(
            {
                "inputs": [
                    {"name": t.name, "datatype": t.datatype, "shape": t.shape, "data": t.data}
                    for t in self.inputs
                ],
                "outputs": [{"name": o} for o in self.outputs],
            }
        ).encode()

    def binary_body(self) -> tuple[bytes, dict[str, str]]:
        """JSON header + raw tensors; ``Inference-Header-Content-Length`` marks the split."""
        raws = [t.raw() for t in self.inputs]
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": t.name,
                        "datatype": t.datatype,
                        "shape": t.shape,
                        "parameters": {"binary_data_size": len(raw)},
                    }
                    for t, raw in zip(self.inputs, raws, strict=True)
                ],
                "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in self.outputs],
            },
            separators=(",", ":"),
        ).encode()
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        }
        return header + b"".join(raws), headers


SIMPLE = Payload(
    "simple",
    [
        Tensor("INPUT0", "INT32", [1, 16], list(range(16))),
        Tensor("INPUT1", "INT32", [1, 16], [1] * 16),
    ],
    ["OUTPUT0", "OUTPUT1"],
)
MLP = Payload(
    "mlp",
    [Tensor("INPUT", "FP32", [1, 1024], [round(_rng.uniform(-1, 1), 4) for _ in range(1024)])],
    ["PROBS"],
)
MULTI = Payload(
    "multi",
    [
        Tensor("IDS", "INT64", [1, 4], [7, 11, 13, 17]),
        Tensor("MASK", "BOOL", [1, 4], [True, False, True, True]),
        Tensor("SCALE", "FP16", [1, 1], [0.5]),
    ],
    ["MASKED_IDS", "SCALED", "ANY"],
)
NOBATCH = Payload(
    "identity_fp32_nobatch",
    [Tensor("X", "FP32", [2, 3], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])],
    ["Y"],
)
BYTES = Payload("bytes_echo", [Tensor("TEXT", "BYTES", [1, 1], ["hello gateway"])], ["TEXT_OUT"])

JSON = {p.model: p.json_body() for p in (SIMPLE, MLP, MULTI, NOBATCH, BYTES)}
BINARY = {p.model: p.binary_body() for p in (SIMPLE, MLP, MULTI, BYTES)}


def response_error(status: int, headers: Any, body: bytes, expected: list[str]) -> str | None:
    """Why a response is a failure, or None: non-2xx, or a v2 body without every output."""
    if not 200 <= status < 300:
        return f"HTTP {status}: {body[:200]!r}"
    length = headers.get("Inference-Header-Content-Length") if headers else None
    try:
        head = json.loads(body[: int(length)] if length else body)
    except ValueError as exc:
        return f"response is not v2 JSON: {exc}"
    outputs = head.get("outputs") if isinstance(head, dict) else None
    if not outputs:
        return "response has no 'outputs'"
    missing = set(expected) - {o.get("name") for o in outputs}
    return f"response lacks outputs {sorted(missing)}" if missing else None
