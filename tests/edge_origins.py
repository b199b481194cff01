"""Origins for the edge-cache tests, each on a free loopback port in a thread of its own.

``FakeOrigin`` is a tiny HTTP/1.1 file server that logs every request (path, Range), honours
``Range`` (``bytes=a-``, ``bytes=a-b`` and several ranges: a multipart answer, the whole file
or the first range, as set) and ``If-None-Match``, can throttle, and can cut the
connection partway through a file once or send one byte of it wrong once (fault injection).
``StaticOrigin`` is Python's ``http.server`` (no Range support).
``AppServer`` runs any aiohttp application (an origin that misbehaves on purpose).
``publish``, ``edit`` and ``roll_out`` make and roll out versions of a model of random bytes
(the chunk tests' set-up); the fixtures ``repo`` (model ``m`` v1 of ``SIZE`` bytes) and ``fake``
(a ``FakeOrigin`` on it) are imported by the test modules that share that set-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest

from tests import models

if TYPE_CHECKING:
    from gateway.repository.edge import EdgeRepository

AVG = 16 * 1024  # small chunks: a 1 MiB file has ~50
SIZE = 1 << 20

SIMPLE_INPUTS = {
    "inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
    ]
}


def build_repo(root: Path) -> Path:
    """``simple`` (config + v1), ``dense`` (v1, ~64 KiB) and ``other``, with manifests."""
    from gateway.repository.manifest import write_manifests

    models.add_sub(root, "simple")
    models.dense(root, "dense", features=256, classes=64)
    models.dense(root, "other", features=256, classes=60)
    write_manifests(root)
    return root


class FakeOrigin:
    def __init__(self, root: Path, chunk_delay_s: float = 0.0) -> None:
        self.root = root
        self.chunk_delay_s = chunk_delay_s
        self.requests: list[tuple[str, str | None]] = []
        self.headers: list[dict[str, str]] = []  # each request's headers, names in lower case
        self.sending = 0  # answers whose bodies are being sent now
        self.sending_at: list[tuple[str, int]] = []  # (path, ``sending``) as each request came
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before dropping (once)
        # several ranges asked at once: "multipart" (multipart/byteranges), "whole" (200, the
        # whole file, as S3), "first" (206 with the first range only)
        self.multi_range = "multipart"
        self.corrupt_at: dict[str, int] = {}  # path -> file offset of a byte sent wrong (once)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self, suffix: str = "") -> list[str]:
        return [p for p, _ in self.requests if p.endswith(suffix)]

    def start(self) -> FakeOrigin:
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()
            async with self._server:
                try:
                    await self._server.serve_forever()
                except asyncio.CancelledError:
                    pass

        self._loop.run_until_complete(main())
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def stop(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await reader.readline()).decode()
            headers: dict[str, str] = {}
            while (h := (await reader.readline()).decode().strip()) != "":
                key, _, value = h.partition(":")
                headers[key.strip().lower()] = value.strip()
            path = unquote(urlsplit(line.split()[1]).path).lstrip("/")
            self.requests.append((path, headers.get("range")))
            self.headers.append(headers)
            self.sending_at.append((path, self.sending))
            self.sending += 1
            try:
                await self._respond(writer, path, headers)
            finally:
                self.sending -= 1
        except (ConnectionError, IndexError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _respond(
        self, writer: asyncio.StreamWriter, path: str, headers: dict[str, str]
    ) -> None:
        file = self.root / path
        if ".." in path or not file.is_file():
            writer.write(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            return
        data = file.read_bytes()
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        if headers.get("if-none-match") == etag:
            writer.write(
                f"HTTP/1.1 304 Not Modified\r\nETag: {etag}\r\nConnection: close\r\n\r\n".encode()
            )
            return
        start = 0
        status = "200 OK"
        extra = ""
        end = len(data)
        wanted = headers.get("range", "")
        if "," in wanted and self.multi_range == "multipart":
            await self._multipart(writer, data, etag, wanted, path)
            return
        if "," in wanted and self.multi_range == "whole":
            wanted = ""
        if wanted.startswith("bytes="):
            first, _, last = wanted[6:].split(",")[0].partition("-")
            start, end = int(first), min(int(last) + 1, len(data)) if last else len(data)
            status = "206 Partial Content"
            extra = f"Content-Range: bytes {start}-{end - 1}/{len(data)}\r\n"
        body = bytearray(data[start:end])
        wrong = self.corrupt_at.get(path)
        if wrong is not None and start <= wrong < end:
            del self.corrupt_at[path]
            body[wrong - start] ^= 0xFF
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nETag: {etag}\r\n{extra}"
            "Connection: close\r\n\r\n".encode()
        )
        cut = self.cut_after.pop(path, None)
        step = 16384
        for i in range(0, len(body), step):
            if cut is not None and i >= cut:
                await writer.drain()
                writer.transport.abort()
                return
            if i and self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            writer.write(body[i : i + step])
            await writer.drain()

    async def _multipart(
        self, writer: asyncio.StreamWriter, data: bytes, etag: str, wanted: str, path: str
    ) -> None:
        boundary = "3d6b6a416f9b5"
        wrong = self.corrupt_at.pop(path, None)
        body = bytearray()
        for spec in wanted[6:].split(","):
            first, _, last = spec.strip().partition("-")
            start, end = int(first), min(int(last) + 1, len(data))
            body += (
                f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Range: bytes {start}-{end - 1}/{len(data)}\r\n\r\n"
            ).encode()
            part = bytearray(data[start:end])
            if wrong is not None and start <= wrong < end:
                part[wrong - start] ^= 0xFF
            body += part + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        writer.write(
            f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\nETag: {etag}\r\n"
            f"Content-Type: multipart/byteranges; boundary={boundary}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        for i in range(0, len(body), 16384):
            if i and self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            writer.write(body[i : i + 16384])
            await writer.drain()


class _Handler(http.server.SimpleHTTPRequestHandler):
    log: list[str]

    def log_message(self, format: str, *args: Any) -> None:
        self.log.append(self.path)


class StaticOrigin:
    """``python -m http.server`` semantics: Last-Modified / If-Modified-Since, no Range."""

    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        handler = type("Handler", (_Handler,), {"log": self.requests})
        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(handler, directory=str(root))
        )
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> StaticOrigin:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class AppServer:
    """An aiohttp application on a loopback address (``127.0.0.2`` works too), in a thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1") -> None:
        self.app = app
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> AppServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    async def _listen(self) -> None:
        from aiohttp import web

        sock = socket.socket()
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def two_layer(root: Path, name: str, version: int, head_seed: int, n: int = 1024) -> bytes:
    """``Y = (X @ W1) @ W2``: W1 n x n (4 MiB at 1024) never changes, W2 n x 16 is the
    "fine-tuned head" whose seed differs between versions. Returns the model file's bytes."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w1 = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    w2 = np.random.default_rng(head_seed).standard_normal((n, 16), dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W1"], ["H"]),
            helper.make_node("MatMul", ["H", "W2"], ["Y"]),
        ],
        name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    data = models.graph_bytes(graph)
    (root / name / str(version)).mkdir(parents=True, exist_ok=True)
    (root / name / str(version) / "model.onnx").write_bytes(data)
    return data


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server on a free loopback port (its endpoint URL); skips when moto is missing."""
    import subprocess
    import sys
    import tempfile
    import time

    pytest.importorskip("boto3")
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                # moto comes with the test extras: a server that does not start is a failure
                out.seek(0)
                pytest.fail(f"moto server did not start in 20 s: {out.read()[-500:]!r}")
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


