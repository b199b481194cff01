"""HTTP/2 on the serving event loop, for the gRPC front end: frames read and written here.
(Over 450 lines on purpose: one connection's protocol state machine, its frames, flow control
and streams change together; split, each part would reach into the others' state.)

Why not ``grpc.aio`` or the ``h2`` library: a bare server answering a constant cost ~500-800
us of CPU per call with either, and 30-90 us with frames read here
(``bench/results/grpc_bare.md``), and ``grpc.aio`` hands the loop one call per poll, so calls
from one connection never reached the batcher together.

This module owns one connection (:class:`Connection`, an ``asyncio.Protocol``): the preface
and SETTINGS exchange, frames (RFC 9113), HPACK, flow control both ways, streams' life
(RST_STREAM, GOAWAY, a graceful close that lets running streams finish). It knows nothing of
gRPC: each request stream's events go to the :class:`StreamHandler` that ``open_stream``
returns for its headers, and the handler answers through its :class:`Stream`.

- HPACK: request header blocks go to the ``hpack`` package's decoder (the table is shared by
  every block of a connection, so all must be decoded in order). A block that changes no
  table state (no insertion, no size update) means the same headers whenever its bytes come
  again while the table is unchanged, so it is decoded once and looked up by its bytes; any
  block that changes the table clears that cache. Clients repeat identical blocks for every
  call (all indexed fields after the first), so most calls decode nothing. Response blocks are
  literals without indexing: no encoder state at all.
- Flow control: the peer's windows (connection and stream) bound what is sent; what does not
  fit waits in the stream's outbox until a WINDOW_UPDATE. Received data is credited back to the
  connection at once, and to a stream as its handler consumes it (``Stream.consumed``), so a
  stream whose requests are not being taken stops its sender at ``STREAM_WINDOW_BYTES``.
- TLS is the listener's (``gateway.grpc.tls``); over TLS a connection that did not agree on
  ALPN ``h2`` is closed at once (counted as ``tls_no_h2``).
- Writes made during one loop callback leave in one ``writelines`` at its end.
- Errors: a frame that breaks the protocol is a connection error (GOAWAY with its code, then
  the connection closes; its streams' handlers are reset); a bad stream alone gets RST_STREAM.
- Hostile clients (the HTTP/2 CVEs of recent years): memory and work per connection are bounded
  by the constants below: header blocks (bytes, frames, decoded size; only small ones cached),
  client resets (rapid reset), answers the client does not take (``max_unsent_bytes``, checked
  by the caller, and ``send_timeout_s`` without progress), the handshake and idle timeouts.
  Malformed request headers (RFC 9113 8.2) reset the stream. Each event is logged and counted in
  :data:`EVENTS`.

Why one module of this size: the connection's state (windows, streams, the HPACK table, the
outbox, the limits above) is read and changed by every frame handler, and each limit is only
right together with the flow control it bounds. What could split next is the HPACK part
(``header_block``, ``HeaderDecoder``), which shares no state with the rest.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
from collections.abc import Callable
from typing import Any, Protocol

import hpack

from gateway.batching import clients

__all__ = [
    "PREFACE",
    "Connection",
    "Headers",
    "Stream",
    "StreamHandler",
    "header_block",
]

log = logging.getLogger(__name__)

# What the limits below did, for all connections of the process (log lines say it too; and
# ``/metrics`` through :func:`metric_families`).
EVENT_KINDS = (
    "send_timeout",
    "rapid_reset",
    "malformed",
    "unsent_limit",
    "connection_limit",
    "idle",
    "tls_no_h2",
)
EVENTS: collections.Counter[str] = collections.Counter()


def metric_families() -> list[Any]:
    """``gateway_grpc_http2_events_total{event}``: every kind, zeros included, so that a
    dashboard's alert on hostile clients has a series before the first one comes."""
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(
        "gateway_grpc_http2_events",
        "gRPC connections and streams the HTTP/2 limits acted on, by limit",
        labels=["event"],
    )
    for kind in EVENT_KINDS:
        family.add_metric([kind], float(EVENTS[kind]))
    return [family]


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = 0, 1, 2, 3, 4, 5, 6, 7
WINDOW_UPDATE, CONTINUATION = 8, 9
# flags
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9
ENHANCE_YOUR_CALM = 11
# settings
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 1, 2, 3, 4
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 5, 6

DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
FRAME_BYTES = 16384  # the largest frame we accept (the protocol's default; not raised)
# Unconsumed bytes a stream may send ahead. Large enough that a request of a few MB (a
# 602 KB image, a batch of them) goes out whole, without waiting a round trip for a
# WINDOW_UPDATE: at 256 KiB a 602 KB request took 21-22 ms through a link delaying answers
# by 5 ms, 9-10 ms at 1 MiB or more (bench/grpc_window.py); grpc-core's servers grow their
# windows past this by BDP probing. It is also what a ModelStreamInfer stream whose requests
# are not being taken may hold unread (was 256 KiB); a unary call's message is bounded by
# grpc_max_message_bytes whatever the window.
STREAM_WINDOW_BYTES = 4 * 1024 * 1024
CONNECTION_WINDOW_BYTES = 16 * 1024 * 1024
MAX_STREAMS = 256  # concurrent streams per connection
MAX_HEADER_LIST_BYTES = 64 * 1024  # decoded, as HPACK counts them
MAX_HEADER_BLOCK_BYTES = 64 * 1024  # encoded, HEADERS + CONTINUATION together
HANDSHAKE_TIMEOUT_S = 10.0  # from accept to the client's preface and first SETTINGS
_CACHED_BLOCKS = 64
# Only small blocks are cached (a gRPC call's are a few hundred bytes): 64 distinct 64 KiB
# literal blocks would otherwise make every connection hold 4 MiB.
_CACHED_BLOCK_BYTES = 1024
# Frames one header block may span: empty CONTINUATION frames add no bytes, so the byte bound
# alone would let a client send them forever (the CVE-2024-27316 family).
MAX_CONTINUATIONS = 64
# Rapid reset (CVE-2023-44487): a connection whose client reset (RST_STREAM before our answer
# ended) more than RESET_BURST streams within RESET_WINDOW_S, and more than half the streams it
# opened there, gets GOAWAY ENHANCE_YOUR_CALM (Envoy's rule; clients cancelling on deadlines
# while most of their calls complete are not closed). MAX_STREAMS bounds a legitimate burst.
RESET_BURST = 2 * MAX_STREAMS
RESET_WINDOW_S = 10.0
# Answer bytes a connection may hold that the client has not taken (streams' outboxes, waiting
# for flow-control window, plus the socket's buffer); an answer past it ends its call with
# RESOURCE_EXHAUSTED. ``Http2GrpcServer`` raises it to twice the largest message.
MAX_UNSENT_BYTES = 64 * 1024 * 1024
# A connection with answers waiting to go out that sends nothing for this long (zero window,
# a client that never reads) is closed: GOAWAY ENHANCE_YOUR_CALM.
SEND_TIMEOUT_S = 60.0
# A connection with no stream and no PING for this long is closed (GOAWAY NO_ERROR); 0: never.
IDLE_TIMEOUT_S = 0.0
# RFC 9113 8.2.2: fields that are HTTP/1's connection management, malformed in HTTP/2
_CONNECTION_FIELDS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority"})

Headers = list[tuple[bytes, bytes]]
_FRAME_HEAD = struct.Struct(">BHBBI")  # 24-bit length as 8 + 16 bits, type, flags, stream
_JOIN_BYTES = 4096  # an answer's message below this goes out joined with its frames


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME_HEAD.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def _frame_head(kind: int, flags: int, stream_id: int, length: int) -> bytes:
    return _FRAME_HEAD.pack(length >> 16, length & 0xFFFF, kind, flags, stream_id)


# -- HPACK --------------------------------------------------------------------------------------


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def header_block(headers: Headers) -> bytes:
    """An HPACK block of literals without indexing (``:status: 200`` from the static table):
    the same bytes whatever was sent before, so blocks can be built once and reused."""
    out = []
    for name, value in headers:
        if name == b":status" and value == b"200":
            out.append(b"\x88")
            continue
        out += (b"\0", _hpack_int(len(name), 7), name, _hpack_int(len(value), 7), value)
    return b"".join(out)


