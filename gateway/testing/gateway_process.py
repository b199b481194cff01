"""Starting, waiting for and stopping ``gateway serve`` processes on loopback ports.

Shared by the tests (``tests/helpers.py``) and the benches (``bench/harness.py``), which wrap
these pieces in their own process classes (each keeps its own attribute names, log handling and
error messages). Processes are stopped only by their own PID.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["free_port", "listens_on", "serve_command", "stop_process", "wait_ready"]


_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=512)
_HANDED_OUT_LOCK = threading.Lock()


def free_port() -> int:
    """A loopback TCP port that was free a moment ago, and not one this process handed out
    recently: two servers started at once (say one's HTTP port, the other's gRPC port) would
    otherwise be given the same port when the kernel offers it twice before either binds."""
    with _HANDED_OUT_LOCK:
        while True:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in _HANDED_OUT:
                _HANDED_OUT.append(port)
                return port


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


def _listening_sockets(port: int) -> set[str] | None:
    """The ``socket:[inode]`` names of TCP sockets listening on ``port`` (this network
    namespace), or None where ``/proc/net`` cannot tell."""
    found: set[str] = set()
    read_any = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        read_any = True
        for row in rows:
            fields = row.split()
            # local address "ADDR:PORT" in hex, state 0A = LISTEN, inode
            if len(fields) < 10 or fields[3] != "0A":
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(f"socket:[{fields[9]}]")
    return found if read_any else None


def _family(pid: int) -> list[int]:
    """``pid`` and its descendants (``gateway serve`` runs the server in a child process)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids.extend(int(c) for c in task.read_text().split())
        i += 1
    return pids


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` (or a descendant) holds the socket listening on ``port``; None
    where ``/proc`` cannot tell. ``free_port`` is a race: with several suites on one machine,
    another process can take the port first, and its gateway would answer our readiness probe."""
    sockets = _listening_sockets(port)
    if sockets is None:
        return None
    for member in _family(pid):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{member}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in sockets:
                        return True
    return False


def wait_ready(
    proc: subprocess.Popen[Any],
    base_url: str,
    paths: Sequence[str] = ("/v2/health/ready",),
    ready_s: float = 60.0,
    probe_timeout_s: float = 1.0,
) -> bool:
    """Poll until every path under ``base_url`` answers 200 from ``proc``'s own socket (True),
    or until the process exits or ``ready_s`` passes (False: ``proc.poll()`` tells which). An
    error status, a refused connection or an answer from another process's listener (the port
    was taken first) counts as not ready yet."""
    port = urllib.parse.urlsplit(base_url).port
    deadline = time.monotonic() + ready_s
    while True:
        if proc.poll() is not None:
            return False
        # urllib.error.HTTPError is an OSError too; an HTTPException is a listener that does
        # not speak HTTP/1 (another process's gRPC port, say): not ready either way.
        with contextlib.suppress(OSError, http.client.HTTPException):
            if all(_status(base_url + p, probe_timeout_s) == 200 for p in paths) and (
                port is None or listens_on(proc.pid, port) is not False
            ):
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
