"""Inference answered by the connection layer without ASGI (``raw_infer``) is indistinguishable
from the ASGI path: same answers, same errors, order kept on a connection, keep-alive and
``Connection: close`` honoured, bodies that arrive in pieces, and every request the raw path
leaves to uvicorn still served."""

from __future__ import annotations

import gc
import json
import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.settings import Settings
from tests import models
from tests.helpers import GatewayProcess, InProcessGateway, Reader, free_port, start_gateway


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, GatewayProcess]]:
    """The same repository served with the raw path on and off."""
    repo = tmp_path_factory.mktemp("raw-repo")
    models.add_sub(repo, "simple")
    tmp = tmp_path_factory.mktemp("raw-logs")
    started: dict[str, GatewayProcess] = {}
    try:
        for name, flag in (("raw", "true"), ("asgi", "false")):
            env = {
                "GATEWAY_RAW_INFER": flag,
                "GATEWAY_ACCESS_LOG": "false",
                "GATEWAY_KEEPALIVE_TIMEOUT_S": "1",
            }
            started[name] = start_gateway(repo, tmp, env=env)
        yield started
    finally:
        for gw in started.values():
            gw.stop()


def json_body(a: int, b: int) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [a] * 16},
                {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [b] * 16},
            ]
        }
    ).encode()


def binary_body(a: int, b: int) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": "INT32",
                    "shape": [1, 16],
                    "parameters": {"binary_data_size": 64},
                }
                for name in ("INPUT0", "INPUT1")
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + struct.pack("<16i", *[a] * 16) + struct.pack("<16i", *[b] * 16), len(header)