def _read_int(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = block[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _changes_table(block: bytes) -> bool:
    """Whether decoding ``block`` changes the HPACK dynamic table (an insertion or a size
    update). A malformed block counts as changing it: the decoder then says what is wrong."""
    pos, n = 0, len(block)
    try:
        while pos < n:
            byte = block[pos]
            if byte & 0x80:  # indexed field
                pos = _read_int(block, pos, 7)[1]
                continue
            if byte & 0x60:  # literal with incremental indexing (01), table size update (001)
                return True
            new_name = not byte & 0x0F
            pos = _read_int(block, pos, 4)[1]  # literal without / never indexed
            if new_name:
                length, pos = _read_int(block, pos, 7)
                pos += length
            length, pos = _read_int(block, pos, 7)
            pos += length
        return pos != n
    except IndexError:
        return True


class HeaderDecoder:
    """HPACK decoding for one connection, with blocks that change no state reused."""

    def __init__(self) -> None:
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = MAX_HEADER_LIST_BYTES
        self._cache: dict[bytes, tuple[Headers, str | None]] = {}

    def decode(self, block: bytes) -> Headers:
        """The block's headers; raises ``hpack.HPACKError`` for a malformed one."""
        return self.decode_request(block)[0]

    def decode_request(self, block: bytes) -> tuple[Headers, str | None]:
        """The block's headers and what makes them a malformed request (None: nothing), both
        cached with the block."""
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        changes = _changes_table(block)
        headers = [(bytes(k), bytes(v)) for k, v in self._decoder.decode(block, raw=True)]
        decoded = (headers, request_problem(headers))
        if changes:
            self._cache.clear()
        elif len(self._cache) < _CACHED_BLOCKS and len(block) <= _CACHED_BLOCK_BYTES:
            self._cache[block] = decoded
        return decoded


def request_problem(headers: Headers) -> str | None:
    """Why a request's header list is malformed (RFC 9113 8.2, 8.3.1), or None: field names
    in lower case, no connection-specific field, ``te`` only ``trailers``, pseudo-headers
    known, once each, before the others, ``:method``, ``:scheme`` and ``:path`` present."""
    seen: set[bytes] = set()
    regular = False
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                return f"pseudo-header {name[:32]!r} after a regular field"
            if name not in _REQUEST_PSEUDO or name in seen:
                return f"pseudo-header {name[:32]!r} unknown or repeated"
            seen.add(name)
            continue
        regular = True
        if name != name.lower() or not name:
            return f"field name {name[:32]!r} not in lower case"
        if name in _CONNECTION_FIELDS or (name == b"te" and value != b"trailers"):
            return f"connection-specific field {name[:32]!r}"
    if len(seen & {b":method", b":scheme", b":path"}) != 3:
        return "a request without :method, :scheme or :path"
    return None


# -- streams ------------------------------------------------------------------------------------


class StreamHandler(Protocol):
    """What a stream's request side tells its owner (the gRPC call)."""

    def data(self, payload: memoryview) -> None:
        """Bytes of the request body, in order (views valid as long as the handler keeps them)."""

    def end(self) -> None:
        """The request is complete (END_STREAM)."""

    def reset(self) -> None:
        """The stream is gone before the answer ended: the peer reset it, or the connection
        closed. Nothing more can be sent."""


OpenStream = Callable[["Stream", Headers], StreamHandler]


class StreamReset(ConnectionError):
    """A stream was reset or its connection lost while a writer waited to send on it."""


class Stream:
    """One request stream: its windows, its outbox, and the calls its handler answers with."""

    __slots__ = (
        "conn",
        "handler",
        "id",
        "local_open",
        "outbox",
        "recv_window",
        "remote_open",
        "send_window",
        "unacked",
        "waiters",
    )

    def __init__(self, conn: Connection, stream_id: int, send_window: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.handler: StreamHandler | None = None
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW_BYTES
        self.unacked = 0  # consumed bytes not yet credited back
        self.remote_open = True
        self.local_open = True
        # (HEADERS, block, end) or (DATA, view, end), in order; DATA waits for window
        self.outbox: collections.deque[tuple[int, bytes | memoryview, bool]] = collections.deque()
        self.waiters: list[asyncio.Future[None]] = []

    @property
    def open(self) -> bool:
        """Whether the answer can still be sent (not ended, not reset)."""
        return self.local_open and self.conn.streams.get(self.id) is self

    def send_headers(self, block: bytes, end: bool = False) -> None:
        if self.open:
            self.outbox.append((HEADERS, block, end))
            self.conn._pump(self)

    def send_data(self, data: bytes | memoryview, end: bool = False) -> None:
        if self.open:
            view = memoryview(data).cast("B")
            self.outbox.append((DATA, view, end))
            self.conn.queued += len(view)
            self.conn._pump(self)

    def send_answer(
        self, head: bytes, prefix: bytes, data: bytes | memoryview, tail: bytes
    ) -> None:
        """A whole answer: HEADERS ``head``, one DATA of ``prefix + data``, HEADERS ``tail``
        ending the stream. When nothing waits before it and the windows take the DATA whole
        (a unary call's answer, nearly always), its frames go straight to the connection's
        next write, not through the outbox; else as ``send_headers`` / ``send_data`` would."""
        if not self.open:
            return
        conn = self.conn
        size = len(prefix) + len(data)
        if self.outbox or size > min(self.send_window, conn._send_window, conn._max_send_frame):
            self.send_headers(head)
            self.send_data(prefix + data if len(data) < 65536 else prefix)
            if len(data) >= 65536:
                self.send_data(data)
            self.send_headers(tail, end=True)
            return
        sid = self.id
        trailers = _frame_head(HEADERS, END_HEADERS | END_STREAM, sid, len(tail))
        if len(data) < _JOIN_BYTES:  # one piece: copying a small answer costs less than parts
            conn._write(b"".join((
                _frame_head(HEADERS, END_HEADERS, sid, len(head)), head,
                _frame_head(DATA, 0, sid, size), prefix, data, trailers, tail,
            )))  # fmt: skip
        else:
            conn._write(b"".join((
                _frame_head(HEADERS, END_HEADERS, sid, len(head)), head,
                _frame_head(DATA, 0, sid, size), prefix,
            )))  # fmt: skip
            conn._write(data)
            conn._write(trailers + tail)
        self.send_window -= size
        conn._send_window -= size
        conn._sent += 1
        conn._ended(self)

    def consumed(self, n: int) -> None:
        """The handler took ``n`` bytes: the peer may send as many more on this stream."""
        self.unacked += n
        if self.unacked >= STREAM_WINDOW_BYTES // 2 and self.remote_open and self.open:
            self.conn._write(frame(WINDOW_UPDATE, 0, self.id, struct.pack(">I", self.unacked)))
            self.recv_window += self.unacked
            self.unacked = 0

    def reset(self, code: int = CANCEL) -> None:
        """Abandon the stream (RST_STREAM): what is queued is dropped."""
        if self.conn.streams.get(self.id) is self:
            self.conn._write(frame(RST_STREAM, 0, self.id, struct.pack(">I", code)))
            self.conn._forget(self)

    async def drain(self) -> None:
        """Until everything queued on this stream is handed to the socket and the socket takes
        more; raises :class:`StreamReset` when the stream is gone."""
        while self.outbox or self.conn.paused:
            if self.conn.streams.get(self.id) is not self:
                raise StreamReset
            waiter = self.conn.loop.create_future()
            self.waiters.append(waiter)
            await waiter
        if self.conn.streams.get(self.id) is not self and self.local_open:
            raise StreamReset

    def _wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


# -- the connection -----------------------------------------------------------------------------


class ProtocolError(Exception):
    """A connection error: the peer broke the protocol (``code`` goes in the GOAWAY)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


_SERVER_SETTINGS = frame(
    SETTINGS,
    0,
    0,
    struct.pack(
        ">HIHIHIHI",
        MAX_CONCURRENT_STREAMS,
        MAX_STREAMS,
        INITIAL_WINDOW_SIZE,
        STREAM_WINDOW_BYTES,
        MAX_HEADER_LIST_SIZE,
        MAX_HEADER_LIST_BYTES,
        ENABLE_PUSH,
        0,
    ),
)
_CONNECTION_WINDOW = frame(
    WINDOW_UPDATE, 0, 0, struct.pack(">I", CONNECTION_WINDOW_BYTES - DEFAULT_WINDOW)
)
_SETTINGS_ACK = frame(SETTINGS, ACK, 0)


class Connection(asyncio.Protocol):
    """One HTTP/2 connection, server side (see the module docstring)."""

    def __init__(
        self,
        open_stream: OpenStream,
        loop: asyncio.AbstractEventLoop,
        on_close: Callable[[Connection], object] | None = None,
        *,
        handshake_timeout_s: float | None = None,
        idle_timeout_s: float | None = None,
        send_timeout_s: float | None = None,
        max_unsent_bytes: int | None = None,
        refuse: str = "",
    ) -> None:
        self.open_stream = open_stream
        self.loop = loop
        self.on_close = on_close
        self.handshake_timeout_s = (
            HANDSHAKE_TIMEOUT_S if handshake_timeout_s is None else handshake_timeout_s
        )
        self.idle_timeout_s = IDLE_TIMEOUT_S if idle_timeout_s is None else idle_timeout_s
        self.send_timeout_s = SEND_TIMEOUT_S if send_timeout_s is None else send_timeout_s
        self.max_unsent_bytes = MAX_UNSENT_BYTES if max_unsent_bytes is None else max_unsent_bytes
        self.refuse = refuse  # non-empty: the connection is over a limit, closed at once
        self.queued = 0  # DATA bytes in the streams' outboxes
        self._sent = 0  # progress (DATA frames out, socket drained): the send timeout's clock
        self._send_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._active_at = loop.time()  # last stream end or PING, for the idle timeout
        self._opened = 0  # streams the client opened, and reset, in this reset window
        # Requests in flight on it, counted by its streams' handlers (gRPC: ModelInfer calls),
        # and the most it has had at once: its clients' count (``gateway.batching.clients``).
        self.requests = 0
        self.requests_most = 0
        self._resets = 0
        self._window_at = loop.time()
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.paused = False
        self.closing = False  # GOAWAY sent: no new streams
        self.closed = loop.create_future()
        self._blocked: dict[int, Stream] = {}  # streams with DATA waiting for window, in order
        self._decoder = HeaderDecoder()
        self._out: list[bytes | memoryview] = []
        self._flush_handle: asyncio.Handle | None = None
        self._parts: list[bytes | memoryview] = []  # an incomplete frame's bytes so far
        self._have = 0
        self._need = len(PREFACE)  # bytes before anything can be read
        self._preface = False
        self._settled = False  # the peer's first SETTINGS seen
        self._last_id = 0  # highest stream id the peer opened
        self._send_window = DEFAULT_WINDOW
        self._initial_send_window = DEFAULT_WINDOW
        self._max_send_frame = FRAME_BYTES
        self._recv_window = CONNECTION_WINDOW_BYTES
        self._recv_unacked = 0
        # an unfinished header block: (stream, flags, parts, bytes so far)
        self._continued: tuple[int, int, list[bytes], int] | None = None
        self._window_opened = False  # a WINDOW_UPDATE or SETTINGS in this read
        self._handshake_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's too)
        clients.opened(self.loop)  # none at once so far: grows with ``requests_most``
        tls = transport.get_extra_info("ssl_object")
        if tls is not None and tls.selected_alpn_protocol() != "h2":
            # HTTP/2 over TLS is agreed by ALPN (RFC 9113 3.2); grpc's servers refuse a client
            # that did not offer h2, and so does this one: it may not speak HTTP/2 at all.
            EVENTS["tls_no_h2"] += 1
            log.debug("TLS connection closed: ALPN h2 not agreed")
            transport.abort()  # type: ignore[attr-defined]
            return
        self._write(_SERVER_SETTINGS + _CONNECTION_WINDOW)
        if self.refuse:
            EVENTS["connection_limit"] += 1
            self._fail(ENHANCE_YOUR_CALM, self.refuse)
            return
        # a connection that never says HTTP/2 is not held open (slowloris)
        self._handshake_timer = self.loop.call_later(self.handshake_timeout_s, self._no_handshake)
        if self.idle_timeout_s > 0:
            self._idle_timer = self.loop.call_later(self.idle_timeout_s, self._idle)

    def _idle(self) -> None:
        """One timer per connection, re-armed when it fires early."""
        self._idle_timer = None
        if self.transport is None or self.transport.is_closing() or self.closing:
            return
        due = self._active_at + self.idle_timeout_s
        if self.streams or due > self.loop.time():
            wait = self.idle_timeout_s if self.streams else due - self.loop.time()
            self._idle_timer = self.loop.call_later(wait, self._idle)
            return
        EVENTS["idle"] += 1
        self.shutdown()  # GOAWAY NO_ERROR: a client reconnects when it has a call to make

    def _watch_sending(self) -> None:
        """Answers wait to go out: arm the send timeout, unless armed."""
        if self._send_timer is None and self.send_timeout_s > 0:
            self._send_timer = self.loop.call_later(
                self.send_timeout_s, self._send_check, self._sent
            )

    def _send_check(self, sent: int) -> None:
        self._send_timer = None
        if not (self._blocked or self.paused):
            return
        if self._sent == sent:
            log.warning("HTTP/2 connection closed: no answer bytes taken in %.0f s (%d queued)",
                        self.send_timeout_s, self.queued)  # fmt: skip
            EVENTS["send_timeout"] += 1
            self._fail(ENHANCE_YOUR_CALM, "the client took no answer bytes in time")
            if self.transport is not None:
                self.transport.abort()  # what is buffered for it is dropped too
            return
        self._watch_sending()

    def unsent(self) -> int:
        """Answer bytes held for this client: in outboxes and in the socket's buffer."""
        buffered = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self.queued + buffered

    def _no_handshake(self) -> None:
        self._handshake_timer = None
        if not self._settled:
            self._fail(PROTOCOL_ERROR, "no HTTP/2 preface and SETTINGS in time")

    def connection_lost(self, exc: Exception | None) -> None:
        clients.closed(self.loop, self.requests_most)
        for timer in (self._handshake_timer, self._send_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        for stream in list(self.streams.values()):
            self._forget(stream)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._out = []
        if not self.closed.done():
            self.closed.set_result(None)
        if self.on_close is not None:
            self.on_close(self)

    def pause_writing(self) -> None:
        """The socket's buffer is full: read no more requests until it drains."""
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()
        self._watch_sending()

    def resume_writing(self) -> None:
        self.paused = False
        self._sent += 1
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        for stream in list(self.streams.values()):
            if stream.waiters and not stream.outbox:
                stream._wake()

    def data_received(self, data: bytes) -> None:
        try:
            self._take(data)
        except ProtocolError as exc:
            self._fail(exc.code, str(exc))
            return
        if self._window_opened:  # once per read: a window granted in pieces fills whole frames
            self._window_opened = False
            self._pump_blocked()
        if self._recv_unacked >= CONNECTION_WINDOW_BYTES // 2:
            self._write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._recv_unacked)))
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0
        self._flush()

    # -- reading ----------------------------------------------------------------------------

    def _take(self, data: bytes) -> None:
        """Read what ``data`` completes. A frame the last read cut is completed with only the
        bytes it lacks (one join of at most a frame), and the rest is read where it lies: a
        big request's reads are not copied again whole (they were, ~0.65 of a 602 KB
        request's bytes, when every read after a cut frame was joined to it)."""
        rest: bytes | memoryview = data
        while self._parts:
            missing = self._need - self._have
            if len(rest) < missing:
                self._parts.append(rest)
                self._have += len(rest)
                return
            head = b"".join((*self._parts, rest[:missing]))
            rest = memoryview(rest)[missing:]
            self._parts, self._have = [], 0
            pos = self._read(head)
            if pos < len(head):  # a header completed: now its payload is needed
                self._parts, self._have = [head[pos:]], len(head) - pos
        if not rest:
            return
        pos = self._read(rest)
        if pos < len(rest):
            tail = rest[pos:]  # a view: the frame's bytes so far stay where they are
            self._parts, self._have = [tail], len(tail)

    def _read(self, data: bytes | memoryview) -> int:
        """Handle every whole frame in ``data``; returns where the unread rest begins (and sets
        ``_need``, the bytes the next read must bring at least)."""
        pos, n = 0, len(data)
        if not self._preface:
            first = bytes(data[: len(PREFACE)])
            if not PREFACE.startswith(first):
                raise ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            if n < len(PREFACE):
                self._need = len(PREFACE)
                return 0
            self._preface, pos = True, len(PREFACE)
        view = memoryview(data)
        head = _FRAME_HEAD.unpack_from  # one C call per frame header
        while True:
            if n - pos < 9:
                self._need = 9
                return pos
            high, low, kind, flags, stream_id = head(data, pos)
            length = high << 16 | low
            if length > FRAME_BYTES:
                raise ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            if n - pos - 9 < length:
                self._need = 9 + length
                return pos
            stream_id &= 0x7FFFFFFF
            start = pos + 9
            pos = start + length
            if self.transport is None or self.transport.is_closing():
                return n
            self._frame(kind, flags, stream_id, view[start:pos])

    def _frame(self, kind: int, flags: int, stream_id: int, payload: memoryview) -> None:
        if self._continued is not None and kind != CONTINUATION:
            raise ProtocolError(PROTOCOL_ERROR, "a header block was not continued")
        if not self._settled and kind != SETTINGS:
            raise ProtocolError(PROTOCOL_ERROR, "the first frame must be SETTINGS")
        if kind == DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif kind == CONTINUATION:
            self._on_continuation(flags, stream_id, payload)
        elif kind == SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == PING:
            if stream_id or len(payload) != 8:
                raise ProtocolError(FRAME_SIZE_ERROR if stream_id == 0 else PROTOCOL_ERROR, "PING")
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, bytes(payload)))
            self._active_at = self.loop.time()
        elif kind == RST_STREAM:
            if len(payload) != 4:
                raise ProtocolError(FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
            self._check_known(stream_id, "RST_STREAM")
            stream = self.streams.get(stream_id)
            if stream is not None:
                if stream.local_open:
                    self._count_reset()
                self._forget(stream)
        elif kind == GOAWAY:
            if stream_id:
                raise ProtocolError(PROTOCOL_ERROR, "GOAWAY on a stream")
            self.closing = True  # the peer opens no more; running streams finish
            self._close_if_done()
        elif kind == PRIORITY:
            if stream_id == 0:
                raise ProtocolError(PROTOCOL_ERROR, "PRIORITY on stream 0")
        elif kind == PUSH_PROMISE:
            raise ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # other types: ignored, as the protocol says

    def _count_reset(self) -> None:
        """A client reset a stream we were answering: work started and thrown away."""
        now = self.loop.time()
        if now - self._window_at > RESET_WINDOW_S:
            self._window_at, self._opened, self._resets = now, 0, 0
        self._resets += 1
        if self._resets > RESET_BURST and 2 * self._resets > self._opened:
            EVENTS["rapid_reset"] += 1
            log.warning("HTTP/2 connection closed: %d of its %d streams reset in %.0f s",
                        self._resets, self._opened, RESET_WINDOW_S)  # fmt: skip
            raise ProtocolError(ENHANCE_YOUR_CALM, "too many streams reset")

    def _check_known(self, stream_id: int, what: str) -> None:
        if stream_id == 0:
            raise ProtocolError(PROTOCOL_ERROR, f"{what} on stream 0")
        if stream_id > self._last_id:
            raise ProtocolError(PROTOCOL_ERROR, f"{what} on an idle stream")

    def _on_data(self, flags: int, stream_id: int, payload: memoryview) -> None:
        self._check_known(stream_id, "DATA")
        size = len(payload)
        self._recv_window -= size
        if self._recv_window < 0:
            raise ProtocolError(FLOW_CONTROL_ERROR, "connection window exceeded")
        self._recv_unacked += size
        if flags & PADDED:
            payload = self._unpad(payload)
        stream = self.streams.get(stream_id)
        if stream is None or not stream.remote_open:
            if stream is not None:  # DATA after END_STREAM
                self._reset_now(stream, STREAM_CLOSED)
            return  # a stream we closed or reset: ignored
        stream.recv_window -= size
        if stream.recv_window < 0:
            self._reset_now(stream, FLOW_CONTROL_ERROR)
            return
        stream.unacked += size - len(payload)  # padding is credited back with the rest
        handler = stream.handler
        assert handler is not None
        if payload:
            handler.data(payload)
        if flags & END_STREAM and self.streams.get(stream_id) is stream:
            stream.remote_open = False
            handler.end()
            self._maybe_done(stream)

    def _unpad(self, payload: memoryview) -> memoryview:
        if not payload or payload[0] >= len(payload):
            raise ProtocolError(PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _on_headers(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if stream_id == 0:
            raise ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & PADDED:
            payload = self._unpad(payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise ProtocolError(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            payload = payload[5:]
        if flags & END_HEADERS:
            self._on_header_block(stream_id, flags, bytes(payload))
        else:
            self._continued = (stream_id, flags, [bytes(payload)], len(payload))

    def _on_continuation(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if self._continued is None or self._continued[0] != stream_id:
            raise ProtocolError(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        _, first_flags, parts, size = self._continued
        size += len(payload)
        if size > MAX_HEADER_BLOCK_BYTES:
            raise ProtocolError(ENHANCE_YOUR_CALM, "header block too large")
        if len(parts) >= MAX_CONTINUATIONS:
            raise ProtocolError(ENHANCE_YOUR_CALM, "header block in too many frames")
        parts.append(bytes(payload))
        self._continued = (stream_id, first_flags, parts, size)
        if flags & END_HEADERS:
            self._continued = None
            self._on_header_block(stream_id, first_flags, b"".join(parts))

    def _on_header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        try:  # always decoded: the table is shared by all blocks
            headers, problem = self._decoder.decode_request(block)
        except hpack.HPACKError as exc:
            raise ProtocolError(COMPRESSION_ERROR, f"header block: {type(exc).__name__}") from None
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers
            if not stream.remote_open or not flags & END_STREAM:
                self._reset_now(stream, PROTOCOL_ERROR)
                return
            stream.remote_open = False
            assert stream.handler is not None
            stream.handler.end()
            self._maybe_done(stream)
            return
        if stream_id <= self._last_id:
            if stream_id % 2 == 0:
                raise ProtocolError(PROTOCOL_ERROR, "HEADERS on a server stream id")
            return  # a stream already closed (reset by us, or answered early): ignored
        if stream_id % 2 == 0:
            raise ProtocolError(PROTOCOL_ERROR, "a client stream with an even id")
        self._last_id = stream_id
        if self.closing:
            self._write(frame(RST_STREAM, 0, stream_id, struct.pack(">I", REFUSED_STREAM)))
            return
        if len(self.streams) >= MAX_STREAMS:
            self._write(frame(RST_STREAM, 0, stream_id, struct.pack(">I", REFUSED_STREAM)))
            return
        if problem is not None:  # a malformed request: a stream error (RFC 9113 8.1.1)
            EVENTS["malformed"] += 1
            log.info("HTTP/2 stream %d refused: %s", stream_id, problem)
            self._write(frame(RST_STREAM, 0, stream_id, struct.pack(">I", PROTOCOL_ERROR)))
            return
        stream = Stream(self, stream_id, self._initial_send_window)
        self.streams[stream_id] = stream
        self._opened += 1
        ended = bool(flags & END_STREAM)
        stream.remote_open = not ended  # before the handler: an answer at once needs no reset
        handler = self.open_stream(stream, headers)
        if self.streams.get(stream_id) is not stream:
            return  # answered (refused) at once: dropped, nothing more for its handler
        stream.handler = handler
        if ended:
            handler.end()
            self._maybe_done(stream)

    def _on_settings(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if stream_id:
            raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS of the wrong size")
        if not self._settled:
            self._settled = True
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()
                self._handshake_timer = None
        window: int | None = None
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
                window = value  # applied once: thousands in a frame must not each walk the streams
            elif key == MAX_FRAME_SIZE:
                if not FRAME_BYTES <= value <= 2**24 - 1:
                    raise ProtocolError(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self._max_send_frame = value
            elif key == ENABLE_PUSH and value > 1:
                raise ProtocolError(PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1")
            # HEADER_TABLE_SIZE: our blocks use no table; the others only inform
        if window is not None:
            delta = window - self._initial_send_window
            self._initial_send_window = window
            for stream in self.streams.values():
                stream.send_window += delta
                if stream.send_window > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "a stream window overflowed")
        self._write(_SETTINGS_ACK)
        self._window_opened = True

    def _on_window_update(self, stream_id: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "connection window overflowed")
            self._window_opened = True  # sent on at the end of the read: whole frames
            return
        self._check_known(stream_id, "WINDOW_UPDATE")
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if increment == 0:
            self._reset_now(stream, PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._reset_now(stream, FLOW_CONTROL_ERROR)
            return
        self._window_opened = True

    # -- writing ----------------------------------------------------------------------------

    def _write(self, data: bytes | memoryview) -> None:
        if not self._out and self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def _pump(self, stream: Stream) -> None:
        """Send what the windows let through of ``stream``'s outbox, in order."""
        outbox = stream.outbox
        while outbox:
            kind, item, end = outbox[0]
            if kind == HEADERS:
                outbox.popleft()
                flags = END_HEADERS | (END_STREAM if end else 0)
                self._write(frame(HEADERS, flags, stream.id, bytes(item)))
                if end:
                    self._ended(stream)
                    return
                continue
            size = len(item)
            take = min(size, stream.send_window, self._send_window, self._max_send_frame)
            if take <= 0 and size:
                self._blocked[stream.id] = stream
                self._watch_sending()
                return
            last = take == size
            self._write(_frame_head(DATA, END_STREAM if last and end else 0, stream.id, take))
            if take:
                self._write(item[:take] if not last else item)
                stream.send_window -= take
                self._send_window -= take
                self.queued -= take
                self._sent += 1
            if last:
                outbox.popleft()
                if end:
                    self._ended(stream)
                    return
            else:
                outbox[0] = (DATA, item[take:], end)
        self._blocked.pop(stream.id, None)
        if stream.waiters and not self.paused:
            stream._wake()

    def _pump_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if self._send_window <= 0:
                return
            if stream.send_window > 0:
                self._pump(stream)

    def _ended(self, stream: Stream) -> None:
        """Our END_STREAM is out: the answer is complete. A peer still sending is told to stop
        (RST_STREAM NO_ERROR, as RFC 9113 8.1 allows a server whose response is complete)."""
        stream.local_open = False
        self._clear(stream)
        if stream.remote_open:
            self._write(frame(RST_STREAM, 0, stream.id, struct.pack(">I", NO_ERROR)))
        self._drop(stream)
        stream._wake()

    def _clear(self, stream: Stream) -> None:
        for kind, item, _ in stream.outbox:
            if kind == DATA:
                self.queued -= len(item)
        stream.outbox.clear()

    def _maybe_done(self, stream: Stream) -> None:
        if not stream.remote_open and not stream.local_open:
            self._drop(stream)

    def _drop(self, stream: Stream) -> None:
        """The stream leaves the connection: no frame reaches its handler any more, so the
        stream lets go of it. The handler (a gRPC call) holds its stream; kept both ways, every
        stream and call would be a reference cycle, freed only by the cycle collector, whose
        passes over a few thousand of them were a p99 stall
        (``bench/results/grpc_tail.md``)."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            self._active_at = self.loop.time()
        stream.handler = None
        self._blocked.pop(stream.id, None)
        self._close_if_done()

    def _reset_now(self, stream: Stream, code: int) -> None:
        self._write(frame(RST_STREAM, 0, stream.id, struct.pack(">I", code)))
        self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        """The stream is gone (reset either way, or the connection lost): tell its handler."""
        was_open = self.streams.get(stream.id) is stream
        handler = stream.handler
        self._clear(stream)
        self._drop(stream)
        if was_open and stream.local_open and handler is not None:
            handler.reset()
        stream._wake()

    # -- closing ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Graceful close: GOAWAY (no new streams), the connection closes when its running
        streams have finished."""
        if self.closing or self.transport is None or self.transport.is_closing():
            return
        self.closing = True
        self._write(frame(GOAWAY, 0, 0, struct.pack(">II", self._last_id, NO_ERROR)))
        self._flush()
        self._close_if_done()

    def abort(self) -> None:
        """Close now: streams still running are reset."""
        if self.transport is not None and not self.transport.is_closing():
            self._write(frame(GOAWAY, 0, 0, struct.pack(">II", self._last_id, NO_ERROR)))
            self._flush()
            self.transport.close()

    def _close_if_done(self) -> None:
        if self.closing and not self.streams and self.transport is not None:
            self._flush()
            self.transport.close()

    def _fail(self, code: int, message: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        debug = message.encode()[:256]
        self._write(frame(GOAWAY, 0, 0, struct.pack(">II", self._last_id, code) + debug))
        self._flush()
        self.transport.close()
