"""A loopback TCP proxy that adds latency to a host's responses, so it looks slow from outside,
and can limit their bandwidth, so it looks like a slow link.

Shared by the tests and the benches (routing under a slow host, fetching over a slow link). Its
own event loop runs in a thread so synchronous callers can use it; ``delay_s`` may be changed at
any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

__all__ = ["DelayProxy"]

_PACE_BYTES = 16384  # with a bandwidth limit, responses leave in slices of at most this size


class DelayProxy:
    """A loopback TCP proxy that holds each response chunk ``delay_s`` before passing it on:
    a host that looks slow from outside. With ``rate_bytes_s``, each connection's responses
    also leave at no more than that many bytes a second: a slow link. Its own event loop runs in
    a thread."""

    def __init__(
        self,
        upstream_port: int,
        delay_s: float = 0.0,
        host: str = "127.0.0.1",
        rate_bytes_s: float | None = None,
        capture: bool = False,
    ) -> None:
        """``capture``: keep what clients send upstream in ``sent`` (what headers reached the
        host)."""
        self.upstream_port = upstream_port
        self.capture = capture
        self.sent: list[bytes] = []
        self.delay_s = delay_s
        self.rate_bytes_s = rate_bytes_s
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> DelayProxy:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5)
        return self

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delayed: bool
    ) -> None:
        """Copy until EOF; when ``delayed``, each chunk leaves ``delay_s`` (read as it arrives, so
        a change applies to open connections too) after it arrived: added latency. With
        ``rate_bytes_s`` too, each slice of up to ``_PACE_BYTES`` then waits its length over the
        rate before it is written: a slower link."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while chunk := await reader.read(65536):
                    if self.capture and not delayed:
                        self.sent.append(chunk)
                    chunks.put_nowait((loop.time() + (self.delay_s if delayed else 0.0), chunk))
            chunks.put_nowait((0.0, b""))

        reading = loop.create_task(read())
        try:
            while (item := await chunks.get())[1]:
                if (wait_s := item[0] - loop.time()) > 0:
                    await asyncio.sleep(wait_s)
                if not delayed or not self.rate_bytes_s:
                    writer.write(item[1])
                    await writer.drain()
                    continue
                for start in range(0, len(item[1]), _PACE_BYTES):
                    piece = item[1][start : start + _PACE_BYTES]
                    await asyncio.sleep(len(piece) / self.rate_bytes_s)
                    writer.write(piece)
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            reading.cancel()
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pump(reader, up_writer, False), self._pump(up_reader, writer, True)
        )

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
