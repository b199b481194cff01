"""gRPC calls on :mod:`gateway.grpc.http2` streams: the ``asyncio`` transport (the default).
(Over 450 lines on purpose: one call's life, from headers to trailers, and the context the
servicer sees of it; the wire format itself is :mod:`gateway.grpc.wire`.)

The same servicer (:class:`gateway.grpc.server.InferenceServicer`) answers as over
``grpc.aio``; this module is gRPC's part of the wire: the call's path, metadata and
``grpc-timeout`` from the request headers, length-prefixed messages (``gzip`` / ``deflate``
compressed ones inflated, other encodings UNIMPLEMENTED), ``grpc-status`` and a
percent-encoded ``grpc-message`` in the trailers, and :class:`CallContext`, the part of
``grpc.aio``'s ``ServicerContext`` the servicer uses.

``ModelInfer`` takes a short path: the request is submitted to the data plane while the
connection's read is handled, and answered from the request's done callback, with no task.
So all the calls one read brings reach the batcher before it runs, and batch together (the
reason for this transport besides its cost: ``grpc.aio`` hands the loop one call per poll).
A traced request, every other unary RPC and ``ModelStreamInfer`` run in a task each.

Limits: a message over ``max_message_bytes`` (received, inflated or sent) ends its call with
RESOURCE_EXHAUSTED; a stream's unread messages hold back its sender through HTTP/2 flow control
(``Stream.consumed``), which is what bounds ``ModelStreamInfer``'s reading
(``stream_max_inflight``).

Why one module of this size: a call's life (headers, messages in, the servicer or the short
path, trailers, reset, deadline) is one state machine over one :class:`Call`; the server class
beside it only opens calls and holds connections. What could split next is
:class:`Http2GrpcServer` (the listener) away from the calls.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import zlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, NamedTuple, NoReturn

import grpc  # type: ignore[import-untyped]  # no stubs in the venv

from gateway import tracing
from gateway.batching import clients
from gateway.credentials import Credentials
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError
from gateway.grpc import http2
from gateway.grpc.errors import status_of
from gateway.grpc.server import (
    ADMIN_METHODS,
    InferenceServicer,
    failure_metadata,
    method_handlers,
    refusal,
    stream_response,
    traced_answer,
)
from gateway.grpc.tls import server_ssl_context
from gateway.grpc.wire import (
    encode_raw_response,
    serialize_infer_response,
    serialize_stream_response,
)
from gateway.pending import Pending

__all__ = ["CallContext", "Http2GrpcServer", "grpc_timeout_s", "percent_encode"]

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/inference.GRPCInferenceService/"
OK = grpc.StatusCode.OK
_ENCODINGS = {b"identity": 0, b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}
_ACCEPT = b"identity,deflate,gzip"
_RESPONSE_HEAD = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", _ACCEPT),
]
RESPONSE_HEADERS = http2.header_block(_RESPONSE_HEAD)
OK_TRAILERS = http2.header_block([(b"grpc-status", b"0")])
TRAILERS_ONLY_OK = http2.header_block([*_RESPONSE_HEAD, (b"grpc-status", b"0")])
# request headers that are the transport's, not the call's metadata
_RESERVED = frozenset(
    {b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding"}
)
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_SMALL_BYTES = 64 * 1024  # messages below this are sent with their prefix in one piece
_COALESCE_BYTES = 4096  # request DATA payloads below this are copied into one buffer
OPENINGS = 256  # header lists whose reading is kept (Http2GrpcServer.opening)
_OPENING_BYTES = 2048  # ... when their names and values hold no more


def grpc_timeout_s(value: bytes) -> float | None:
    """A ``grpc-timeout`` header (``1..8 digits`` then a unit ``HMSmun``) in seconds, or None
    when malformed."""
    digits, unit = value[:-1], value[-1:]
    if not 1 <= len(digits) <= 8 or not digits.isdigit() or unit not in _UNITS:
        return None
    return int(digits) * _UNITS[unit]


def percent_encode(message: str) -> bytes:
    """``grpc-message``: UTF-8, with bytes outside printable ASCII and ``%`` as ``%XX``."""
    out = bytearray()
    for byte in message.encode("utf-8", "replace"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def _status_block(
    code: Any, message: str, metadata: tuple[tuple[str, str], ...], trailers_only: bool
) -> bytes:
    headers = list(_RESPONSE_HEAD) if trailers_only else []
    headers.append((b"grpc-status", str(code.value[0]).encode()))
    if message:
        headers.append((b"grpc-message", percent_encode(message)))
    for key, value in metadata:
        headers.append((key.encode(), value.encode()))
    return http2.header_block(headers)


class CallContext:
    """The part of ``grpc.aio.ServicerContext`` the servicer uses; a :class:`Call` is its own
    context. A context object of its own pointing back at its call would make every call a
    reference cycle, left to the cycle collector (``bench/results/grpc_tail.md``)."""

    __slots__ = ("_headers", "_metadata", "code", "details", "trailing_metadata")

    # the call's, read here
    deadline: float | None
    loop: asyncio.AbstractEventLoop
    finished: bool
    answered: bool
    stream: http2.Stream

    def __init__(self, headers: http2.Headers) -> None:
        self._headers = headers
        self._metadata: tuple[tuple[str, str | bytes], ...] | None = None
        self.code: Any = None
        self.details = ""
        self.trailing_metadata: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The call's metadata as ``grpc.aio`` gives it (``-bin`` values decoded to bytes)."""
        if self._metadata is None:
            items: list[tuple[str, str | bytes]] = []
            for key, value in self._headers:
                if key.startswith(b":") or key in _RESERVED:
                    continue
                name = key.decode("latin-1")
                if name.endswith("-bin"):
                    try:
                        items.append((name, base64.b64decode(value + b"==")))
                    except ValueError:
                        continue
                else:
                    items.append((name, value.decode("latin-1")))
            self._metadata = tuple(items)
        return self._metadata

    async def abort(self, code: Any, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        self.code, self.details = code, details
        self.trailing_metadata = tuple(trailing_metadata or ())
        raise grpc.aio.AbortError(details)

    def set_code(self, code: Any) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing_metadata = tuple(metadata or ())

    def time_remaining(self) -> float | None:
        deadline = self.deadline
        return None if deadline is None else max(0.0, deadline - self.loop.time())

    def cancelled(self) -> bool:
        return self.finished and not self.answered

    def done(self) -> bool:
        return self.finished

    def peer(self) -> str:
        transport = self.stream.conn.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return f"ipv4:{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unknown"


class Opening(NamedTuple):
    """What a request's header list decides about its call (kept per list: see
    :meth:`Http2GrpcServer.opening`)."""

    status: bytes  # an HTTP status to answer with instead (405, 415), or b""
    failure: tuple[Any, str] | None  # the gRPC status and message to end the call with
    method: str
    handler: Any
    encoding: int  # zlib wbits for compressed messages, 0: identity
    timeout_s: float | None  # grpc-timeout


def read_opening(headers: http2.Headers, server: Http2GrpcServer) -> Opening:
    """What ``headers`` decide: the method and its handler, compression, deadline, or the
    reason the call ends at once (in this order: an unknown encoding, not a gRPC POST, an
    unknown method, refused credentials)."""
    path = content_type = method = b""
    encoding = 0
    timeout_s: float | None = None
    unknown_encoding = b""
    for key, value in headers:
        if key == b":path":
            path = value
        elif key == b"content-type":
            content_type = value
        elif key == b":method":
            method = value
        elif key == b"grpc-timeout":
            given = grpc_timeout_s(value)
            if given is not None:  # several: the first to expire ends the call
                timeout_s = given if timeout_s is None else min(timeout_s, given)
        elif key == b"grpc-encoding":
            if value not in _ENCODINGS:
                unknown_encoding = unknown_encoding or value
            else:
                encoding = _ENCODINGS[value]
    if unknown_encoding:
        failure = (grpc.StatusCode.UNIMPLEMENTED,
                   f"unsupported grpc-encoding {unknown_encoding[:32]!r}")  # fmt: skip
        return Opening(b"", failure, "", None, 0, None)
    if method != b"POST" or not content_type.startswith(b"application/grpc"):
        return Opening(b"405" if method != b"POST" else b"415", None, "", None, 0, None)
    name = path.decode("ascii", "replace")
    call = name.removeprefix(SERVICE_PREFIX) if name.startswith(SERVICE_PREFIX) else ""
    handler = server.handlers.get(call)
    if handler is None:
        failure = (grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {name[:128]}")
        return Opening(b"", failure, call, None, 0, None)
    refused = server.refuse(call, headers)
    return Opening(b"", refused, call, handler, encoding, timeout_s)


class _Refused(Exception):
    """A call ended by the transport itself (bad message, size, encoding)."""

    def __init__(self, code: Any, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Call(CallContext):
    """One gRPC call: the :class:`http2.StreamHandler` of its stream, and its servicer's
    context."""

    __slots__ = (
        "_closed",
        "_held",
        "_inflight",
        "_parts",
        "_running",
        "_size",
        "_waiter",
        "answered",
        "carries",
        "deadline",
        "encoding",
        "finished",
        "handler",
        "loop",
        "messages",
        "method",
        "pending",
        "server",
        "started",
        "stream",
        "task",
        "timer",
    )

    def __init__(
        self, server: Http2GrpcServer, stream: http2.Stream, headers: http2.Headers
    ) -> None:
        super().__init__(headers)
        self.server = server
        self.stream = stream
        self.loop = stream.conn.loop
        # the body's bytes not yet cut into messages: views of the reads, small pieces copied
        # together (a client sending 1-byte DATA frames would otherwise make a view per byte)
        self._parts: deque[memoryview | bytearray] = deque()
        self._size = 0
        self._held = 0  # received bytes not credited back: they came while messages waited
        # ModelStreamInfer without a task: requests submitted and not yet answered and written
        self._inflight = 0
        self._running: set[Pending] | None = None  # their Pendings; None: not that path
        self._closed = False  # no more messages (END_STREAM)
        self._waiter: asyncio.Future[None] | None = None
        self.messages: deque[bytes] = deque()  # whole messages, prefix removed, inflated
        self.method = ""
        self.handler: Any = None
        self.encoding = 0  # zlib wbits for compressed messages, 0: identity
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.pending: Pending | None = None
        self.task: asyncio.Task[None] | None = None
        self.started = False  # response headers sent
        self.finished = False  # trailers sent, or the stream gone
        self.answered = False  # finished with trailers (not reset)
        # requests this call carries for the batcher's count of who may send
        # (``gateway.batching.clients``): 0 none counted, 1 a ModelInfer, None any number
        self.carries: int | None = 0

    # -- request headers --------------------------------------------------------------------

    def open(self) -> None:
        """Check the request's headers and start what can start before its messages."""
        opening = self.server.opening(self._headers)
        if opening.status:
            self.stream.send_headers(http2.header_block([(b":status", opening.status)]), end=True)
            self._finished(answered=True)
            return
        if opening.failure is not None:
            self._fail(*opening.failure)
            return
        self.method, self.handler, self.encoding = opening.method, opening.handler, opening.encoding
        if opening.timeout_s is not None:
            self.deadline = self.loop.time() + opening.timeout_s
            self.timer = self.loop.call_at(self.deadline, self._expired)
        if self.method == "ModelInfer":  # one request: its connection's count of them
            self.carries = 1
            conn = self.stream.conn
            conn.requests += 1
            if conn.requests > conn.requests_most:
                first = not conn.requests_most
                clients.carries_more(self.loop, conn.requests - conn.requests_most, first)
                conn.requests_most = conn.requests
        elif self.handler.stream_stream is not None:  # any number on one stream: unknown
            self.carries = None
            clients.opened(self.loop, carries=None)
        if self.method == "ModelStreamInfer" and not tracing.enabled:
            self._running = set()  # the short path: see _take_requests
        elif self.handler.stream_stream is not None:
            self.task = self.loop.create_task(self._run_stream())

    # -- http2.StreamHandler ----------------------------------------------------------------

    def data(self, payload: memoryview) -> None:
        if self.finished:
            return
        parts = self._parts
        n = len(payload)
        if (  # the usual case: one whole uncompressed message in one frame (one copy)
            not parts
            and n >= 5
            and payload[0] == 0
            and int.from_bytes(payload[1:5], "big") == n - 5 <= self.server.max_message_bytes
        ):
            self.messages.append(bytes(payload[5:]))
        else:
            if n >= _COALESCE_BYTES:
                parts.append(payload)
            elif parts and isinstance(parts[-1], bytearray):
                parts[-1] += payload
            else:
                parts.append(bytearray(payload))
            self._size += n
            try:
                self._cut()
            except _Refused as exc:
                self._fail(exc.code, exc.message)
                return
        unary = self.handler is not None and self.handler.stream_stream is None
        if unary and len(self.messages) > 1:  # not buffered on: tiny messages by the million
            self._fail(grpc.StatusCode.INTERNAL, "expected one request message, got more")
            return
        if self.handler is not None and self.handler.stream_stream is not None and self.messages:
            self._held += len(payload)  # credited back once the messages read are taken
        else:  # unary, or a message not whole yet: buffered here, bounded by the size limit
            self.stream.consumed(len(payload))
        if self._waiter is not None and self.messages and not self._waiter.done():
            self._waiter.set_result(None)
        if self._running is not None and self.messages:
            self._take_requests()

    def end(self) -> None:
        self._closed = True
        if self.finished:
            return
        if self._size:  # a message cut short
            self._fail(grpc.StatusCode.INTERNAL, "incomplete message at the end of the stream")
            return
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self._running is not None:
            self._stream_done_if_idle()
            return
        if self.handler is None or self.handler.stream_stream is not None:
            return
        if len(self.messages) != 1:
            self._fail(grpc.StatusCode.INTERNAL,
                       f"expected one request message, got {len(self.messages)}")  # fmt: skip
            return
        data = self.messages.popleft()
        try:
            request = self.handler.request_deserializer(data)
        except Exception:
            self._fail(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
            return
        if self.method == "ModelInfer":
            self._infer(request)
        else:
            self.task = self.loop.create_task(self._run_unary(request))

    def reset(self) -> None:
        """The client cancelled (RST_STREAM) or went away: stop the work."""
        self._finished(answered=False)
        self._cancel_running()
        if self.pending is not None:
            self.pending.cancel()
        if self.task is not None:
            self.task.cancel()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- messages ---------------------------------------------------------------------------

    def _cut(self) -> None:
        """Move every whole length-prefixed message from ``_parts`` to ``messages``."""
        limit = self.server.max_message_bytes
        while self._size >= 5:
            head = self._peek(5)
            flag, length = head[0], int.from_bytes(head[1:5], "big")
            if length > limit:
                message = f"Received message larger than max ({length} vs. {limit})"
                raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
            if self._size < 5 + length:
                return
            body = self._take(5, length)
            if flag & 1:
                body = self._inflate(body, limit)
            elif flag:
                raise _Refused(grpc.StatusCode.INTERNAL, f"message flags {flag:#x}")
            self.messages.append(body)

    def _peek(self, n: int) -> bytes:
        first = self._parts[0]
        if len(first) >= n:
            return bytes(first[:n])
        got = bytearray()
        for part in self._parts:
            got += part[: n - len(got)]
            if len(got) == n:
                break
        return bytes(got)

    def _take(self, skip: int, n: int) -> bytes:
        """The ``n`` body bytes after the next ``skip``, as one ``bytes`` (one copy)."""
        parts = self._parts
        self._size -= skip + n
        while skip:
            part = parts[0]
            if len(part) <= skip:
                parts.popleft()
                skip -= len(part)
            else:
                parts[0] = part[skip:]
                skip = 0
        if parts and len(parts[0]) >= n:  # the usual case: the message in one frame
            part = parts[0]
            if len(part) == n:
                parts.popleft()
            else:
                parts[0] = part[n:]
            return bytes(part[:n])
        taken: list[memoryview | bytearray] = []
        while n:
            part = parts[0]
            if len(part) <= n:
                taken.append(parts.popleft())
                n -= len(part)
            else:
                taken.append(part[:n])
                parts[0] = part[n:]
                n = 0
        return b"".join(taken)

    def _inflate(self, body: bytes, limit: int) -> bytes:
        if not self.encoding:
            raise _Refused(grpc.StatusCode.INTERNAL, "compressed message without grpc-encoding")
        inflater = zlib.decompressobj(self.encoding)
        try:
            data = inflater.decompress(body, limit + 1)
        except zlib.error:
            raise _Refused(grpc.StatusCode.INTERNAL, "message does not inflate") from None
        if len(data) > limit or inflater.unconsumed_tail:
            message = f"Received message larger than max (inflated, over {limit})"
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        return data

    async def next_message(self) -> bytes | None:
        """The next request message of a stream, None at its end; credits its bytes back to
        the client's window when taken."""
        while not self.messages:
            if self._closed or self.finished:
                return None
            self._waiter = self.loop.create_future()
            await self._waiter
            self._waiter = None
        data = self.messages.popleft()
        if not self.messages and self._held:
            self.stream.consumed(self._held)
            self._held = 0
        return data

    # -- answers ----------------------------------------------------------------------------

    def _check_send(self, data: bytes | memoryview) -> None:
        """Refuse a message over the size limit or over what the client leaves unread."""
        limit = self.server.max_message_bytes
        if len(data) > limit:
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"Sent message larger than max ({len(data)} vs. {limit})")  # fmt: skip
        conn = self.stream.conn
        if conn.unsent() + len(data) > conn.max_unsent_bytes:
            http2.EVENTS["unsent_limit"] += 1
            message = (f"the client is not taking its answers: over {conn.max_unsent_bytes}"
                       " bytes unsent on its connection")  # fmt: skip
            if self.stream.outbox:  # trailers would wait behind them: reset instead
                self.stream.reset(http2.ENHANCE_YOUR_CALM)
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def _send_message(self, data: bytes | memoryview) -> None:
        self._check_send(data)
        if not self.started:
            self.started = True
            self.stream.send_headers(RESPONSE_HEADERS)
        prefix = b"\0" + len(data).to_bytes(4, "big")
        if len(data) < _SMALL_BYTES:
            self.stream.send_data(prefix + data)
        else:
            self.stream.send_data(prefix)
            self.stream.send_data(data)

    def _respond(self, data: bytes | memoryview) -> None:
        """A unary call's answer and OK trailers."""
        try:
            self._check_send(data)
        except _Refused as exc:
            self._fail(exc.code, exc.message)
            return
        if self.started:  # not for a unary call; kept general
            self._send_message(data)
            self.stream.send_headers(OK_TRAILERS, end=True)
        else:
            self.started = True
            prefix = b"\0" + len(data).to_bytes(4, "big")
            self.stream.send_answer(RESPONSE_HEADERS, prefix, data, OK_TRAILERS)
        self._finished(answered=True)

    def _fail(self, code: Any, message: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        """End the call with ``code`` (trailers-only when nothing was sent yet)."""
        if self.finished:
            return
        block = _status_block(code, message, metadata, trailers_only=not self.started)
        self.stream.send_headers(block, end=True)
        self._finished(answered=True)
        self._cancel_running()
        if self.pending is not None:
            self.pending.cancel()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    def _fail_with(self, exc: BaseException) -> None:
        if isinstance(exc, GatewayError):
            self._fail(status_of(exc), exc.message, failure_metadata(exc))
        elif isinstance(exc, _Refused):
            self._fail(exc.code, exc.message)
        else:
            log.error("gRPC %s failed", self.method, exc_info=exc)
            self._fail(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    def _finished(self, answered: bool) -> None:
        if self.finished:
            return
        self.finished = True
        self.answered = answered
        if self.carries is None:
            clients.closed(self.loop, carries=None)
        elif self.carries:
            self.stream.conn.requests -= 1
        self._parts.clear()
        self.messages.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        self._fail(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    # -- running the call -------------------------------------------------------------------

    def _infer(self, request: Any) -> None:
        """``ModelInfer`` without a task: submitted now, answered from the done callback."""
        try:
            pending = self.server.servicer.submit(request, self)
        except Exception as exc:
            self._fail_with(exc)
            return
        if pending.span is not None:  # traced: the servicer's path ends its span
            self.task = self.loop.create_task(self._run_unary(request, pending))
            return
        self.pending = pending
        pending.add_done_callback(self._inferred)

    def _inferred(self, pending: Pending) -> None:
        self.pending = None
        if pending.cancelled() or self.finished:
            return
        outcome = pending.outcome()
        if isinstance(outcome, Exception):
            self._fail_with(outcome)
            return
        try:
            data = serialize_infer_response(encode_raw_response(outcome))
        except Exception as exc:
            self._fail_with(exc)
            return
        self._respond(data)

    # ModelStreamInfer without a task (no tracing): each request is submitted as it is read,
    # answered from its done callback; at most stream_max_inflight are read and not yet
    # answered and written, the rest wait in the client's window (their bytes not credited).

    def _take_requests(self) -> None:
        bound = self.server.servicer.stream_max_inflight
        deserialize = self.handler.request_deserializer
        while self.messages and self._inflight < bound and not self.finished:
            data = self.messages.popleft()
            if not self.messages and self._held:
                self.stream.consumed(self._held)
                self._held = 0
            try:
                request = deserialize(data)
            except Exception:
                self._fail(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
                return
            del data
            self._inflight += 1
            try:
                pending = self.server.servicer.submit(request, self)
            except Exception as exc:
                self._stream_answered(request, exc)
                continue
            assert self._running is not None
            self._running.add(pending)
            pending.add_done_callback(functools.partial(self._stream_pending_done, request))

    def _stream_pending_done(self, request: Any, pending: Pending) -> None:
        if self._running is not None:
            self._running.discard(pending)
        if pending.cancelled() or self.finished:
            return
        outcome = pending.outcome()
        if not isinstance(outcome, Exception):
            try:
                outcome = encode_raw_response(outcome)
            except Exception as exc:
                outcome = exc
        self._stream_answered(request, outcome)

    def _stream_answered(self, request: Any, outcome: Any) -> None:
        """Write one answer; its slot frees once it is written (at once, unless the client's
        window or the socket holds it back)."""
        if self.finished:
            return
        try:
            self._send_message(serialize_stream_response(stream_response(request, outcome)))
        except _Refused as exc:
            self._fail(exc.code, exc.message)
            return
        conn = self.stream.conn
        if self.stream.outbox or conn.paused:
            waiter = self.loop.create_future()
            self.stream.waiters.append(waiter)
            waiter.add_done_callback(self._stream_written)
            return
        self._stream_written(None)

    def _stream_written(self, _: object) -> None:
        self._inflight -= 1
        if self.finished:
            return
        if self.messages:
            self._take_requests()
        self._stream_done_if_idle()

    def _stream_done_if_idle(self) -> None:
        if self._closed and not self._inflight and not self.messages and not self.finished:
            block = OK_TRAILERS if self.started else TRAILERS_ONLY_OK
            self.stream.send_headers(block, end=True)
            self._finished(answered=True)

    def _cancel_running(self) -> None:
        running, self._running = self._running, None
        for pending in running or ():
            pending.cancel()

    async def _run_unary(self, request: Any, pending: Pending | None = None) -> None:
        context = self
        try:
            if pending is not None:
                response = await traced_answer(pending)
            else:
                response = await self.handler.unary_unary(request, context)
            if context.code is not None and context.code is not OK:
                self._fail(context.code, context.details, context.trailing_metadata)
                return
            data = self.handler.response_serializer(response)
        except grpc.aio.AbortError:
            self._fail(context.code or grpc.StatusCode.UNKNOWN, context.details,
                       context.trailing_metadata)  # fmt: skip
            return
        except asyncio.CancelledError:
            if not self.finished:
                self._fail(grpc.StatusCode.CANCELLED, "cancelled")
            raise
        except Exception as exc:
            self._fail_with(exc)
            return
        self._respond(data)

    async def _run_stream(self) -> None:
        context = self
        try:
            async for response in self.handler.stream_stream(self._requests(), context):
                if self.finished:
                    return
                self._send_message(self.handler.response_serializer(response))
                await self.stream.drain()
            if context.code is not None and context.code is not OK:
                self._fail(context.code, context.details, context.trailing_metadata)
                return
        except grpc.aio.AbortError:
            self._fail(context.code or grpc.StatusCode.UNKNOWN, context.details,
                       context.trailing_metadata)  # fmt: skip
            return
        except http2.StreamReset:
            return
        except asyncio.CancelledError:
            if not self.finished:
                self._fail(grpc.StatusCode.CANCELLED, "cancelled")
            raise
        except Exception as exc:
            self._fail_with(exc)
            return
        if not self.finished:
            self.stream.send_headers(OK_TRAILERS if self.started else TRAILERS_ONLY_OK, end=True)
            self._finished(answered=True)

    async def _requests(self) -> AsyncIterator[Any]:
        deserialize = self.handler.request_deserializer
        while (data := await self.next_message()) is not None:
            try:
                request = deserialize(data)
            except Exception:
                raise _Refused(grpc.StatusCode.INTERNAL,
                               "Exception deserializing request!") from None  # fmt: skip
            del data
            yield request
        if self.finished and not self.answered:
            raise http2.StreamReset


class Http2GrpcServer:
    """The gRPC front end's life cycle on :mod:`gateway.grpc.http2` (``grpc_transport =
    "asyncio"``), for the app's start-up and shut-down hooks; same interface as
    :class:`gateway.grpc.aio.GrpcServer`. ``start`` must run on the serving loop."""

    def __init__(
        self,
        dataplane: DataPlane,
        host: str,
        port: int,
        max_message_bytes: int,
        grace_s: float = 30.0,
    ) -> None:
        self.dataplane = dataplane
        self.host = host
        self.requested_port = port
        self.max_message_bytes = max_message_bytes
        self.grace_s = grace_s
        self.port: int | None = None
        settings = dataplane.settings
        self.credentials = Credentials(settings.api_keys, settings.admin_keys)
        self.admin_here = bool(settings.admin_api and not settings.admin_port)
        self.servicer = InferenceServicer(dataplane, settings.grpc_stream_max_inflight)
        self.handlers = method_handlers(self.servicer)
        self.connections: set[http2.Connection] = set()
        self._openings: dict[int, tuple[http2.Headers, Opening]] = {}
        self._server: asyncio.Server | None = None

    def refuse(self, method: str, headers: http2.Headers) -> tuple[Any, str] | None:
        if not self.credentials.enabled and (self.admin_here or method not in ADMIN_METHODS):
            return None
        authorization = api_key = None
        for key, value in headers:
            if key == b"authorization":
                authorization = value
            elif key == b"x-api-key":
                api_key = value
        return refusal(method, self.credentials, self.admin_here, authorization, api_key)

    def opening(self, headers: http2.Headers) -> Opening:
        """What ``headers`` decide (:func:`read_opening`), read once per header list: a
        connection's HPACK decoder hands back the same list for a header block it has seen
        (a client's calls repeat one block), so this is a lookup, not a walk of ~10 fields.
        Kept by the list's identity (the entry holds the list, so its id is not reused),
        small lists only, at most ``OPENINGS``."""
        kept = self._openings.get(id(headers))
        if kept is not None and kept[0] is headers:
            return kept[1]
        opening = read_opening(headers, self)
        if sum(len(key) + len(value) for key, value in headers) <= _OPENING_BYTES:
            if len(self._openings) >= OPENINGS:
                self._openings.clear()
            self._openings[id(headers)] = (headers, opening)
        return opening

    def _open_stream(self, stream: http2.Stream, headers: http2.Headers) -> http2.StreamHandler:
        call = Call(self, stream, headers)
        call.open()
        return call

    def _connection(self) -> http2.Connection:
        """A new connection, with the REST listener's limits where they mean the same: at most
        ``max_connections`` open (the next gets GOAWAY ENHANCE_YOUR_CALM), ``header_timeout_s``
        to say HTTP/2, ``grpc_idle_timeout_s`` with no stream and no PING."""
        settings = self.dataplane.settings
        limit = settings.max_connections
        full = bool(limit) and len(self.connections) >= limit
        conn = http2.Connection(
            self._open_stream,
            asyncio.get_running_loop(),
            on_close=self.connections.discard,
            handshake_timeout_s=settings.header_timeout_s,
            idle_timeout_s=settings.grpc_idle_timeout_s,
            send_timeout_s=settings.grpc_send_timeout_s,
            max_unsent_bytes=max(http2.MAX_UNSENT_BYTES, 2 * self.max_message_bytes),
            refuse=f"over max_connections ({limit})" if full else "",
        )
        if not full:
            self.connections.add(conn)
        return conn

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self.dataplane.settings
        context = server_ssl_context(settings)
        try:
            self._server = await loop.create_server(
                self._connection,
                self.host,
                self.requested_port,
                reuse_address=True,
                ssl=context,
                # a client that never finishes the TLS handshake is not held open (slowloris)
                ssl_handshake_timeout=settings.header_timeout_s if context else None,
            )
        except OSError as exc:
            raise OSError(f"cannot bind gRPC to {self.host}:{self.requested_port}: {exc}") from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("gRPC listening on %s:%d (asyncio transport%s)", self.host, self.port,
                 ", TLS" if context else "")  # fmt: skip

    async def stop(self) -> None:
        """Refuse new calls (GOAWAY), let running ones finish within ``grace_s``."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        connections = list(self.connections)
        for conn in connections:
            conn.shutdown()
        waiting = [conn.closed for conn in connections if not conn.closed.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=self.grace_s)
        for conn in connections:
            conn.abort()
        await server.wait_closed()
