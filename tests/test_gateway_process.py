"""The test harness's readiness wait: a port taken by another process's server is not "ready".

``free_port`` then spawn is a race: with several suites on one machine, another gateway can
bind the port first and answer our readiness probe, and a test would then talk to a different
repository (seen once: ``test_edge_serve`` got another suite's ``config.pbtxt``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.testing.gateway_process import free_port, listens_on, stop_process, wait_ready
from tests.helpers import foreign_ready_server


@pytest.fixture
def foreign() -> Iterator[int]:
    """A server of this process answering 200 to everything: someone else's gateway."""
    with foreign_ready_server() as port:
        yield port


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])


def test_an_answer_from_another_process_is_not_ready(foreign: int) -> None:
    proc = _sleeper()  # never binds: the port's answers come from `foreign`
    try:
        assert listens_on(proc.pid, foreign) is False
        assert not wait_ready(proc, f"http://127.0.0.1:{foreign}", ready_s=0.5)
        assert proc.poll() is None  # not ready because the answer was not its own
    finally:
        stop_process(proc, timeout_s=5)


def test_the_process_and_its_children_own_their_listener(tmp_path: Path) -> None:
    script = tmp_path / "serve.py"
    script.write_text(
        "import http.server, subprocess, sys\n"
        "if sys.argv[1:] == ['child']:\n"
        "    class H(http.server.BaseHTTPRequestHandler):\n"
        "        def do_GET(self):\n"
        "            self.send_response(200); self.send_header('Content-Length', '0')\n"
        "            self.end_headers()\n"
        "    s = http.server.HTTPServer(('127.0.0.1', 0), H)\n"
        "    open(sys.argv[0] + '.port', 'w').write(str(s.server_address[1]))\n"
        "    s.serve_forever()\n"
        "else:\n"  # like `gateway serve`: the server runs in a child process
        "    subprocess.run([sys.executable, sys.argv[0], 'child'])\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)])
    try:
        port_file = Path(str(script) + ".port")
        for _ in range(200):
            if port_file.exists() and port_file.read_text():
                break
            threading.Event().wait(0.05)
        port = int(port_file.read_text())
        assert listens_on(proc.pid, port) is True
        assert wait_ready(proc, f"http://127.0.0.1:{port}", ready_s=10)
    finally:
        for child in Path(f"/proc/{proc.pid}/task").glob("*/children"):
            for pid in child.read_text().split():
                os.kill(int(pid), signal.SIGTERM)  # the child this test's process started
        stop_process(proc, timeout_s=5)


def test_a_listener_that_does_not_speak_http1_is_not_ready() -> None:
    """Another process's gRPC (HTTP/2) port answering the probe is "not ready", not an error
    that ends the wait (seen: two gateways started at once, one's HTTP port the other's gRPC)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer_garbage() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00not HTTP/1\r\n\r\n")

    threading.Thread(target=answer_garbage, daemon=True).start()
    proc = _sleeper()
    try:
        assert not wait_ready(proc, f"http://127.0.0.1:{port}", ready_s=0.5)
        assert proc.poll() is None
    finally:
        stop_process(proc, timeout_s=5)
        server.close()


def test_free_ports_are_not_handed_out_twice() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
