"""Starting, waiting for and stopping ``gateway serve`` processes on loopback ports.

Shared by the tests (``tests/helpers.py``) and the benches (``bench/harness.py``), which wrap
these pieces in their own process classes (each keeps its own attribute names, log handling and
error messages). Processes are stopped only by their own PID.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["free_port", "serve_command", "stop_process", "wait_ready"]


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_command(
    repo: Path | str, port: int, *args: str, launcher: Sequence[str] | None = None
) -> list[str]:
    """``python -m gateway.cli serve --model-repo repo --port port *args``; ``launcher``
    replaces ``python -m gateway.cli``."""
    return [
        *(launcher or [sys.executable, "-m", "gateway.cli"]), "serve",
        "--model-repo", str(repo), "--port", str(port), *args,
    ]  # fmt: skip


def stop_process(
    proc: subprocess.Popen[Any],
    sig: int = signal.SIGTERM,
    timeout_s: float = 15.0,
    kill_wait_s: float | None = None,
) -> int | None:
    """Send ``sig`` (SIGTERM: the gateway drains) and wait ``timeout_s``, then SIGKILL and wait
    ``kill_wait_s`` (no limit when None): only this one process, by its PID. Returns its exit
    status (None if it outlived even that wait, which can only happen with ``kill_wait_s``)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(kill_wait_s)
    return proc.returncode


def _status(url: str, timeout_s: float) -> int:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return int(resp.status)


def wait_ready(
    proc: subprocess.Popen[Any],
    base_url: str,
    paths: Sequence[str] = ("/v2/health/ready",),
    ready_s: float = 60.0,
    probe_timeout_s: float = 1.0,
) -> bool:
    """Poll until every path under ``base_url`` answers 200 (True), or until the process exits
    or ``ready_s`` passes (False: ``proc.poll()`` tells which). An error status or a refused
    connection counts as not ready yet."""
    deadline = time.monotonic() + ready_s
    while True:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError):  # urllib.error.HTTPError is an OSError too
            if all(_status(base_url + p, probe_timeout_s) == 200 for p in paths):
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
