"""A TCP proxy that adds latency to a host's responses, to make it look slow from outside.

It runs its own event loop in a thread so synchronous tests and benchmarks can use it; change
``delay_s`` at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class DelayProxy:
    def __init__(self, upstream_port: int, delay_s: float = 0.0, host: str = "127.0.0.1") -> None:
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> DelayProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(5)
        return self

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _delayed_pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Each chunk leaves ``delay_s`` after it arrived: added latency, not a slower link."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            try:
                while chunk := await reader.read(65536):
                    chunks.put_nowait((loop.time() + self.delay_s, chunk))
            except (ConnectionError, OSError):
                pass
            chunks.put_nowait((0.0, b""))

        reading = loop.create_task(read())
        try:
            while True:
                due, chunk = await chunks.get()
                if not chunk:
                    break
                if (wait_s := due - loop.time()) > 0:
                    await asyncio.sleep(wait_s)
                writer.write(chunk)
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
        await asyncio.gather(self._pump(reader, up_writer), self._delayed_pump(up_reader, writer))

    def stop(self) -> None:
        async def _close() -> None:
            if self._server is not None:
                self._server.close()
            # Connections still being pumped end here, not as tasks destroyed while pending.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
