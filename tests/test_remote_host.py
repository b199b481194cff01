"""``V2Host`` against a scripted v2 host on loopback: answers are read within a byte bound, as
sent (never inflated), and whatever a hostile host sends is ``Unavailable`` naming it."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
import pytest

from gateway import context
from gateway.backends.remote import V2Host
from gateway.errors import DeadlineExceeded, HostUnreachable, Unavailable
from gateway.protocol import InferResponse, encode_infer_response

Writer = Callable[[asyncio.StreamWriter], Awaitable[None]]
INPUTS = {"X": np.arange(4, dtype=np.float32).reshape(1, 4)}


def http(status: int, body: bytes, *extra: str) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", *extra, "", ""]
    return "\r\n".join(head).encode() + body


class ScriptedHost:
    """Answers every request with ``answer(path)``: bytes to send, or a coroutine that writes
    them itself. Records each request's headers."""

    def __init__(self, answer: Callable[[str], bytes | Writer]) -> None:
        self.answer = answer
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.server: asyncio.Server | None = None
        self.connections = 0  # accepted, ever
        self.open = 0
        self.most_open = 0

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                headers = {}
                for line in head[1:]:
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get("content-length", "0")))
                path = head[0].split()[1]
                self.requests.append((path, headers))
                answer = self.answer(path)
                if isinstance(answer, bytes):
                    writer.write(answer)
                    await writer.drain()
                else:
                    await answer(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()


@contextlib.asynccontextmanager
async def scripted(answer: Callable[[str], bytes | Writer]) -> AsyncIterator[ScriptedHost]:
    host = ScriptedHost(answer)
    host.server = await asyncio.start_server(host._handle, "127.0.0.1", 0)
    try:
        yield host
    finally:
        host.server.close()


def good_answer(trailer: bytes = b"") -> bytes:
    body, length = encode_infer_response(
        InferResponse("m", "1", {"Y": np.full((1, 2), 7, np.float32)}), binary_default=True
    )
    return http(200, body + trailer, f"Inference-Header-Content-Length: {length}")


async def test_a_good_answer_and_identity_encoding() -> None:
    async with scripted(lambda path: good_answer()) as server:
        host = V2Host("h1", server.url)
        try:
            out = await host.infer("m", 1, INPUTS, ["Y"], timeout_s=5.0)
        finally:
            await host.close()
    np.testing.assert_array_equal(out["Y"], [[7, 7]])
    assert server.requests[0][1]["accept-encoding"] == "identity"


async def test_declared_oversized_body_is_refused_before_it_arrives() -> None:
    """A host that announces 2 GiB and trickles it: refused at once, not read until the
    deadline (nor into memory)."""

    async def huge(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2147483648\r\n\r\n{")
        await writer.drain()
        await asyncio.sleep(30)

    async with scripted(lambda path: huge) as server:
        host = V2Host("h1", server.url)
        started = time.monotonic()
        try:
            with pytest.raises(Unavailable, match=r"host h1 sent a malformed response: .*limit"):
                await host.infer("m", 1, INPUTS, ["Y"], timeout_s=5.0)
        finally:
            await host.close()
    assert time.monotonic() - started < 2.5


async def test_endless_chunked_body_stops_at_the_limit() -> None:
    async def endless(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        while True:
            writer.write(chunk)
            await writer.drain()

    async with scripted(lambda path: endless) as server:
        host = V2Host("h1", server.url, max_response_bytes=1 << 20)
        try:
            with pytest.raises(Unavailable, match="over the 1048576-byte limit"):
                await host.infer("m", 1, INPUTS, ["Y"], timeout_s=10.0)
        finally:
            await host.close()


async def test_a_compressed_answer_is_not_inflated() -> None:
    """A host that compresses although asked not to: its bytes are taken as sent (a small gzip
    body could inflate far past the byte bound), so the answer is malformed."""
    output = {"name": "Y", "datatype": "FP32", "shape": [1], "data": [1.0]}
    body = gzip.compress(json.dumps({"outputs": [output]}).encode())
    async with scripted(lambda path: http(200, body, "Content-Encoding: gzip")) as server:
        host = V2Host("h1", server.url)
        try:
            with pytest.raises(Unavailable, match="host h1 sent a malformed response: not JSON"):
                await host.infer("m", 1, INPUTS, ["Y"], timeout_s=5.0)
        finally:
            await host.close()


async def test_a_malformed_answer_names_the_host() -> None:
    async with scripted(lambda path: good_answer(trailer=bytes(4))) as server:
        host = V2Host("h1", server.url)
        try:
            with pytest.raises(Unavailable, match="host h1 sent a malformed response: binary"):
                await host.infer("m", 1, INPUTS, ["Y"], timeout_s=5.0)
        finally:
            await host.close()


async def test_probes_with_oversized_bodies_are_not_ready() -> None:
    async with scripted(lambda path: http(200, b"x" * 4096)) as server:
        host = V2Host("h1", server.url, max_response_bytes=1024)
        try:
            assert not await host.ready()
            assert not await host.model_ready("m", 1)
            assert await host.repository_index() is None
        finally:
            await host.close()
        bigger = V2Host("h1", server.url, max_response_bytes=8192)
        try:
            assert await bigger.ready()
        finally:
            await bigger.close()


# -- the forward's own connections (gateway.backends.http1) ----------------------------------


async def test_batches_reuse_a_connection_and_idle_ones_close() -> None:
    async with scripted(lambda path: good_answer()) as server:
        host = V2Host("h1", server.url, keepalive_s=0.3)
        try:
            for _ in range(5):
                await host.infer("m", 1, INPUTS, ["Y"], timeout_s=5.0)
            assert server.connections == 1
            await asyncio.sleep(0.8)  # past the keep-alive: closed by this side
            assert server.open == 0
            await host.infer("m", 1, INPUTS, ["Y"], timeout_s=5.0)  # a new one opens
            assert server.connections == 2
        finally:
            await host.close()
    path, headers = server.requests[0]
    assert path == "/v2/models/m/versions/1/infer"
    assert headers["content-type"] == "application/octet-stream"
    assert int(headers["inference-header-content-length"]) > 0


async def test_batches_wait_for_one_of_conn_limit_connections() -> None:
    async def slow(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.05)
        writer.write(good_answer())

    async with scripted(lambda path: slow) as server:
        host = V2Host("h1", server.url, conn_limit=2)
        try:
            await asyncio.gather(
                *(host.infer("m", 1, INPUTS, ["Y"], timeout_s=5.0) for _ in range(8))
            )
            assert host._forward is not None
            assert (host._forward.open, host._forward.idle) == (2, 2)
        finally:
            await host.close()
    assert server.most_open == 2
    assert server.connections == 2
    assert len(server.requests) == 8


async def test_a_host_that_closes_before_answering_is_unreachable() -> None:
    async def hang_up(writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    async with scripted(lambda path: hang_up) as server:
        host = V2Host("h1", server.url)
        try:
            with pytest.raises(HostUnreachable, match="host h1 unreachable"):
                await host.infer("m", 1, INPUTS, ["Y"], timeout_s=5.0)
            # the next batch gets a connection of its own
            with pytest.raises(HostUnreachable):
                await host.infer("m", 1, INPUTS, ["Y"], timeout_s=5.0)
            assert host._forward is not None and host._forward.open == 0  # none left counted
        finally:
            await host.close()
    assert server.connections == 2


async def test_an_answer_that_is_not_http_is_malformed() -> None:
    async with scripted(lambda path: b"SMTP ready\r\n\r\n") as server:
        host = V2Host("h1", server.url)
        try:
            with pytest.raises(Unavailable, match="host h1 sent a malformed response: not HTTP"):
                await host.infer("m", 1, INPUTS, ["Y"], timeout_s=5.0)
        finally:
            await host.close()


async def test_request_ids_cannot_add_header_lines() -> None:
    """A client's request id travels as ``X-Request-ID``; CR/LF in it never splits the head."""
    async with scripted(lambda path: good_answer()) as server:
        host = V2Host("h1", server.url)
        token = context.batch_request_ids.set(("a\r\nX-Evil: 1", "b"))
        try:
            await host.infer("m", 1, INPUTS, ["Y"], timeout_s=5.0)
        finally:
            context.batch_request_ids.reset(token)
            await host.close()
    headers = server.requests[0][1]
    assert "x-evil" not in headers
    assert headers["x-request-id"] == "a??X-Evil: 1,b"


async def test_a_timed_out_batch_drops_its_connection() -> None:
    """A batch past its deadline leaves its connection out of step (the answer may still come):
    it is closed, and the next batch gets a fresh one."""
    answers = iter([b"", good_answer()])

    async def first_silent(writer: asyncio.StreamWriter) -> None:
        answer = next(answers)
        if answer:
            writer.write(answer)

    async with scripted(lambda path: first_silent) as server:
        host = V2Host("h1", server.url)
        try:
            with pytest.raises(DeadlineExceeded):
                await host.infer("m", 1, INPUTS, ["Y"], timeout_s=0.2)
            out = await host.infer("m", 1, INPUTS, ["Y"], timeout_s=5.0)
        finally:
            await host.close()
    np.testing.assert_array_equal(out["Y"], [[7, 7]])
    assert server.connections == 2


async def test_a_batch_waiting_for_a_connection_keeps_its_deadline() -> None:
    async def stuck(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async with scripted(lambda path: stuck) as server:
        host = V2Host("h1", server.url, conn_limit=1)
        first = asyncio.ensure_future(host.infer("m", 1, INPUTS, ["Y"], timeout_s=5.0))
        await asyncio.sleep(0.1)  # it holds the only connection
        started = time.monotonic()
        try:
            with pytest.raises(DeadlineExceeded):
                await host.infer("m", 1, INPUTS, ["Y"], timeout_s=0.2)
            assert time.monotonic() - started < 2.0
            assert server.connections == 1
        finally:
            first.cancel()
            await host.close()


async def test_an_interim_answer_is_skipped() -> None:
    """A host may send ``100 Continue`` (or 103) before its answer: the answer is the one after."""
    async with scripted(lambda path: b"HTTP/1.1 100 Continue\r\n\r\n" + good_answer()) as server:
        host = V2Host("h1", server.url)
        try:
            out = await host.infer("m", 1, INPUTS, ["Y"], timeout_s=5.0)
            out = await host.infer("m", 1, INPUTS, ["Y"], timeout_s=5.0)  # still in step
        finally:
            await host.close()
    np.testing.assert_array_equal(out["Y"], [[7, 7]])
    assert server.connections == 1


async def test_a_probe_does_not_wait_behind_busy_batch_connections() -> None:
    """Every connection busy with a batch: a probe opens one more (a busy host is not down)."""

    async def answer(writer: asyncio.StreamWriter, path: str) -> None:
        if path.endswith("/infer"):
            await asyncio.sleep(30)
        writer.write(http(200, b""))

    async with scripted(lambda path: lambda writer: answer(writer, path)) as server:
        host = V2Host("h1", server.url, conn_limit=1, probe_timeout_s=1.0)
        batch = asyncio.ensure_future(host.infer("m", 1, INPUTS, ["Y"], timeout_s=5.0))
        try:
            await asyncio.sleep(0.1)  # the batch holds the only connection
            assert await host.ready()
            assert server.connections == 2
        finally:
            batch.cancel()
            await host.close()


async def test_an_endless_head_stops_at_the_bound() -> None:
    async def endless(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Long: ")
        while True:
            writer.write(b"x" * 65536)
            await writer.drain()

    async with scripted(lambda path: endless) as server:
        host = V2Host("h1", server.url)
        try:
            with pytest.raises(Unavailable, match="a head over 65536 bytes"):
                await host.infer("m", 1, INPUTS, ["Y"], timeout_s=10.0)
        finally:
            await host.close()
