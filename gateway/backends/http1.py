"""``Http1Pool``: keep-alive HTTP/1.1 connections to one host, for the forward of a batch
(and the host's probes, which share the connections).

Why not aiohttp here: a routed batch is one small POST, and aiohttp's general client (request
and response objects, header multidicts, cookie jar, URL objects, a payload writer, a stream
reader, a task per connect) cost the front more CPU per batch than the routing and codec
together (issue 25's profile of one routed batch). The forward needs one method, one header
set per model (built once), bodies of known length, and an answer read into bytes within a
bound, so it runs on an ``asyncio.Protocol`` per connection with httptools (the parser the
server side already uses) reading the answer. Probes go the same way (at 1000 hosts aiohttp's
connect and request cost of probing the hosts outside the aperture was a seventh of the front's
CPU under load); aiohttp stays for model loads, where a request's cost does not matter.

What it keeps of aiohttp's behaviour: at most ``limit`` connections (callers wait for one), idle
connections closed after ``keepalive_s`` (below the server's keep-alive, so the server never
closes one under a request), answers taken as sent (``Accept-Encoding: identity``, nothing
inflated), a body refused past ``max_body_bytes`` (declared or as it grows, chunked included),
and a head past ``MAX_HEAD_BYTES``.
Failures are the caller's to map: ``OSError`` (refused, reset, closed before the answer),
``BadAnswer`` (not HTTP, over the bound).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

__all__ = ["MAX_HEAD_BYTES", "Answer", "BadAnswer", "Http1Pool"]

MAX_HEAD_BYTES = 65536  # status line and header fields of one answer (aiohttp: 8190 per line)


class BadAnswer(Exception):
    """The host's answer is not HTTP/1.1 this client reads, or is over the byte bound."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole answer: status, the header fields the caller asked for (lower-case names), body."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes


class _Connection(asyncio.Protocol):
    """One connection, one request at a time (HTTP/1.1 without pipelining)."""

    def __init__(self, pool: Http1Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Answer] | None = None
        self.headers: dict[bytes, bytes] = {}
        self.chunks: list[bytes] = []
        self.size = 0
        self.status = 0
        self.head_bytes = 0  # read before the head was complete
        self.to_eof = False  # neither a length nor chunked: the body ends with the connection
        self.reusable = False
        self.idle_since = 0.0
        self.counted = True  # in its pool's ``open`` count (until closed or lost)

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes nobody asked for: the connection is out of step
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # a callback's error comes wrapped (the bound, below)
            self._fail(cause if isinstance(cause, BadAnswer) else BadAnswer(f"not HTTP ({exc})"))
            return
        if not self.status:  # the head is not complete yet: httptools buffers it, unbounded
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._fail(BadAnswer(f"a head over {MAX_HEAD_BYTES} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool._lost(self)
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.to_eof and self.status:
            self._complete(reusable=False)
        else:
            waiter.set_exception(exc or ConnectionResetError("the host closed the connection"))

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        if key in self.pool.wanted:
            self.headers[key] = value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:
            return  # interim: no body
        length = self.headers.get(b"content-length")
        limit = self.pool.max_body_bytes
        if length is not None:
            if not length.isdigit():
                raise BadAnswer(f"Content-Length {length[:32]!r} is not a byte count")
            if int(length) > limit:
                raise BadAnswer(f"a {int(length)}-byte body is over the {limit}-byte limit")
        elif b"chunked" not in self.headers.get(b"transfer-encoding", b"").lower():
            self.to_eof = True

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.pool.max_body_bytes:
            raise BadAnswer(f"the body is over the {self.pool.max_body_bytes}-byte limit")
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.status < 200:  # an interim answer (100 Continue, 103): the real one follows
            self.headers, self.chunks, self.size, self.status = {}, [], 0, 0
            return
        self._complete(reusable=self.parser.should_keep_alive() and not self.to_eof)

    # -- the request

    def _complete(self, reusable: bool) -> None:
        waiter = self.waiter
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        answer = Answer(self.status, self.headers, body)
        self.reusable = reusable
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.close()

    def send(self, parts: Iterable[bytes]) -> asyncio.Future[Answer]:
        assert self.transport is not None
        self.waiter = self.pool.loop.create_future()
        self.headers = {}
        self.chunks = []
        self.size = self.status = self.head_bytes = 0
        self.to_eof = self.reusable = False
        self.transport.writelines(parts)
        return self.waiter

    def expire(self) -> None:
        """The request's time is up (``Http1Pool.request`` drops the connection)."""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(TimeoutError())

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()  # a connection out of step is never reused, so no FIN wait


class Http1Pool:
    """Connections to one ``http(s)://host[:port][/prefix]`` (``request_head`` builds the heads
    the caller reuses)."""

    def __init__(
        self,
        url: str,
        *,
        limit: int = 64,
        keepalive_s: float = 4.0,
        max_body_bytes: int = 1 << 30,
        wanted: Iterable[str] = (),
    ) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme
        self.hostname = parts.hostname or "localhost"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.netloc = parts.netloc.rpartition("@")[2]
        self.limit = limit
        self.keepalive_s = keepalive_s
        self.max_body_bytes = max_body_bytes
        # Header fields the caller reads (besides the ones framing the body).
        self.wanted = frozenset(
            [b"content-length", b"transfer-encoding", *(w.lower().encode() for w in wanted)]
        )
        self._idle: list[_Connection] = []  # most recently used last
        self._open = 0  # connecting, busy or idle
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ssl: ssl.SSLContext | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    @property
    def open(self) -> int:
        return self._open

    @property
    def idle(self) -> int:
        return len(self._idle)

    def request_head(self, method: str, path: str, fields: Iterable[tuple[str, str]]) -> bytes:
        """The head of a request up to its per-request fields (``Content-Length`` and those the
        caller adds), to be built once and reused."""
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self.netloc}"]
        lines += [f"{k}: {v}" for k, v in fields]
        return ("\r\n".join(lines) + "\r\n").encode("latin-1")

    async def request(
        self,
        head: bytes,
        fields: bytes,
        body: bytes | None,
        timeout_s: float,
        *,
        wait: bool = True,
    ) -> Answer:
        """Send ``head`` (from ``request_head``), ``fields`` (more header lines, each ending in
        CRLF) and ``body`` (None: none, as a GET has); the whole answer within ``timeout_s``
        (waiting for a connection included). Raises ``OSError`` when the connection fails,
        ``BadAnswer``, and ``TimeoutError``; on a timeout or cancellation the connection is
        dropped (it is out of step). One timer per request, not an ``asyncio.timeout`` scope
        (this is per batch). ``wait=False`` (a probe): with every connection busy at the limit,
        open one more rather than wait (a host busy with batches is not a host that is down)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        connection = self._take_idle()
        if connection is None:
            async with asyncio.timeout_at(deadline):
                connection = await self._acquire(wait)
        if body is None:
            parts: tuple[bytes, ...] = (head, fields, b"\r\n")
        else:
            parts = (head, fields, b"Content-Length: %d\r\n\r\n" % len(body), body)
        done = False
        waiter = connection.send(parts)
        timer = loop.call_at(deadline, connection.expire)
        try:
            answer = await waiter
            done = True
            return answer
        finally:
            timer.cancel()
            if done and connection.reusable and not self._closed:
                self._release(connection)
            else:
                connection.close()
                self._forget(connection)

    # -- the pool

    def _take_idle(self) -> _Connection | None:
        """The most recently used idle connection still open, if any."""
        if self._closed:
            raise ConnectionResetError("the pool is closed")
        while self._idle:
            connection = self._idle.pop()
            if connection.transport is not None and not connection.transport.is_closing():
                return connection
        return None

    async def _acquire(self, wait: bool = True) -> _Connection:
        while True:
            connection = self._take_idle()
            if connection is not None:
                return connection
            if self._open < self.limit or not wait:
                break
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # it was handed a turn it will not take: pass it on
                raise
        self._open += 1
        try:
            return await self._connect()
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    async def _connect(self) -> _Connection:
        ssl_context: ssl.SSLContext | None = None
        if self.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ssl_context = self._ssl
        _, connection = await self.loop.create_connection(
            lambda: _Connection(self),
            self.hostname,
            self.port,
            ssl=ssl_context,
            server_hostname=self.hostname if ssl_context else None,
        )
        return connection

    def _release(self, connection: _Connection) -> None:
        connection.waiter = None
        connection.idle_since = self.loop.time()
        self._idle.append(connection)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self.keepalive_s, self._close_idle)
        self._wake()

    def _forget(self, connection: _Connection) -> None:
        """A connection closed (by this side: ``_lost`` comes later, and counts nothing)."""
        if connection.counted:
            connection.counted = False
            self._open -= 1
            self._wake()

    def _lost(self, connection: _Connection) -> None:
        """The transport closed (either side)."""
        if connection in self._idle:
            self._idle.remove(connection)
        self._forget(connection)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _close_idle(self) -> None:
        """Close what was idle ``keepalive_s``; one timer per pool, not one per request."""
        self._sweep = None
        cutoff = self.loop.time() - self.keepalive_s
        keep = []
        for connection in self._idle:
            if connection.idle_since <= cutoff:
                connection.close()
                self._forget(connection)
            else:
                keep.append(connection)
        self._idle = keep
        if keep:
            delay = keep[0].idle_since + self.keepalive_s - self.loop.time()
            self._sweep = self.loop.call_later(max(0.01, delay), self._close_idle)

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
            self._forget(connection)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("the pool is closed"))
        self._waiters.clear()
