"""Helpers shared by test modules: gateway processes, raw HTTP, and Triton client calls.

Test modules import these from here, never from each other (a test module is a set of tests,
not a library); ``conftest.py`` keeps the fixtures. Tiny ONNX models are in ``tests/models.py``.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tritonclient.http as httpclient

from gateway.testing.gateway_process import free_port as free_port  # re-exported for the tests
from gateway.testing.gateway_process import serve_command, stop_process, wait_ready

ROOT = Path(__file__).resolve().parent.parent

# -- gateway processes ------------------------------------------------------------------------


@dataclass
class GatewayProcess:
    """A real ``gateway serve`` process, stopped by PID."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        status = stop_process(self.process, sig, timeout_s, kill_wait_s=5)
        assert status is not None, f"gateway {self.process.pid} outlived SIGKILL"
        return status


STARTED: list[GatewayProcess] = []  # every gateway process the tests started, by PID


def stop_leftovers() -> None:
    """Stop the gateways a test started and did not stop (it failed between start and stop)."""
    while STARTED:
        STARTED.pop().stop()


def start_gateway(
    repo: Path, tmp: Path, *args: str, env: dict[str, str] | None = None, ready_s: float = 60.0
) -> GatewayProcess:
    port = free_port()
    log_path = tmp / f"gateway-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("GATEWAY_CONFIG", None)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            serve_command(repo, port, *args),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
        )
    gw = GatewayProcess(process, port, log_path)
    STARTED.append(gw)  # stopped at the session's end if a test failed before stopping it
    if wait_ready(process, gw.url, ready_s=ready_s, probe_timeout_s=1.0):
        return gw
    if process.poll() is not None:
        raise RuntimeError(f"gateway exited with {process.returncode}:\n{gw.log()}")
    gw.stop(signal.SIGKILL)
    raise RuntimeError(f"gateway not ready in {ready_s}s:\n{gw.log()}")


class InProcessGateway:
    """``build_app`` served by uvicorn in a thread of this process (so a monkeypatch applies)."""

    def __init__(self, settings: Any, raw: bool = False) -> None:
        """``raw``: the gateway's own connection protocol (the raw inference path), as served;
        else uvicorn's (every request through ASGI)."""
        import uvicorn

        from gateway.cli import _http_protocol, build_app

        self.url = f"http://127.0.0.1:{settings.port}"
        config = uvicorn.Config(
            build_app(settings),
            host="127.0.0.1",
            port=settings.port,
            http=_http_protocol(settings) if raw else "auto",
            loop="asyncio",
            log_config=None,
            access_log=False,
            log_level="warning",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> InProcessGateway:
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if get(f"{self.url}/v2/health/ready")[0] == 200:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("in-process gateway not ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# -- HTTP -------------------------------------------------------------------------------------


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def raw(
    gw: GatewayProcess,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class Reader:
    """HTTP/1.1 responses, one after another, from one socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"connection closed mid-response: {self.buffer!r}"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        size = int(headers["content-length"])
        while len(self.buffer) < size:
            assert self._fill(), "connection closed mid-body"
        body, self.buffer = self.buffer[:size], self.buffer[size:]
        return int(status_line.split()[1]), headers, body

    def closed(self) -> bool:
        return not self.buffer and not self._fill()


# -- v2 clients -------------------------------------------------------------------------------


def simple_inputs(batch: int = 1, binary: bool = True) -> tuple[list[Any], np.ndarray, np.ndarray]:
    a = np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)
    b = np.full((batch, 16), 3, dtype=np.int32)
    ins = []
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        tensor = httpclient.InferInput(name, list(arr.shape), "INT32")
        tensor.set_data_from_numpy(arr, binary_data=binary)
        ins.append(tensor)
    return ins, a, b


def triton_infer(
    client: Any,
    model: str,
    feeds: dict[str, np.ndarray],
    *,
    binary: bool,
    outputs: list[str] | None = None,
    always_binary: frozenset[str] = frozenset(),
) -> Any:
    """One request; tensors named in ``always_binary`` go binary even in a JSON request."""
    inputs = []
    for name, array in feeds.items():
        datatype = "BYTES" if array.dtype == np.object_ else _triton_dtype(array.dtype)
        tensor = httpclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary or name in always_binary)
        inputs.append(tensor)
    requested = [
        httpclient.InferRequestedOutput(n, binary_data=binary or n in always_binary)
        for n in outputs or []
    ]
    return client.infer(model, inputs, outputs=requested or None)


def _triton_dtype(dtype: np.dtype[Any]) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return str(np_to_triton_dtype(dtype))


def ort_run(onnx_bytes: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The expected answer: the model run by ONNX Runtime in this process."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def as_text(array: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else v, otypes=[object])(array)


class _AnswersReady(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def foreign_ready_server() -> Iterator[int]:
    """A server of this process answering 200 to every GET, yielding its port: someone else's
    server holding a port that a harness was about to use (``free_port`` then spawn is a race)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnswersReady)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
