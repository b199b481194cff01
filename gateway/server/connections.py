"""HTTP connections: what uvicorn's httptools protocol leaves to each request, done once per
connection. (Over 450 lines on purpose: one protocol class and what only it uses, a sixth of it
this docstring and the list of uvicorn names it relies on; the next split is the head reading,
``_raw_head`` to ``_read_head``, into a module of its own, then the gathered-write transport.)

- **Head timeout.** A client that opens a connection and sends nothing, or trickles its request
  line and headers a byte at a time (slowloris), would otherwise hold its connection, and a slot
  of ``max_connections``, for as long as it likes. The head of each request must arrive within
  ``header_timeout_s`` of the connection opening (first request) or of its first byte (later
  requests on a keep-alive connection).
- **Body timeout.** The body must then arrive within ``body_timeout_s`` of the head.
  Either miss gets a 408 (unless a response has started) and the connection is closed. Timers
  are armed only when a read leaves a request unfinished; the usual request, head and body in
  one read, arms none.
- **Head size.** The parser's cost grows faster than linearly with a header value's size
  (httptools joins the pieces of a value one read at a time), so one client sending a huge head
  would stall the event loop for every other. The bytes read while a head is unfinished are
  counted; a head longer than ``max_header_bytes`` (request line, fields and the blank line) gets
  a 431 (unless a response has started) and the connection is closed, the rest unread. A head
  that begins in the same read as the end of the request before it is counted from the next
  read on: the parser may see one read (256 KiB at most) more of it.
- **Disconnect hook.** uvicorn tells a request that its client left only through ``receive()``,
  which costs a task per request to watch. Each request's scope carries this connection's
  ``Hooks`` under ``HOOKS``: a handler sets ``on_lost`` and is called when the connection drops.
- **Gathered writes.** uvicorn writes a response's head and body in two ``transport.write``
  calls, and uvloop sends each at once: two system calls per response. The writes made during
  one event-loop callback are sent together instead, in one ``writelines``.

- **Inference without ASGI.** An app may offer ``raw_enabled``, ``raw_route(path, length)`` and
  ``answer_raw(exchange, route)`` (``RawHandler``). A plain ``POST`` it routes (HTTP/1.1, a
  Content-Length, no transfer coding, ``Expect`` or upgrade, nothing in flight
  or queued ahead of it on the connection, under the concurrency limit: ``_raw_head`` and
  ``_free``, the one place that rule is written) is then answered through a ``RawExchange``:
  uvicorn's ``RequestResponseCycle``, built by its constructor and filled by the parser's
  callbacks as usual, but answered with one ``respond`` (one write) instead of an ASGI app run
  in a task with ``receive``/``send`` messages. Everything else goes through uvicorn
  unchanged. Pipelining behind a raw request, graceful shutdown and the concurrency limit stay
  uvicorn's. httptools is the one parser: when a read holds exactly one whole request
  whose head (at most 1 KiB) httptools has read before, byte for byte, that reading is used
  again instead of feeding the parser (``_take_whole``). Clients repeat their heads (same
  model, same tensor sizes), and the parser's callbacks and the scope uvicorn builds for each
  request cost about a fifth of the event loop's time per request on a small model
  (``docs/ARCHITECTURE.md``). The same rule decides, either way.

- **Keep-alive.** One timer per connection, re-armed when it fires early, instead of uvicorn's
  timer armed after every response and cancelled at the next request (5 to 9 % of a small
  model's throughput, ``docs/ARCHITECTURE.md``).
- **Parser errors** are answered ``{"error": ...}`` like every other error, not in plain text.

Handlers must work without these (other protocols, such as h11, provide none): ``HOOKS`` absent
means "keep your own timeouts and disconnect watch".

What this relies on in uvicorn (its public-by-name members only; no ``_``-prefixed name is
overridden or called, and the one method partly replaced, ``on_response_complete``, is held to
uvicorn's source) is listed in ``RELIED_ON`` and checked by ``tests/test_uvicorn_seam.py``
against the installed uvicorn, whose range ``pyproject.toml`` pins.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from gateway.batching import clients

HOOKS = "gateway.connection"  # scope key

# Every name of uvicorn's this module uses, beyond the two modules' constants imported above.
# ``tests/test_uvicorn_seam.py`` checks each against the installed uvicorn (and that this module
# uses no other), so a uvicorn release that renames or drops one fails there, not in production.
RELIED_ON: dict[str, tuple[str, ...]] = {
    # asyncio.Protocol's and httptools' callbacks, each extended around uvicorn's own; uvicorn's
    # plain-text 400, replaced by a JSON one; and ``on_response_complete``, whose usual case is
    # replaced for the keep-alive timer (the seam test holds uvicorn's to its current source)
    "HttpToolsProtocol.overridden": tuple(
        "connection_made data_received connection_lost on_message_begin on_headers_complete"
        " on_body on_message_complete on_response_complete send_400_response".split()
    ),
    # called or read, never replaced
    "HttpToolsProtocol.used": tuple(
        "access_log access_logger app connections cycle flow headers limit_concurrency logger"
        " loop parser pipeline root_path scope server_state tasks timeout_keep_alive transport"
        " url".split()
    ),
    # ``RawExchange`` is built by this constructor, with these keywords
    "RequestResponseCycle.__init__": tuple(
        "scope transport flow logger access_logger access_log default_headers message_event"
        " expect_100_continue keep_alive on_response".split()
    ),
    # the cycle's state, read and set by uvicorn's protocol and by ``RawExchange.respond``
    "RequestResponseCycle.used": tuple(
        "body default_headers disconnected keep_alive more_body on_response response_complete"
        " response_started transport".split()
    ),
    "ServerState.used": ("default_headers", "total_requests"),
}


# A head the raw path may answer, as httptools read it: path, header fields (names in lower
# case), keep-alive, Content-Length.
_Head = tuple[str, Sequence[tuple[bytes, bytes]], bool, int]


def _raw_head(
    parser: httptools.HttpRequestParser, url: bytes, fields: Sequence[tuple[bytes, bytes]]
) -> _Head | None:
    """The raw path's rule for a request head read by ``parser``: a plain HTTP/1.1 ``POST`` with
    one decimal Content-Length (``raw_route`` holds it to the app's body limit), no transfer
    or content coding, ``Expect`` or upgrade, and a path without escapes. None: ASGI's to
    answer."""
    if parser.get_method() != b"POST" or parser.get_http_version() != "1.1":
        return None
    length = -1
    for name, value in fields:
        if name == b"content-length":
            if length >= 0 or not value.isdigit():
                return None
            length = int(value)
        elif name == b"connection":
            if b"upgrade" in [token.strip().lower() for token in value.split(b",")]:
                return None
        elif name in (b"transfer-encoding", b"expect", b"upgrade", b"content-encoding"):
            return None  # (a compressed body is inflated, within the limit, on the ASGI path)
    if length < 0:
        return None
    path = httptools.parse_url(url).path
    if b"%" in path or not path.isascii():
        return None
    return path.decode("ascii"), fields, parser.should_keep_alive(), length


class _HeadReader:
    """httptools' reading of one request head on its own (``_read_head``): the fields as
    uvicorn's ``on_header`` keeps them (names in lower case, no trailing whitespace)."""

    __slots__ = ("complete", "extra", "fields", "url")

    def __init__(self) -> None:
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.extra = False  # anything past the head: the head did not end where it was cut

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self.complete = True

    def on_body(self, body: bytes) -> None:
        self.extra = True

    def on_message_begin(self) -> None:
        self.extra = self.complete


def _read_head(head: bytes) -> _Head | None:
    """``_raw_head`` of ``head`` (through its blank line), read by a parser of its own."""
    reader = _HeadReader()
    parser = httptools.HttpRequestParser(reader)
    try:
        parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    if not reader.complete or reader.extra:
        return None
    return _raw_head(parser, reader.url, tuple(reader.fields))


# Each distinct head of a whole request read at once, with its reading (None: not the raw
# path's). Bounded in entries and in the size of each.
_HEADS: dict[bytes, _Head | None] = {}
_HEADS_MAX = 256
_HEAD_MAX_BYTES = 1024
# A response body from this size on is written beside its head rather than joined to it.
_JOIN_BELOW = 64 * 1024
# The scope of an exchange read without the parser, which builds none: uvicorn's protocol never
# reads a cycle's scope (only the cycle's ASGI methods do, never called on an exchange).
_NO_SCOPE: dict[str, Any] = {"type": "http", "http_version": "1.1", "method": "POST"}


def _timeout_response(what: str) -> bytes:
    body = b'{"error": "request %s not received in time"}' % what.encode()
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )


