"""HTTP connections: what uvicorn's httptools protocol leaves to each request, done once per
connection.

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
  Content-Length of at most 64 KiB, no ``Expect``, nothing pipelined ahead of it, under the
  concurrency limit) is then answered through a ``RawExchange``: no ASGI scope, no
  ``RequestResponseCycle``, no ``receive``/``send`` messages, one write. Everything else,
  including every request those conditions exclude, goes through uvicorn as before. Keep-alive,
  pipelining behind it, graceful shutdown, timeouts and the concurrency limit stay uvicorn's and
  this module's: the exchange stands in for the cycle in the attributes they use.
  When a read holds exactly one such request, whole, with a plain head (token names,
  visible-ASCII values, an origin-form target), it is read here without the parser at all
  (``_whole_post``); anything else goes to the parser untouched.
- **Keep-alive.** One timer per connection, re-armed when it fires early, instead of uvicorn's
  timer armed after every response and cancelled at the next request.
- **Parser errors** are answered ``{"error": ...}`` like every other error, not in plain text.

Handlers must work without these (other protocols, such as h11, provide none): ``HOOKS`` absent
means "keep your own timeouts and disconnect watch".
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Protocol

import httptools
import orjson
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

HOOKS = "gateway.connection"  # scope key

# A request head simple enough to read without httptools (``ConnectionProtocol._whole_post``):
# an origin-form target and ``name: value`` fields of token names and visible-ASCII values.
# Anything else (obs-fold, control or non-ASCII bytes, another method or version) is left to the
# parser, which knows every rule.
_NAME = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = rb"(?:[!-~]+(?:[ \t]+[!-~]+)*)?"  # without the whitespace around it
_FIELD = re.compile(rb"(%s):[ \t]*(%s)[ \t]*\r\n" % (_NAME, _VALUE))
_PLAIN_POST = re.compile(
    rb"POST (/[!-~]*) HTTP/1\.1\r\n((?:%s:[ \t]*%s[ \t]*\r\n)*)\r\n" % (_NAME, _VALUE)
)

# path, fields (names in lower case), keep-alive, Content-Length
_Head = tuple[str, tuple[tuple[bytes, bytes], ...], bool, int]
# Clients repeat their heads byte for byte (same model, same tensor sizes): each distinct head is
# read once. Bounded in entries and in the size of each.
_HEADS: dict[bytes, _Head | None] = {}
_HEADS_MAX = 256
_HEAD_MAX_BYTES = 1024


def _plain_fields(fields: Iterable[tuple[bytes, bytes]]) -> tuple[int, bool] | None:
    """(Content-Length, keep-alive) of a request the raw path may answer, from its header fields
    (names in lower case); None if they ask for more than it does: a missing, repeated or odd
    Content-Length, a transfer coding, ``Expect`` or an upgrade."""
    length = -1
    keep_alive = True
    for name, value in fields:
        if name == b"content-length":
            if length >= 0 or not value.isdigit():
                return None
            length = int(value)
        elif name == b"connection":
            tokens = [token.strip().lower() for token in value.split(b",")]
            if b"upgrade" in tokens:
                return None
            keep_alive = b"close" not in tokens
        elif name in (b"transfer-encoding", b"expect", b"upgrade"):
            return None
    return (length, keep_alive) if length >= 0 else None


def _read_head(head: bytes) -> _Head | None:
    """A plain inference ``POST`` head (through its blank line), or None: the parser's."""
    match = _PLAIN_POST.fullmatch(head)
    if match is None:
        return None
    fields = tuple((name.lower(), value) for name, value in _FIELD.findall(match[2]))
    plain = _plain_fields(fields)
    target = match[1]
    path = target.partition(b"?")[0]
    if plain is None or b"%" in path or b"#" in target:
        return None
    return path.decode("ascii"), fields, plain[1], plain[0]


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

    def answer_raw(self, exchange: RawExchange, route: Any) -> Coroutine[Any, Any, None] | None:
        """Answer with ``exchange.respond`` (or not at all if the client went away), now or
        later; or return a coroutine that will, to run as a task."""


