"""Open-loop HTTP load for tests and benches: requests sent on a fixed schedule, whatever the
server's answers, so an overloaded server shows as queueing and refusals instead of slowing the
client down (a closed loop hides overload). Loopback, one connection per request, bounded by
``duration_s`` and a per-request timeout.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class Stream:
    """One kind of request sent at ``rate_per_s``; what came back, in order of sending."""

    name: str
    path: str
    body: bytes
    rate_per_s: float
    statuses: list[int] = field(default_factory=list)  # 0: no answer (timeout, reset)
    latencies_s: list[float] = field(default_factory=list)

    def ok_latencies_s(self) -> list[float]:
        return [t for s, t in zip(self.statuses, self.latencies_s, strict=True) if s == 200]

    def count(self, status: int) -> int:
        return self.statuses.count(status)


async def _request(host: str, port: int, stream: Stream, timeout_s: float) -> None:
    started = time.perf_counter()
    status = 0
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            head = (
                f"POST {stream.path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(stream.body)}\r\n\r\n"
            )
            writer.write(head.encode() + stream.body)
            await writer.drain()
            line = await reader.readline()
            status = int(line.split()[1]) if line.startswith(b"HTTP/") else 0
            await reader.read()  # to the close: the whole answer
    except (TimeoutError, OSError, ValueError, IndexError):
        pass
    finally:
        if writer is not None:
            writer.close()
    stream.statuses.append(status)
    stream.latencies_s.append(time.perf_counter() - started)


async def run(
    host: str, port: int, streams: list[Stream], duration_s: float, timeout_s: float = 10.0
) -> None:
    """Send every stream's requests at its rate for ``duration_s``, then wait for the answers
    (each bounded by ``timeout_s``)."""
    tasks: set[asyncio.Task[None]] = set()

    async def send(stream: Stream) -> None:
        interval_s = 1.0 / stream.rate_per_s
        start = time.perf_counter()
        sent = 0
        while sent * interval_s < duration_s:
            delay_s = start + sent * interval_s - time.perf_counter()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            task = asyncio.ensure_future(_request(host, port, stream, timeout_s))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1

    await asyncio.gather(*(send(s) for s in streams))
    while tasks:
        await asyncio.gather(*list(tasks))