HEAD_TIMEOUT = _timeout_response("headers")
BODY_TIMEOUT = _timeout_response("body")
_HEAD_TOO_LARGE_BODY = b'{"error": "request line and headers too large"}'
HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s"
    % (len(_HEAD_TOO_LARGE_BODY), _HEAD_TOO_LARGE_BODY)
)


class Hooks:
    """Per-connection hooks a request handler may use (see the module docstring)."""

    __slots__ = ("loop", "on_lost")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop  # the connection's: asking asyncio costs a getpid() on Python 3.11
        self.on_lost: Callable[[], object] | None = None


class GatheringTransport:
    """A transport whose writes during one loop callback leave together, at the end of it."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self.wire = transport  # the socket's own transport, for callers on the hot path
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def write_now(self, data: bytes) -> None:
        """A whole response in one piece: no reason to wait for the end of the callback."""
        if self._pending:
            self._pending.append(data)
            self._flush()
        else:
            self._transport.write(data)

    def writelines(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def writelines_now(self, chunks: list[bytes]) -> None:
        """``write_now`` for a response in pieces (head, large body): sent as they are, with
        no copy to join them (the transport gathers them into one system call)."""
        if self._pending:
            self._pending += chunks
            self._flush()
        else:
            self._transport.writelines(chunks)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.writelines(pending)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    # Spelled out rather than left to ``__getattr__``: uvicorn calls these on every request.
    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:  # the rest of the transport interface
        return getattr(self._transport, name)


_IDLE, _HEAD, _BODY = 0, 1, 2


class RawHandler(Protocol):
    """What an app offers to answer some requests without ASGI (see the module docstring)."""

    raw_enabled: bool  # False: every request of this app goes through ASGI

    def raw_route(self, path: str, length: int) -> Any | None:
        """Something to hand to ``answer_raw`` if this ``POST`` is answered raw, else None."""

    def answer_raw(self, exchange: RawExchange, route: Any) -> None:
        """Answer with ``exchange.respond`` (or not at all if the client went away), now or
        later, from a callback: no task is started for it."""


_defaults: tuple[object, bytes] = (None, b"")


def _default_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """uvicorn's default headers (``date``, ``server``) as one block, rebuilt when uvicorn
    replaces the list (every second, for the date)."""
    global _defaults
    if _defaults[0] is not headers:
        _defaults = (headers, b"".join(b"%s: %s\r\n" % pair for pair in headers))
    return _defaults[1]


# A raw exchange's ``message_event``: uvicorn's callbacks set it, nothing waits on it (only the
# cycle's ``receive`` would, and nothing calls that). Not bound to a loop until waited on.
_UNWATCHED = asyncio.Event()


class RawExchange(RequestResponseCycle):
    """One request answered without ASGI: a uvicorn cycle, so that uvicorn's protocol fills in
    its body, marks it disconnected, holds pipelined requests behind it and lets graceful
    shutdown wait for it as for any other; answered by ``respond`` rather than an app's
    ``send`` messages (its ``run_asgi``, ``send`` and ``receive`` are never called)."""

    def __init__(
        self,
        protocol: ConnectionProtocol,
        scope: Any,
        headers: Sequence[tuple[bytes, bytes]],
        keep_alive: bool,
    ) -> None:
        super().__init__(
            scope=scope,
            transport=protocol.transport,
            flow=protocol.flow,
            logger=protocol.logger,
            access_logger=protocol.access_logger,
            access_log=protocol.access_log,
            default_headers=protocol.server_state.default_headers,
            message_event=_UNWATCHED,
            expect_100_continue=False,
            keep_alive=keep_alive,
            on_response=protocol.on_response_complete,
        )
        self.headers = headers  # names in lower case
        self.hooks = protocol.hooks
        self._gathering = protocol.gathering
        self._wire = protocol.gathering.wire  # asked directly: one Python call fewer a request
        # The body as read, not joined into uvicorn's bytearray (``body``) piece by piece and
        # copied out again: one copy at most (``take_body``), none when it came in one piece.
        self.chunks: list[bytes] = []

    def take_body(self) -> bytes:
        """The whole body, once (the exchange then holds none of it)."""
        chunks, self.chunks = self.chunks, []
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def respond(self, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> None:
        """Status line, uvicorn's default headers, ``headers`` and ``body`` in one write; then
        what ``send`` does at a response's end (close unless kept alive, ``on_response``)."""
        if self.response_started:
            return
        self.response_started = True
        if self.disconnected or self._wire.is_closing():
            return
        cached, defaults = _defaults
        if cached is not self.default_headers:
            defaults = _default_headers(self.default_headers)
        parts = [STATUS_LINE[status], defaults]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if len(body) < _JOIN_BELOW:
            parts.append(body)
            self._gathering.write_now(b"".join(parts))
        else:  # a large body is not copied into the head's bytes
            self._gathering.writelines_now([b"".join(parts), body])
        self.response_complete = True
        if not self.keep_alive:
            self.transport.close()
        self.on_response()

    def abort(self) -> None:
        """No answer can be given (a bug): close the connection rather than leave it hanging."""
        self.response_started = True
        self.transport.close()


class ConnectionProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the additions above."""

    header_timeout_s = 10.0  # set by ``connection_protocol``
    body_timeout_s = 30.0
    max_header_bytes = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._timed = _IDLE  # which stage the armed timer guards
        self._stage = _HEAD  # the first request's head is due from the start
        self.hooks = Hooks(self.loop)
        raw = self.app
        self._raw: RawHandler | None = raw if getattr(raw, "raw_enabled", False) else None
        self._exchange: RawExchange | None = None  # taken raw, its body still being read
        self._partial = False  # the parser holds part of a request
        self._idle_since: float | None = None  # the last response's end, while idle
        self._keep_alive: asyncio.TimerHandle | None = None
        self._route: Any = None
        self._head_bytes = 0  # read since the last head was complete, while one is unfinished
        self._posted = False  # a request that may reach a batcher came (``_first_post``)

    # timers: armed only while a stage is unfinished after a read

    def _arm(self, stage: int) -> None:
        if self._timed == stage:
            return
        self._disarm()
        timeout_s = self.header_timeout_s if stage == _HEAD else self.body_timeout_s
        self._timer = self.loop.call_later(timeout_s, self._late, stage)
        self._timed = stage

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timed = _IDLE

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser rejects, as JSON like every other error."""
        body = orjson.dumps({"error": msg})
        self.transport.write(
            b"%s%scontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s"
            % (
                STATUS_LINE[400],
                _default_headers(self.server_state.default_headers),
                len(body),
                body,
            )
        )
        self.transport.close()

    def _late(self, stage: int) -> None:
        self._timer = None
        self._timed = _IDLE
        if self.transport.is_closing():
            return
        cycle = self.cycle  # the latest request's; with a body due, that is the late one
        if stage == _HEAD:
            quiet = cycle is None or cycle.response_complete
        else:
            quiet = cycle is not None and not cycle.response_started and not self.pipeline
        if quiet:  # the 408 cannot land in the middle of another response
            self.transport.write(HEAD_TIMEOUT if stage == _HEAD else BODY_TIMEOUT)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        clients.opened(self.loop)  # the batcher's count of who may send: from its first POST
        self.gathering = GatheringTransport(transport, self.loop)
        super().connection_made(self.gathering)  # type: ignore[arg-type]
        self._arm(_HEAD)

    def data_received(self, data: bytes) -> None:
        self._idle_since = None  # busy: the keep-alive timer, when it fires, lets go
        if self._raw is not None and not self._partial and self._take_whole(data):
            return
        chunk: bytes | memoryview = data
        while self._stage != _BODY and self._head_bytes + len(chunk) > self.max_header_bytes:
            # The parser reads up to the cap, no further, unless a head ends within it. Views:
            # a large body read with its head is not copied to be cut.
            room = self.max_header_bytes - self._head_bytes
            self._head_bytes = self.max_header_bytes
            chunk = memoryview(chunk)
            self._feed(chunk[:room])
            if self.transport.is_closing():
                return
            if self._head_bytes:  # not reset by ``on_headers_complete``: the head is too large
                cycle = self.cycle
                if cycle is None or cycle.response_complete:  # not inside another response
                    self.transport.write(HEAD_TOO_LARGE)
                self.transport.close()
                return
            chunk = chunk[room:]
        if self._stage != _BODY:
            self._head_bytes += len(chunk)
        self._feed(chunk)

    def _feed(self, data: bytes | memoryview) -> None:
        super().data_received(data)  # type: ignore[arg-type]  # httptools reads any buffer
        if self._stage == _IDLE:
            self._disarm()
        else:
            self._arm(self._stage)

    def on_message_begin(self) -> None:
        self._partial = True
        super().on_message_begin()
        self.scope[HOOKS] = self.hooks  # type: ignore[literal-required]
        self._stage = _HEAD

    def on_headers_complete(self) -> None:
        self._stage = _BODY
        self._head_bytes = 0
        self._disarm()  # the body's clock starts now
        if not self._posted and self.parser.get_method() == b"POST":
            self._first_post()
        if self._raw is None or not self._take_raw():
            super().on_headers_complete()

    def _take_raw(self) -> bool:
        """Make the request whose head the parser just read a ``RawExchange`` if the raw path's
        rule takes it; uvicorn's own ``on_headers_complete`` is then skipped."""
        head = _raw_head(self.parser, self.url, self.headers)
        if head is None or not self._free():
            return False
        return self._take(head, self.scope)

    def _take_whole(self, data: bytes) -> bool:
        """Answer ``data`` raw without feeding the parser if it is exactly one whole request
        whose head httptools has read before (``_HEADS``) and the rule takes. Anything else goes
        to the parser untouched (it has seen none of it)."""
        if not data.startswith(b"POST /") or self.gathering.wire.is_closing():
            return False
        if not self._posted:
            self._first_post()
        end = data.find(b"\r\n\r\n", 0, _HEAD_MAX_BYTES) + 4
        if end < 4:
            return False
        head_bytes = data[:end]
        if head_bytes in _HEADS:
            head = _HEADS[head_bytes]
        else:
            if len(_HEADS) >= _HEADS_MAX:
                _HEADS.clear()
            head = _HEADS[head_bytes] = _read_head(head_bytes)
        if head is None or len(data) - end != head[3] or not self._free():
            return False
        if not self._take(head, _NO_SCOPE):
            return False
        self._stage = _IDLE
        if self._timer is not None:
            self._disarm()
        exchange = self._exchange
        assert exchange is not None and self._raw is not None
        exchange.chunks.append(data[end:])
        exchange.more_body = False
        self._exchange = None
        self._raw.answer_raw(exchange, self._route)
        return True

    def _first_post(self) -> None:
        """The connection's first request that may reach a batcher: from now on it counts as
        one that may send one at a time (``gateway.batching.clients``); until now it asked only
        for health, metadata or metrics, if anything."""
        self._posted = True
        clients.carries_more(self.loop, first=True)

    def _free(self) -> bool:
        """The raw path's rule for the connection: nothing in flight or queued on it, no root
        path, and under the concurrency limit (at the limit uvicorn answers 503)."""
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.pipeline:
            return False
        if self.root_path:
            return False
        limit = self.limit_concurrency
        return limit is None or (len(self.connections) < limit and len(self.tasks) < limit)

    def _take(self, head: _Head, scope: Any) -> bool:
        """Make this request a ``RawExchange`` if the app routes it."""
        path, fields, keep_alive, length = head
        assert self._raw is not None
        route = self._raw.raw_route(path, length)
        if route is None:
            return False
        self.cycle = self._exchange = RawExchange(self, scope, fields, keep_alive)
        self._route = route
        return True

    def on_body(self, body: bytes) -> None:
        """A raw exchange's body piece is kept as it is, and reading goes on: its length was
        checked against the limit before (``raw_route``). uvicorn's, for every other request."""
        exchange = self._exchange
        if exchange is not None:
            exchange.chunks.append(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._stage = _IDLE
        self._partial = False
        super().on_message_complete()
        exchange = self._exchange
        if exchange is not None:
            self._exchange = None
            assert self._raw is not None
            self._raw.answer_raw(exchange, self._route)

    # keep-alive: uvicorn arms a timer after every response and cancels it at the next request,
    # which costs 5 to 9 % of a small model's throughput. One timer per connection instead,
    # re-armed when it fires early: a response costs a clock reading, not a timer.

    def on_response_complete(self) -> None:
        """uvicorn's, with the keep-alive timer above. Where uvicorn has more to do than count
        the response, resume reading and wait (a pipelined request to start, a connection
        closing) it does it; the rest of its statements are the three below, which
        ``tests/test_uvicorn_seam.py`` holds uvicorn's method to."""
        if self.pipeline or self.gathering.wire.is_closing():
            super().on_response_complete()
            return
        self.server_state.total_requests += 1
        self.flow.resume_reading()
        self._idle_since = self.loop.time()
        if self._keep_alive is None:
            self._keep_alive = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

    def _idle_check(self) -> None:
        self._keep_alive = None
        if self._idle_since is None or self.transport.is_closing():
            return
        left_s = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if left_s > 0:
            self._keep_alive = self.loop.call_later(left_s, self._idle_check)
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._keep_alive is not None:
            self._keep_alive.cancel()
            self._keep_alive = None
        self._disarm()
        self._stage = _IDLE
        clients.closed(self.loop, 1 if self._posted else 0)
        super().connection_lost(exc)
        on_lost, self.hooks.on_lost = self.hooks.on_lost, None
        if on_lost is not None:
            on_lost()


def connection_protocol(
    header_timeout_s: float, body_timeout_s: float, max_header_bytes: int
) -> type[ConnectionProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with these timeouts and head cap."""
    return type(
        "ConnectionProtocol",
        (ConnectionProtocol,),
        {
            "header_timeout_s": header_timeout_s,
            "body_timeout_s": body_timeout_s,
            "max_header_bytes": max_header_bytes,
        },
    )
