"""Fixtures that start the real gateway (uvicorn, subprocess) on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import models

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return int(self.process.returncode)


def start_gateway(
    repo: Path, tmp: Path, *args: str, env: dict[str, str] | None = None, ready_s: float = 60.0
) -> GatewayProcess:
    port = free_port()
    log_path = tmp / f"gateway-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("GATEWAY_CONFIG", None)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "serve",
                "--model-repo",
                str(repo),
                "--port",
                str(port),
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
        )
    gw = GatewayProcess(process, port, log_path)
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{gw.log()}")
        try:
            with urllib.request.urlopen(f"{gw.url}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return gw
        except OSError:
            pass
        time.sleep(0.1)
    gw.stop(signal.SIGKILL)
    raise RuntimeError(f"gateway not ready in {ready_s}s:\n{gw.log()}")


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of tiny models, built once per test session."""
    root = tmp_path_factory.mktemp("repo")
    models.add_sub(root, "simple")
    models.dense(
        root,
        "dense",
        config=(
            'name: "dense"\nmax_batch_size: 32\n'
            "dynamic_batching { max_queue_delay_microseconds: 100000 "
            "preferred_batch_size: [ 32 ] }"
        ),
    )
    models.fixed_double(root)
    models.strings(root)
    bad = root / "broken"
    (bad / "1").mkdir(parents=True)
    (bad / "1" / "model.onnx").write_bytes(b"not an onnx file")
    return root


@pytest.fixture(scope="session")
def gateway(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = start_gateway(repo, tmp_path_factory.mktemp("logs"))
    try:
        yield gw
    finally:
        gw.stop()
