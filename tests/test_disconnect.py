"""A client that goes away while queued does not keep its place in a batch."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

from tests import models
from tests.helpers import free_port, raw, start_gateway

SLOW = """
name: "slow"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 400000 preferred_batch_size: [ 8 ] }
"""
# Lone requests wait in the 400 ms window only with Triton's fixed delay (the adaptive delay
# sends a request at once when no traffic was seen).
TRITON_DELAY = {"GATEWAY_BATCHING_DELAY": "triton"}


def test_disconnected_clients_are_dropped(tmp_path: Path) -> None:
    models.add_sub(tmp_path / "repo", "slow", config=SLOW)
    gw = start_gateway(tmp_path / "repo", tmp_path, env=TRITON_DELAY)
    try:
        _three_quit_one_stays(gw.port, lambda path: raw(gw, "GET", path)[2])
    finally:
        gw.stop()


def test_disconnected_clients_are_dropped_on_plain_uvicorn(tmp_path: Path) -> None:
    """Without the gateway's connection protocol (uvicorn's own, as with h11), the hot path
    watches ``receive()`` for the disconnect instead; the outcome is the same."""
    from gateway.settings import Settings
    from tests.helpers import InProcessGateway, get

    models.add_sub(tmp_path / "repo", "slow", config=SLOW)
    port = free_port()
    settings = Settings(
        model_repo=str(tmp_path / "repo"), port=port, access_log=False, batching_delay="triton"
    )
    gw = InProcessGateway(settings).start()  # uvicorn's httptools protocol, not ours
    try:
        _three_quit_one_stays(port, lambda path: get(f"{gw.url}{path}")[1])
    finally:
        gw.stop()


def _three_quit_one_stays(port: int, get: Callable[[str], bytes]) -> None:
    body = json.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [0] * 16},
                {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [0] * 16},
            ]
        }
    ).encode()
    request = (
        b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    quitters = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(request)
        quitters.append(sock)
    time.sleep(0.1)  # all three are queued in the 400 ms batching window
    for sock in quitters:
        sock.close()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as stayer:
        stayer.sendall(request)  # joins the same window
        assert stayer.recv(4096).startswith(b"HTTP/1.1 200")
    stats = json.loads(get("/v2/models/slow/stats"))["model_stats"][0]
    assert stats["inference_count"] == 1, stats
    assert stats["execution_count"] == 1
