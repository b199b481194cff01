"""Malformed requests get a 4xx JSON error; the server keeps serving everyone else."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import GatewayProcess, raw


def _simple(**overrides: object) -> dict[str, object]:
    inputs = [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
    ]
    body: dict[str, object] = {"inputs": inputs}
    body.update(overrides)
    return body


def _with_input0(**fields: object) -> bytes:
    body = _simple()
    first = dict(body["inputs"][0])  # type: ignore[index]
    first.update(fields)
    body["inputs"] = [first, body["inputs"][1]]  # type: ignore[index]
    return json.dumps(body).encode()


def _binary(
    sizes: list[int], payload: bytes, header_len: int | None = None
) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": n,
                    "datatype": "INT32",
                    "shape": [1, 16],
                    "parameters": {"binary_data_size": s},
                }
                for n, s in zip(("INPUT0", "INPUT1"), sizes, strict=True)
            ]
        }
    ).encode()
    length = len(header) if header_len is None else header_len
    return header + payload, {"Inference-Header-Content-Length": str(length)}


GOOD = np.arange(16, dtype=np.int32).tobytes()

CASES: list[tuple[str, str, str, bytes, dict[str, str], int, str]] = [
    ("not json", "POST", "/v2/models/simple/infer", b"{not json", {}, 400, "not valid JSON"),
    ("json array", "POST", "/v2/models/simple/infer", b"[1,2]", {}, 400, "JSON object"),
    ("no inputs", "POST", "/v2/models/simple/infer", b'{"inputs": []}', {}, 400, "inputs"),
    (
        "unknown input",
        "POST",
        "/v2/models/simple/infer",
        _with_input0(name="NOPE"),
        {},
        400,
        "unexpected inference input",
    ),
    (
        "missing input",
        "POST",
        "/v2/models/simple/infer",
        json.dumps({"inputs": [_simple()["inputs"][0]]}).encode(),
        {},
        400,
        "missing",
    ),  # type: ignore[index]
    (
        "wrong dtype",
        "POST",
        "/v2/models/simple/infer",
        _with_input0(datatype="FP32"),
        {},
        400,
        "data-type",
    ),
    (
        "lowercase dtype",
        "POST",
        "/v2/models/simple/infer",
        _with_input0(datatype="int32"),
        {},
        400,
        "unknown datatype",
    ),
    (
        "too few elements",
        "POST",
        "/v2/models/simple/infer",
        _with_input0(data=[1, 2]),
        {},
        400,
        "elements",
    ),
    (
        "too many elements",
        "POST",
        "/v2/models/simple/infer",
        _with_input0(data=list(range(17))),
        {},
        400,
        "elements",
    ),
    (
        "ragged",
        "POST",
        "/v2/models/simple/infer",
        _with_input0(shape=[2, 2], data=[[1, 2], [3]]),
        {},
        400,
        "ragged",
    ),
    (
        "negative dim",
        "POST",
        "/v2/models/simple/infer",
        _with_input0(shape=[-1, 16]),
        {},
        400,
        "non-negative",
    ),
    (
        "huge dims",
        "POST",
        "/v2/models/simple/infer",
        _with_input0(shape=[1 << 40, 1 << 40]),
        {},
        400,
        "too large",
    ),
    ("wrong rank", "POST", "/v2/models/simple/infer", _with_input0(shape=[16]), {}, 400, "shape"),
    (
        "batch above max",
        "POST",
        "/v2/models/simple/infer",
        _with_input0(shape=[9, 16], data=[0] * 144),
        {},
        400,
        "batch-size",
    ),
    (
        "out of range",
        "POST",
        "/v2/models/simple/infer",
        _with_input0(data=[2**40] * 16),
        {},
        400,
        "out of range",
    ),
    (
        "unknown output",
        "POST",
        "/v2/models/simple/infer",
        json.dumps(_simple(outputs=[{"name": "NOPE"}])).encode(),
        {},
        400,
        "unexpected inference output",
    ),
    (
        "binary header past body",
        "POST",
        "/v2/models/simple/infer",
        *_binary([64, 64], GOOD * 2, 10**6),
        400,
        "outside the body",
    ),
    (
        "binary size overruns",
        "POST",
        "/v2/models/simple/infer",
        *_binary([64, 640], GOOD * 2),
        400,
        "overruns",
    ),
    (
        "binary sizes short",
        "POST",
        "/v2/models/simple/infer",
        *_binary([64, 64], GOOD * 3),
        400,
        "add up",
    ),
    (
        "binary size vs shape",
        "POST",
        "/v2/models/simple/infer",
        *_binary([60, 68], GOOD * 2),
        400,
        "does not match",
    ),
    (
        "bad header value",
        "POST",
        "/v2/models/simple/infer",
        b"{}",
        {"Inference-Header-Content-Length": "abc"},
        400,
        "Inference-Header-Content-Length",
    ),
    ("unknown model", "POST", "/v2/models/nope/infer", b"{}", {}, 404, "unknown model"),
    ("encoded traversal", "GET", "/v2/models/..%2F..%2Fetc/config", b"", {}, 404, "Not Found"),
    ("dotdot name", "GET", "/v2/models/..evil/config", b"", {}, 400, "invalid model name"),
    ("NUL in name", "POST", "/v2/models/a%00b/infer", b"{}", {}, 400, "invalid model name"),
    ("long name", "GET", "/v2/models/" + "m" * 300, b"", {}, 400, "invalid model name"),
    ("bad version", "GET", "/v2/models/simple/versions/abc", b"", {}, 404, "invalid version"),
    ("wrong method", "GET", "/v2/models/simple/infer", b"", {}, 405, ""),
    (
        "bad load payload",
        "POST",
        "/v2/repository/models/simple/load",
        b'{"parameters": {"config": 5}}',
        {},
        400,
        "config",
    ),
    (
        "load traversal file",
        "POST",
        "/v2/repository/models/simple/load",
        b'{"parameters": {"file:../x/model.onnx": "AAAA"}}',
        {},
        400,
        "invalid file path",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_request(
    gateway: GatewayProcess, case: tuple[str, str, str, bytes, dict[str, str], int, str]
) -> None:
    _, method, path, body, headers, status, message = case
    got, resp_headers, data = raw(gateway, method, path, body or None, headers)
    assert got == status, data
    assert resp_headers["content-type"].startswith("application/json")
    assert message in json.loads(data)["error"]
    ok, _, _ = raw(gateway, "POST", "/v2/models/simple/infer", json.dumps(_simple()).encode())
    assert ok == 200


def test_oversized_body_rejected_before_buffering(gateway: GatewayProcess) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1000000000\r\nContent-Type: application/json\r\n\r\n{"
        )
        reply = b""
        while b"exceeds the limit" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert b" 413 " in reply.split(b"\r\n")[0]
    assert b"exceeds the limit" in reply
    ok, _, _ = raw(gateway, "POST", "/v2/models/simple/infer", json.dumps(_simple()).encode())
    assert ok == 200
