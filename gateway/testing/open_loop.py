"""Open-loop HTTP load for tests and benches: requests sent on a fixed schedule, whatever the
server's answers, so an overloaded server shows as queueing and refusals instead of slowing the
client down (a closed loop hides overload). Loopback, bounded by ``duration_s`` and a
per-request timeout.

Connections are persistent (HTTP/1.1 keep-alive) and pooled: a new TCP connection per request
costs the client and the server's HTTP front more than a small model's run, so at a hundred
requests a second on a loaded two-core machine the connection handling, not the code under
test, was what a test measured. The pool never holds a request back: when every connection is
busy at a request's send time a new one is opened (the pool grows to the number in flight), and
each latency counts from the request's scheduled send time, so a late client (a starved event
loop) shows as latency instead of hiding the server's (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Stream:
    """One kind of request sent at ``rate_per_s``; what came back, in order of answering."""

    name: str
    path: str
    body: bytes
    rate_per_s: float
    headers: dict[str, str] = field(default_factory=dict)  # besides Host and Content-*
    content_type: str = "application/json"
    statuses: list[int] = field(default_factory=list)  # 0: no answer (timeout, reset)
    latencies_s: list[float] = field(default_factory=list)  # from the scheduled send time
    lags_s: list[float] = field(default_factory=list)  # scheduled -> written: the client's delay
    retry_afters: list[str | None] = field(default_factory=list)  # each answer's Retry-After

    def ok_latencies_s(self) -> list[float]:
        return [t for s, t in zip(self.statuses, self.latencies_s, strict=True) if s == 200]

    def count(self, status: int) -> int:
        return self.statuses.count(status)


class _Pool:
    """Idle keep-alive connections to one server. ``take`` never waits for a busy one: it opens
    another, so the schedule, not the number of connections, decides when requests go."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle: list[_Connection] = []
        self.opened = 0

    async def take(self) -> tuple[_Connection, bool]:
        """A connection, and whether it was idle in the pool (the server may have closed it
        since: a reused connection that answers nothing is retried on a fresh one)."""
        if self.idle:
            return self.idle.pop(), True
        self.opened += 1
        return await asyncio.open_connection(self.host, self.port), False

    def give(self, connection: _Connection) -> None:
        self.idle.append(connection)

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class _Closed(Exception):
    """The connection ended before an answer's first byte."""


async def _exchange(
    connection: _Connection, head: bytes, body: bytes
) -> tuple[int, bool, str | None]:
    """Send one request and read its whole answer: the status, whether the connection can
    carry another (a length-delimited answer without ``Connection: close``) and the answer's
    ``Retry-After``."""
    reader, writer = connection
    writer.write(head + body)
    await writer.drain()
    line = await reader.readline()
    if not line:
        raise _Closed
    status = int(line.split()[1]) if line.startswith(b"HTTP/") else 0
    length: int | None = None
    chunked = False
    retry_after: str | None = None
    reusable = line.startswith(b"HTTP/1.1")
    while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = header.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
        elif name == b"connection" and b"close" in value:
            reusable = False
        elif name == b"retry-after":
            retry_after = value.decode("latin-1")
    if chunked:
        while size := int((await reader.readline()).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):  # trailers
            pass
    elif length is not None:
        await reader.readexactly(length)
    else:  # delimited by the close
        await reader.read()
        reusable = False
    return status, reusable, retry_after


async def _request(
    pool: _Pool, stream: Stream, scheduled: float, timeout_s: float, host: str
) -> None:
    status = 0
    lag_s = 0.0
    retry_after: str | None = None
    extra = "".join(f"{name}: {value}\r\n" for name, value in stream.headers.items())
    head = (
        f"POST {stream.path} HTTP/1.1\r\nHost: {host}\r\n{extra}"
        f"Content-Type: {stream.content_type}\r\nContent-Length: {len(stream.body)}\r\n\r\n"
    ).encode()
    connection: _Connection | None = None
    try:
        async with asyncio.timeout(max(0.0, scheduled + timeout_s - time.perf_counter())):
            for _ in range(2):  # a second try only for an idle connection the server closed
                connection, reused = await pool.take()
                lag_s = time.perf_counter() - scheduled
                try:
                    status, reusable, retry_after = await _exchange(connection, head, stream.body)
                except _Closed:
                    connection[1].close()
                    connection = None
                    if reused:
                        continue
                    break
                if reusable:
                    pool.give(connection)
                else:
                    connection[1].close()
                connection = None
                break
    except (TimeoutError, OSError, ValueError, IndexError, asyncio.IncompleteReadError):
        status = 0
    finally:
        if connection is not None:  # broken mid-answer: never reused
            connection[1].close()
    stream.statuses.append(status)
    stream.latencies_s.append(time.perf_counter() - scheduled)
    stream.lags_s.append(lag_s)
    stream.retry_afters.append(retry_after)


async def run(
    host: str, port: int, streams: list[Stream], duration_s: float, timeout_s: float = 10.0
) -> None:
    """Send every stream's requests at its rate for ``duration_s``, then wait for the answers
    (each bounded by ``timeout_s`` from its scheduled send time)."""
    tasks: set[asyncio.Task[None]] = set()
    pool = _Pool(host, port)

    async def send(stream: Stream, start: float) -> None:
        interval_s = 1.0 / stream.rate_per_s
        sent = 0
        while sent * interval_s < duration_s:
            scheduled = start + sent * interval_s
            delay_s = scheduled - time.perf_counter()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            task = asyncio.ensure_future(_request(pool, stream, scheduled, timeout_s, host))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1

    start = time.perf_counter()
    try:
        await asyncio.gather(*(send(s, start) for s in streams))
        while tasks:
            await asyncio.gather(*list(tasks))
    finally:
        pool.close()