# -- versions of a model of random bytes (the chunk tests) -------------------------------------


def random_bytes(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def publish(root: Path, name: str, version: int, data: bytes, avg: int = AVG) -> None:
    """``<name>/<version>/model.onnx`` holding ``data``; manifests cut with ``avg`` (0: none)."""
    from gateway.repository.manifest import write_manifests

    (root / name / str(version)).mkdir(parents=True, exist_ok=True)
    (root / name / str(version) / "model.onnx").write_bytes(data)
    write_manifests(root, avg)


def edit(data: bytes, at: int, size: int, seed: int = 99) -> bytes:
    """``data`` with ``size`` bytes from ``at`` on replaced by others (a changed layer)."""
    return data[:at] + random_bytes(size, seed) + data[at + size :]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """An origin's directory holding model ``m`` version 1: ``SIZE`` random bytes, manifests
    cut with ``AVG`` (test modules import this fixture and ``fake``)."""
    root = tmp_path / "origin"
    publish(root, "m", 1, random_bytes(SIZE, 1))
    return root


@pytest.fixture
def fake(repo: Path) -> Iterator[FakeOrigin]:
    """A ``FakeOrigin`` serving ``repo``."""
    origin = FakeOrigin(repo).start()
    yield origin
    origin.stop()


def open_edge(
    url: str, cache: Path, clock: Callable[[], float] | None = None, **kwargs: object
) -> EdgeRepository:
    """An edge repository on ``url`` with its cache in ``cache``; ``kwargs`` are settings,
    ``clock`` stands for ``time.monotonic`` (the index's age)."""
    from gateway.repository.edge import EdgeRepository
    from gateway.settings import Settings

    settings = Settings(model_repo=url, cache_dir=str(cache), **kwargs)  # type: ignore[arg-type]
    return EdgeRepository(settings, clock=clock) if clock else EdgeRepository(settings)


async def roll_out(
    edge: EdgeRepository,
    root: Path,
    name: str,
    version: int,
    data: bytes,
    avg: int = AVG,
    origin: FakeOrigin | None = None,
) -> None:
    """Publish a new version, have ``edge`` ask for the index again and fetch the model; the
    origin's request log is cleared after the index request, so it shows only the fetch."""
    publish(root, name, version, data, avg)
    await edge.refresh_index(force=True)
    if origin is not None:
        origin.requests.clear()
    await edge.fetch(name)