def request(
    path: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST"
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def exchange(gw: GatewayProcess, *raw_requests: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"".join(raw_requests))
        reader = Reader(sock)
        return [reader.response() for _ in raw_requests]


def test_raw_and_asgi_paths_answer_alike(pair: dict[str, GatewayProcess]) -> None:
    binary, header_length = binary_body(5, 2)
    cases = [
        request("/v2/models/simple/infer", json_body(1, 2)),
        request(
            "/v2/models/simple/versions/1/infer",
            binary,
            {"Inference-Header-Content-Length": str(header_length)},
        ),
        # with a deadline: answered through a task instead of the batch's callback
        request(
            "/v2/models/simple/infer",
            json_body(1, 2)[:-1] + b', "parameters": {"timeout": 30000000}}',
        ),
        request("/v2/models/nope/infer", json_body(1, 2)),  # 404
        request("/v2/models/simple/versions/7/infer", json_body(1, 2)),  # no such version
        request("/v2/models/simple/infer", b'{"inputs": ['),  # malformed JSON
        request("/v2/models/simple/infer", json_body(1, 2)[:-3] + b"}]}"),  # shape vs data
        request(
            "/v2/models/simple/infer",
            binary,
            {"Inference-Header-Content-Length": str(len(binary) + 5)},  # header longer than body
        ),
    ]
    for number, raw_request in enumerate(cases):
        tagged = raw_request.replace(b"Host: x", b"Host: x\r\nX-Request-ID: case-%d" % number)
        answers = {name: exchange(gw, tagged)[0] for name, gw in pair.items()}
        for answer in answers.values():
            answer[1].pop("date")
        assert answers["raw"] == answers["asgi"], number
        status, headers, body = answers["raw"]
        assert headers["x-request-id"] == f"case-{number}"
        if status != 200:
            assert 400 <= status < 500 and "error" in json.loads(body), (number, body)
    # Without an X-Request-ID each gets one of its own, on either path.
    for gw in pair.values():
        ((status, headers, _),) = exchange(gw, request("/v2/models/simple/infer", json_body(1, 2)))
        assert status == 200 and headers["x-request-id"]


def test_pipelined_requests_keep_their_order(pair: dict[str, GatewayProcess]) -> None:
    """Raw, ASGI-only (GET) and raw again, in one write: three answers, in order."""
    gw = pair["raw"]
    answers = exchange(
        gw,
        request("/v2/models/simple/infer", json_body(1, 1), {"X-Request-ID": "first"}),
        request("/v2/health/ready", b"", method="GET"),
        request("/v2/models/simple/infer", json_body(7, 3), {"X-Request-ID": "third"}),
        request("/v2/models/simple/infer", json_body(9, 9), {"X-Request-ID": "fourth"}),
    )
    assert [a[0] for a in answers] == [200, 200, 200, 200]
    first, third, fourth = (json.loads(answers[i][2]) for i in (0, 2, 3))
    assert answers[0][1]["x-request-id"] == "first" and first["outputs"][0]["data"] == [2] * 16
    assert answers[2][1]["x-request-id"] == "third" and third["outputs"][0]["data"] == [10] * 16
    assert fourth["outputs"][1]["data"] == [0] * 16


def test_keep_alive_close_and_a_body_in_pieces(pair: dict[str, GatewayProcess]) -> None:
    gw = pair["raw"]
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        reader = Reader(sock)
        for i in range(3):  # one connection, several requests
            sock.sendall(request("/v2/models/simple/infer", json_body(i, 0)))
            status, headers, body = reader.response()
            assert status == 200 and "connection" not in headers
            assert json.loads(body)["outputs"][0]["data"] == [i] * 16
        whole = request("/v2/models/simple/infer", json_body(4, 4))
        for piece in (whole[:30], whole[30:-20], whole[-20:]):  # head and body in pieces
            sock.sendall(piece)
            time.sleep(0.05)
        status, _, body = reader.response()
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == [8] * 16
        whole = request("/v2/models/simple/infer", json_body(5, 1))
        for piece in (whole[:-20], whole[-20:]):  # a whole head, but not yet the whole body
            sock.sendall(piece)
            time.sleep(0.05)
        status, _, body = reader.response()
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == [6] * 16
        sock.sendall(request("/v2/models/simple/infer", json_body(1, 1), {"Connection": "close"}))
        status, headers, _ = reader.response()
        assert status == 200 and headers["connection"] == "close"
        assert reader.closed()


def test_requests_the_raw_path_leaves_to_uvicorn(pair: dict[str, GatewayProcess]) -> None:
    """HTTP/1.0, chunked bodies, ``Expect: 100-continue`` and bodies over 64 KiB still work."""
    gw = pair["raw"]
    body = json_body(2, 1)
    http10 = request("/v2/models/simple/infer", body).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(http10)
        status, _, answer = Reader(sock).response()
        assert status == 200 and json.loads(answer)["outputs"][0]["data"] == [3] * 16
    chunked = (
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(chunked)
        assert Reader(sock).response()[0] == 200
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        expect = request("/v2/models/simple/infer", body, {"Expect": "100-continue"})
        sock.sendall(expect[: -len(body)])  # the head only, then wait to be asked for the body
        reader = Reader(sock)
        go_on = b"HTTP/1.1 100 Continue\r\n\r\n"
        while len(reader.buffer) < len(go_on):
            assert reader._fill()
        assert reader.buffer.startswith(go_on)
        reader.buffer = reader.buffer[len(go_on) :]
        sock.sendall(body)
        assert reader.response()[0] == 200
    padded = json.loads(body)
    padded["parameters"] = {"padding": "x" * 70_000}
    status, _, answer = exchange(
        gw, request("/v2/models/simple/infer", json.dumps(padded).encode())
    )[0]
    assert status == 200, answer


def test_idle_keep_alive_connections_are_closed(pair: dict[str, GatewayProcess]) -> None:
    """After an answer the keep-alive clock runs (1 s here), on either path; a request in time
    restarts it."""
    for gw in pair.values():
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            reader = Reader(sock)
            sock.sendall(request("/v2/models/simple/infer", json_body(1, 1)))
            assert reader.response()[0] == 200
            time.sleep(0.5)
            # Timed from before the second request, so a slow client only adds to it: the
            # clock restarted at its answer gives at least 1 s; left running, about 0.5 s.
            started = time.monotonic()
            sock.sendall(request("/v2/models/simple/infer", json_body(2, 2)))
            assert reader.response()[0] == 200
            assert reader.closed()  # blocks until the server closes it
            assert 0.8 < time.monotonic() - started < 5


def test_request_heads_read_alike(pair: dict[str, GatewayProcess]) -> None:
    """A whole request in one read is taken on httptools' reading of its head, made once per
    distinct head, without feeding the connection's parser; anything else goes to the parser.
    Either way the answer is the ASGI path's, odd heads included."""
    body = json_body(3, 1)
    plain = b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(
        body
    )
    heads = [  # the first four are answered raw
        plain,
        plain.replace(b"Host: x", b"host:x\t"),  # no space, trailing tab, lower-case name
        plain + b"X-Empty:\r\nX-Spaced:  a  b  \r\n",  # empty value; inner spaces kept
        plain.replace(b"/infer", b"/infer?trace=1"),  # a query string
        plain.replace(b"/simple/", b"/si%6dple/"),  # percent-encoded: the parser's
        plain + b"Content-Length: %d\r\n" % len(body),  # twice: refused
        plain + b"Content-Length: 1\r\n",  # two different lengths: refused
        plain + b"X-Folded: a\r\n b\r\n",  # obs-fold: the parser decides
        plain + b"X-Latin: caf\xe9\r\n",  # obs-text in a value
        plain + b"Bad Name: x\r\n",  # not a token
        plain + b"Connection: keep-alive, Upgrade\r\nUpgrade: h2c\r\n",
        plain.replace(b"POST", b"post"),  # methods are case-sensitive
        plain.replace(b"Content-Length: %d" % len(body), b"Content-Length: +%d" % len(body)),
    ]
    statuses = []
    for number, head in enumerate(heads):
        answers = {}
        for name, gw in pair.items():
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
                sock.sendall(head + b"X-Request-ID: head-%d\r\n\r\n" % number + body)
                status, headers, answer = Reader(sock).response()
            headers.pop("date", None)
            answers[name] = (status, headers, answer)
        assert answers["raw"] == answers["asgi"], (number, answers)
        statuses.append(answers["raw"][0])
    assert statuses[:5] == [200] * 5 and statuses[5] == statuses[6] == 400
    assert "error" in json.loads(answers["raw"][2])  # what the parser refuses, too


def test_requests_that_open_with_an_id_keep_their_own(pair: dict[str, GatewayProcess]) -> None:
    """perf_analyzer opens every header with ``"id":""`` and tritonclient with its request id:
    such headers are decoded once per distinct rest, yet each answer echoes its own id and its
    own sums, on both paths (the ASGI one decodes the same way)."""
    binary, header_length = binary_body(0, 0)
    header, data = binary[:header_length], binary[header_length:]
    for name, gw in pair.items():
        sent = []
        for n, rid in enumerate(["", "", "r-1", "r-22", ""]):
            head = b'{"id":' + json.dumps(rid).encode() + b"," + header[1:]
            values = struct.pack("<16i", *[n] * 16) + struct.pack("<16i", *[10] * 16)
            sent.append(
                request(
                    "/v2/models/simple/infer",
                    head + values,
                    {"Inference-Header-Content-Length": str(len(head))},
                )
            )
        answers = exchange(gw, *sent)
        for n, (rid, (status, headers, body)) in enumerate(
            zip(["", "", "r-1", "r-22", ""], answers, strict=True)
        ):
            assert status == 200, (name, body)
            json_length = int(headers["inference-header-content-length"])
            assert json.loads(body[:json_length])["id"] == rid, name
            assert struct.unpack("<16i", body[json_length:]) == (n + 10,) * 16, name
    assert data == struct.pack("<16i", *[0] * 16) * 2


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "asgi"])
def test_finished_requests_leave_no_reference_cycle(tmp_path: Path, raw: bool) -> None:
    """Every REST inference request is freed by reference counting as it ends, answered or
    refused, JSON, binary or over shared memory, on either path: one left in a reference cycle
    waits for the cycle collector, whose passes stop the event loop for every request in
    flight (grpc4 found them in the gRPC p99). A body that does not decode was one: its
    refusal, raised ``from None``, still kept the parser's error and its frames as context.
    The gateway runs in this process so that its objects can be counted."""
    from gateway.pending import Pending

    models.add_sub(tmp_path, "simple")
    settings = Settings(model_repo=str(tmp_path), port=free_port(), warmup=False)
    gw = InProcessGateway(settings, raw=raw).start()
    key = f"gw-test-cycle-{uuid.uuid4().hex[:8]}"
    fd = os.open(f"/dev/shm/{key}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    os.close(fd)
    binary, header_length = binary_body(1, 2)
    binary_head = {"Inference-Header-Content-Length": str(header_length)}
    shared = {
        "inputs": [
            {
                "name": name,
                "datatype": "INT32",
                "shape": [1, 16],
                "parameters": {
                    "shared_memory_region": "r",
                    "shared_memory_byte_size": 64,
                    "shared_memory_offset": 64 * n,
                },
            }
            for n, name in enumerate(("INPUT0", "INPUT1"))
        ],
        "outputs": [
            {
                "name": name,
                "parameters": {
                    "shared_memory_region": "r",
                    "shared_memory_byte_size": size,
                    "shared_memory_offset": 128 + 64 * n,
                },
            }
            for n, (name, size) in enumerate((("OUTPUT0", 64), ("OUTPUT1", 64)))
        ],
    }
    too_small = json.loads(json.dumps(shared))
    too_small["outputs"][0]["parameters"]["shared_memory_byte_size"] = 8
    unknown = json.loads(json.dumps(shared))
    unknown["inputs"][0]["parameters"]["shared_memory_region"] = "nope"
    path = "/v2/models/simple/infer"
    cases = [
        (200, request(path, json_body(1, 2))),
        (200, request(path, binary, binary_head)),
        (200, request(path, json.dumps(shared).encode())),
        (400, request(path, b'{"inputs": [')),  # the parser's error, chained
        (400, request(path, b"{x" + binary[2:], binary_head)),  # the same, binary
        (400, request(path, binary, {"Inference-Header-Content-Length": "x"})),
        (400, request(path, json_body(1, 2).replace(b"[1, 16]", b"[1, 15]", 1))),  # vs data
        (404, request("/v2/models/nope/infer", json_body(1, 2))),
        (400, request(path, json.dumps(unknown).encode())),
        (400, request(path, json.dumps(too_small).encode())),  # refused after the run
    ]
    register = json.dumps({"key": f"/{key}", "offset": 0, "byte_size": 4096}).encode()
    with socket.create_connection(("127.0.0.1", settings.port), timeout=10) as sock:
        reader = Reader(sock)

        def ask(raw_request: bytes) -> int:
            sock.sendall(raw_request)
            return reader.response()[0]

        try:
            assert ask(request("/v2/systemsharedmemory/region/r/register", register)) == 200
            for _ in range(2):  # warm: first-use caches, the codec's templates
                assert [ask(r) for _, r in cases] == [status for status, _ in cases]
            gc.collect()
            gc.disable()
            try:
                for _ in range(3):
                    assert [ask(r) for _, r in cases] == [status for status, _ in cases]
                # An ASGI task may end just after its answer went out: give it a moment.
                deadline = time.monotonic() + 2.0
                while True:
                    left = [o for o in gc.get_objects() if isinstance(o, Pending)]
                    if not left or time.monotonic() > deadline:
                        break
                    left = []  # (a list from the last look would hold what it found)
                    time.sleep(0.05)
            finally:
                gc.enable()
        finally:
            gw.stop()
            os.unlink(f"/dev/shm/{key}")
    assert left == []
