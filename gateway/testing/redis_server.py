"""A throwaway ``redis-server`` on a free loopback port, for tests and benches of the shared
response cache: no persistence (``--save ""``, ``--appendonly no``), stopped by its PID."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from gateway.testing.gateway_process import free_port, stop_process

__all__ = ["RedisServer", "redis_server_binary"]


def redis_server_binary() -> str | None:
    """The ``redis-server`` on PATH (Debian's ``redis-server`` package), or None."""
    return shutil.which("redis-server")


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1."""

    def __init__(self, workdir: Path, port: int = 0) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, ready_s: float = 10.0) -> RedisServer:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / f"redis-{self.port}.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server not answering on port {self.port} in {ready_s}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s=5.0, kill_wait_s=5.0)
            self.process = None