_defaults: tuple[object, bytes] = (None, b"")


def _default_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """uvicorn's default headers (``date``, ``server``) as one block, rebuilt when uvicorn
    replaces the list (every second, for the date)."""
    global _defaults
    if _defaults[0] is not headers:
        _defaults = (headers, b"".join(b"%s: %s\r\n" % pair for pair in headers))
    return _defaults[1]


class _Unwatched:
    """uvicorn's callbacks set the cycle's event; nothing waits on a raw exchange's."""

    __slots__ = ()

    def set(self) -> None:
        pass


_UNWATCHED = _Unwatched()


class RawExchange:
    """One request answered without ASGI. Stands in for uvicorn's ``RequestResponseCycle`` in
    the attributes the protocol's callbacks and this module's timers read and set."""

    __slots__ = (
        "_protocol",
        "body",
        "disconnected",
        "headers",
        "hooks",
        "keep_alive",
        "message_event",
        "more_body",
        "response_complete",
        "response_started",
    )

    def __init__(
        self,
        protocol: ConnectionProtocol,
        keep_alive: bool,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | None = None,
    ) -> None:
        self._protocol = protocol
        self.headers = headers  # names in lower case
        self.hooks = protocol.hooks
        # None: the parser's ``on_body`` is still to add it (``+=``, as to uvicorn's cycle)
        self.body: bytes | bytearray = bytearray() if body is None else body
        self.more_body = body is None
        self.message_event = _UNWATCHED
        self.keep_alive = keep_alive
        self.disconnected = False
        self.response_started = False
        self.response_complete = False

    def respond(self, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> None:
        """Status line, uvicorn's default headers, ``headers`` and ``body`` in one write; then
        what uvicorn does after a response (keep-alive timer, next pipelined request)."""
        if self.response_started:
            return
        self.response_started = True
        protocol = self._protocol
        if self.disconnected or protocol.transport.is_closing():
            return
        parts = [STATUS_LINE[status], _default_headers(protocol.server_state.default_headers)]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", body)
        protocol.gathering.write_now(b"".join(parts))
        self.response_complete = True
        if not self.keep_alive:
            protocol.transport.close()
        protocol.on_response_complete()

    def abort(self) -> None:
        """No answer can be given (a bug): close the connection rather than leave it hanging."""
        self.response_started = True
        self._protocol.transport.close()


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
        self._route: Any = None
        self._partial = False  # the parser holds part of a request
        self._idle_since: float | None = None  # the last response's end, while idle
        self._keep_alive: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # read since the last head was complete, while one is unfinished

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
        self.gathering = GatheringTransport(transport, self.loop)
        super().connection_made(self.gathering)  # type: ignore[arg-type]
        self._arm(_HEAD)

    def data_received(self, data: bytes) -> None:
        if self._raw is not None and not self._partial and self._whole_post(data):
            return
        while self._stage != _BODY and self._head_bytes + len(data) > self.max_header_bytes:
            # The parser reads up to the cap, no further, unless a head ends within it.
            room = self.max_header_bytes - self._head_bytes
            self._head_bytes = self.max_header_bytes
            self._feed(data[:room])
            if self.transport.is_closing():
                return
            if self._head_bytes:  # not reset by ``on_headers_complete``: the head is too large
                cycle = self.cycle
                if cycle is None or cycle.response_complete:  # not inside another response
                    self.transport.write(HEAD_TOO_LARGE)
                self.transport.close()
                return
            data = data[room:]
        if self._stage != _BODY:
            self._head_bytes += len(data)
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        super().data_received(data)
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
        if self._raw is None or not self._take_raw():
            super().on_headers_complete()

    def _take_raw(self) -> bool:
        """Set up a ``RawExchange`` for this request if it qualifies (module docstring)."""
        parser = self.parser
        if parser.get_method() != b"POST" or parser.get_http_version() != "1.1":
            return False
        if self.root_path or not self._free():
            return False
        plain = _plain_fields(self.headers)
        if plain is None or plain[0] > HIGH_WATER_LIMIT:  # above, uvicorn pauses reading
            return False
        length = plain[0]
        path = httptools.parse_url(self.url).path
        if b"%" in path:
            return False
        assert self._raw is not None
        route = self._raw.raw_route(path.decode("ascii"), length)
        if route is None:
            return False
        exchange = RawExchange(self, parser.should_keep_alive(), self.headers)
        self.cycle = exchange  # type: ignore[assignment]
        self._route = route
        return True

    def _free(self) -> bool:
        """Whether a request arriving now may be answered raw: nothing in flight or queued on
        this connection, and under the concurrency limit (else uvicorn answers 503)."""
        if (self.cycle is not None and not self.cycle.response_complete) or self.pipeline:
            return False
        limit = self.limit_concurrency
        return limit is None or (len(self.connections) < limit and len(self.tasks) < limit)

    def _whole_post(self, data: bytes) -> bool:
        """Answer ``data`` raw without the parser if it is exactly one whole, plain inference
        ``POST``: the usual request, head and body in one read. The parser's callbacks, the
        scope uvicorn builds for each request and the copy of the body into the cycle cost about
        a fifth of the event loop's time per request. Anything this reading does not accept in
        full goes to the parser untouched (it has seen none of it)."""
        if not data.startswith(b"POST /"):
            return False
        if self.root_path or not self._free() or self.transport.is_closing():
            return False
        end = data.find(b"\r\n\r\n", 0, self.max_header_bytes) + 4
        if end < 4:  # no head, or one over the cap (the parser's path answers 431)
            return False
        head = data[:end]
        if head in _HEADS:
            read = _HEADS[head]
        else:
            read = _read_head(head)
            if end <= _HEAD_MAX_BYTES:
                if len(_HEADS) >= _HEADS_MAX:
                    _HEADS.clear()
                _HEADS[head] = read
        if read is None:
            return False
        path, headers, keep_alive, length = read
        if len(data) - end != length:  # partial or pipelined: the parser's
            return False
        assert self._raw is not None
        route = self._raw.raw_route(path, length)
        if route is None:
            return False
        self._unset_keepalive_if_required()
        self._disarm()
        self._stage = _IDLE
        exchange = RawExchange(self, keep_alive, headers, data[end:])
        self.cycle = exchange  # type: ignore[assignment]
        self._start_raw(exchange, route)
        return True

    def _start_raw(self, exchange: RawExchange, route: Any) -> None:
        assert self._raw is not None
        work = self._raw.answer_raw(exchange, route)
        if work is not None:
            task = self.loop.create_task(work)
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)

    def on_message_complete(self) -> None:
        self._stage = _IDLE
        self._partial = False
        super().on_message_complete()
        exchange = self.cycle
        if isinstance(exchange, RawExchange) and not exchange.more_body:
            self._start_raw(exchange, self._route)

    # keep-alive: uvicorn arms a timer after every response and cancels it at the next request.
    # One timer per connection instead, re-armed when it fires early: a response costs a clock
    # reading, not a timer handle.

    def on_response_complete(self) -> None:
        """uvicorn's, but for the keep-alive timer."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        if self.flow.read_paused:
            self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self._keep_alive is None:
            self._keep_alive = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None  # busy: the timer, when it fires, lets go

    def _idle_check(self) -> None:
        self._keep_alive = None
        if self._idle_since is None or self.transport.is_closing():
            return
        left = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self._keep_alive = self.loop.call_later(left, self._idle_check)
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._keep_alive is not None:
            self._keep_alive.cancel()
            self._keep_alive = None
        self._disarm()
        self._stage = _IDLE
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
