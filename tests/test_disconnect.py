"""A client that goes away while queued does not keep its place in a batch."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from tests import models
from tests.conftest import start_gateway
from tests.test_server import raw

SLOW = """
name: "slow"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 400000 preferred_batch_size: [ 8 ] }
"""


def test_disconnected_clients_are_dropped(tmp_path: Path) -> None:
    models.add_sub(tmp_path / "repo", "slow", config=SLOW)
    gw = start_gateway(tmp_path / "repo", tmp_path)
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
    try:
        quitters = []
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", gw.port))
            sock.sendall(request)
            quitters.append(sock)
        time.sleep(0.1)  # all three are queued in the 400 ms batching window
        for sock in quitters:
            sock.close()
        status, _, _ = raw(gw, "POST", "/v2/models/slow/infer", body)  # joins the same window
        assert status == 200
        stats = json.loads(raw(gw, "GET", "/v2/models/slow/stats")[2])["model_stats"][0]
        assert stats["inference_count"] == 1, stats
        assert stats["execution_count"] == 1
        assert raw(gw, "GET", "/v2/health/live")[0] == 200
    finally:
        gw.stop()
