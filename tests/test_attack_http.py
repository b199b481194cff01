"""Attack suite: oversized request heads (issue 18, item 2).

httptools joins the pieces of a header value one read at a time, so its cost grows with the
square of the value's size: one unauthenticated client streaming a 100 MB header used to stall
the event loop, and ``/v2/health/live`` with it, for seconds. The gateway reads at most
``max_header_bytes`` of a head (request line, fields and the blank line), answers 431 and closes
the connection, on every listener and on both the raw inference path and the ASGI path.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from gateway.settings import SettingsError, load_settings
from tests import models
from tests.helpers import GatewayProcess, Reader, free_port, start_gateway

CAP_BYTES = 16 * 1024  # not the default: shows the setting reaches the protocol
BODY = json.dumps(
    {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [2] * 16},
        ]
    }
).encode()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, int]]:
    """A gateway with the raw inference path on and an admin port; yields it and that port."""
    tmp = tmp_path_factory.mktemp("attack-http")
    models.add_sub(tmp / "repo", "simple")
    admin_port = free_port()
    env = {"GATEWAY_MAX_HEADER_BYTES": str(CAP_BYTES), "GATEWAY_RAW_INFER": "true"}
    gateway = start_gateway(tmp / "repo", tmp, "--admin-port", str(admin_port), env=env)
    try:
        yield gateway, admin_port
    finally:
        gateway.stop()


def flood_head(
    port: int, until: float, total_bytes: int = 100 * 2**20, chunk_bytes: int = 2**20
) -> tuple[bytes, bool]:
    """Send a request whose one header value is ``total_bytes`` long, a chunk at a time, until
    the gateway stops reading or ``until`` (monotonic) passes. Returns what the gateway answered
    and whether it closed the connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * chunk_bytes
        sent = 0
        while sent < total_bytes and time.monotonic() < until:
            try:
                sock.sendall(chunk)
            except OSError:  # closed (reset) or no longer read
                break
            sent += len(chunk)
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except TimeoutError:
            return answer, False
        except OSError:  # reset: the gateway closed with our bytes unread
            pass
        return answer, True
    finally:
        sock.close()


def test_huge_head_gets_431_and_does_not_stall_probes(
    gw: tuple[GatewayProcess, int],
) -> None:
    """Clients streaming 100 MB headers, one after another, get 431 and are closed; meanwhile
    ``/v2/health/live`` on another connection keeps answering fast."""
    gateway, _ = gw
    stop_at = time.monotonic() + 20.0  # bounds the attack even if the probes fail
    stop = threading.Event()
    answers: list[tuple[bytes, bool]] = []

    def attack() -> None:
        while not stop.is_set() and time.monotonic() < stop_at:
            answers.append(flood_head(gateway.port, min(stop_at, time.monotonic() + 8.0)))

    attacker = threading.Thread(target=attack, daemon=True)
    probe = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    latencies_s: list[float] = []
    attacker.start()
    try:
        time.sleep(1.0)  # let the flood build up (the old parser slowed as the value grew)
        for _ in range(30):
            started = time.perf_counter()
            probe.request("GET", "/v2/health/live")
            response = probe.getresponse()
            response.read()
            latencies_s.append(time.perf_counter() - started)
            assert response.status == 200
            time.sleep(0.03)
    finally:
        stop.set()
        attacker.join(30)
        probe.close()
    assert not attacker.is_alive()
    # The issue asks for 50 ms (printed: a figure for the benches, as a loaded machine alone
    # can miss it); what the test holds is that probes are not stalled behind the flood: every
    # one far below the seconds the unbounded parser took (4.8 s here), nine in ten below 250 ms.
    latencies_s.sort()
    p90_s, worst_s = latencies_s[len(latencies_s) * 9 // 10 - 1], latencies_s[-1]
    print(f"probes under attack: p90 {p90_s * 1e3:.1f} ms, worst {worst_s * 1e3:.1f} ms")
    assert p90_s < 0.25 and worst_s < 1.0, (p90_s, worst_s, len(answers))
    assert answers
    for answer, closed in answers:
        assert closed, answer[:200]
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large", answer[:200]
        assert "error" in json.loads(rest.partition(b"\r\n\r\n")[2])
    assert gateway.process.poll() is None


def head_of(method: str, path: str, body: bytes, size_bytes: int) -> bytes:
    """A request head (through its blank line) of exactly ``size_bytes``, padded with a field."""
    start = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nX-Pad: "
    pad = size_bytes - len(start) - len("\r\n\r\n")
    head = (start + "p" * pad + "\r\n\r\n").encode()
    assert len(head) == size_bytes
    return head


def exchange(port: int, head: bytes, body: bytes, pieces: bool) -> tuple[int, bytes, bool]:
    """Send one request, whole in one write or its head in two writes apart; returns the
    status, the body and whether the gateway closed the connection afterwards."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if pieces:
            sock.sendall(head[: len(head) // 2])
            time.sleep(0.05)
            sock.sendall(head[len(head) // 2 :] + body)
        else:
            sock.sendall(head + body)
        reader = Reader(sock)
        status, _, answer = reader.response()
        sock.settimeout(0.5)
        try:
            closed = reader.closed()
        except TimeoutError:
            closed = False
        return status, answer, closed


DOORS = [
    ("raw inference", "main", "POST", "/v2/models/simple/infer", BODY),
    ("asgi", "main", "GET", "/v2/models/simple", b""),
    ("admin port", "admin", "POST", "/v2/repository/index", b"{}"),
]


@pytest.mark.parametrize("pieces", [False, True], ids=["one-write", "head-in-pieces"])
@pytest.mark.parametrize(
    ("door", "port_of", "method", "path", "body"), DOORS, ids=[d[0] for d in DOORS]
)
def test_head_at_the_cap_is_served_one_byte_over_is_431(
    gw: tuple[GatewayProcess, int],
    door: str,
    port_of: str,
    method: str,
    path: str,
    body: bytes,
    pieces: bool,
) -> None:
    gateway, admin_port = gw
    port = gateway.port if port_of == "main" else admin_port
    status, answer, closed = exchange(port, head_of(method, path, body, CAP_BYTES), body, pieces)
    assert status == 200, answer
    assert not closed  # keep-alive as usual
    if door == "raw inference":
        assert json.loads(answer)["outputs"][0]["data"] == [3] * 16
    status, answer, closed = exchange(
        port, head_of(method, path, body, CAP_BYTES + 1), body, pieces
    )
    assert status == 431 and "error" in json.loads(answer), answer
    assert closed
    assert exchange(port, head_of(method, path, body, 512), body, pieces)[0] == 200


def test_cap_counts_each_head_on_a_keep_alive_connection(gw: tuple[GatewayProcess, int]) -> None:
    """Heads are counted one at a time: several requests just under the cap, in a row on one
    connection and pipelined in one write, are all served."""
    gateway, _ = gw
    path = "/v2/models/simple/infer"
    one = head_of("POST", path, BODY, CAP_BYTES - 1) + BODY
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        reader = Reader(sock)
        for _ in range(3):
            sock.sendall(one)
            assert reader.response()[0] == 200
        sock.sendall(one * 3)
        assert [reader.response()[0] for _ in range(3)] == [200] * 3


def test_setting_is_validated() -> None:
    with pytest.raises(SettingsError, match="max_header_bytes"):
        load_settings(None, env={"GATEWAY_MAX_HEADER_BYTES": "10"})
