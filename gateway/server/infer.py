"""The hot path: ``POST /v2/models/{m}[/versions/{v}]/infer`` as plain ASGI.

Every inference request pays for each layer it crosses on the one event-loop thread that also
parses HTTP for every client, and that thread's CPU per request is what caps a small model's
throughput. So this path skips starlette (its error middleware, router, ``Request`` and
``Response`` objects) and speaks ASGI messages directly. Everything else goes on to the
starlette app. The same guards apply: the admin-port and credential checks that wrap the other
routes are handed in and asked first.

It also answers for the connection layer (``answer_raw``, see ``gateway.server.connections``)
when no guards apply: there a request is handed to the data plane as it is read, and its end
writes the answer, with no task, scope or ASGI message in between. Both ways make the same one
call (``DataPlane.submit``) and give the same answers: the head is read (``_Call``), the end of
a request turned into a reply or a 499 (``_answer``) and replies built (``_reply``) in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import context, tracing
from gateway.dataplane import DataPlane
from gateway.errors import (
    ClientTimeout,
    GatewayError,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedEncoding,
)
from gateway.logs import log_inference
from gateway.pending import Pending, raw_binary_request
from gateway.protocol.codec import decode_infer_request, encode_infer_response
from gateway.protocol.types import InferRequest, InferResponse
from gateway.repository.config import ModelConfig
from gateway.server.auth import Guard
from gateway.server.connections import HOOKS, Hooks, RawExchange
from gateway.server.errors import error_response, gateway_error_response

INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")

log = logging.getLogger(__name__)
_JSON = b"application/json"
_BINARY = b"application/octet-stream"

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body


async def read_body(
    receive: Receive, declared: bytes | str | None, limit: int, timeout_s: float | None
) -> bytes:
    """The whole body, refusing (before buffering) anything above ``limit`` bytes, and giving up
    on clients that trickle it slower than ``timeout_s`` in total (None: the connection keeps
    that deadline, see ``gateway.server.connections``)."""
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise InvalidInput("invalid Content-Length header")
        if int(declared) > limit:
            raise PayloadTooLarge(
                f"request body of {int(declared)} bytes exceeds the limit of {limit}"
            )
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s) if timeout_s else contextlib.nullcontext():
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    raise InvalidInput("client disconnected before sending the whole body")
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                if not message.get("more_body", False):
                    if not chunks:
                        return chunk  # the usual case: one message, no copy
                    chunks.append(chunk)
                    return b"".join(chunks)
                chunks.append(chunk)
    except TimeoutError:
        raise ClientTimeout(f"request body not received within {timeout_s:g} s") from None


# Content-Encoding -> zlib's wbits: tritonclient's request_compression_algorithm sends gzip
# (gzip.compress) or deflate (zlib.compress, the zlib format HTTP calls deflate).
_CODINGS = {
    b"gzip": 16 + zlib.MAX_WBITS,
    b"x-gzip": 16 + zlib.MAX_WBITS,
    b"deflate": zlib.MAX_WBITS,
}


def inflate(body: bytes, coding: bytes, limit: int) -> bytes:
    """A compressed request body, decompressed; its decompressed size counts against ``limit``
    as an uncompressed body's does: a small body that inflates past it (a zip bomb) is a 413
    after ``limit`` bytes of work, never the whole expansion in memory."""
    coding = coding.strip().lower()
    if coding in (b"", b"identity"):
        return body
    wbits = _CODINGS.get(coding)
    if wbits is None:
        shown = coding[:32].decode("latin-1")
        raise UnsupportedEncoding(
            f"unsupported Content-Encoding '{shown}': send gzip, deflate or identity"
        )
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {coding.decode()} data: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed request body exceeds the limit of {limit} bytes")
    if not inflater.eof or inflater.unused_data:
        raise InvalidInput(f"request body is not one complete {coding.decode()} stream")
    return data


class DisconnectWatch:
    """Cancels a request whose client went away, so it does not keep a batch slot.

    On connections with ``Hooks`` the connection calls back when it drops. Elsewhere one extra
    task per request waits on ``receive()``, which after the body only returns when the client
    disconnects (or the response is complete, after ``close``).
    """

    __slots__ = ("_hooks", "_pending", "_watcher")

    def __init__(self, pending: Pending, receive: Receive | None, hooks: Hooks | None) -> None:
        self._pending = pending
        self._hooks = hooks
        self._watcher: asyncio.Future[Any] | None = None
        if hooks is not None:
            hooks.on_lost = pending.cancel
        else:
            assert receive is not None, "a connection without hooks hands over receive()"
            self._watcher = asyncio.ensure_future(receive())
            self._watcher.add_done_callback(self._on_message)

    def _on_message(self, done: asyncio.Future[Any]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        if done.result().get("type") == "http.disconnect":
            self._pending.cancel()

    def close(self) -> None:
        if self._hooks is not None:
            self._hooks.on_lost = None
        elif self._watcher is not None:
            self._watcher.remove_done_callback(self._on_message)
            self._watcher.cancel()


class HotPath:
    """ASGI app: inference requests handled here, the rest passed to ``fallback``."""

    def __init__(
        self, fallback: ASGIApp, dataplane: DataPlane, guards: Sequence[Guard] = ()
    ) -> None:
        self.fallback = fallback
        self.dataplane = dataplane
        self.guards = tuple(guards)
        settings = dataplane.settings
        self.limit = settings.max_body_bytes
        self.body_timeout_s = settings.body_timeout_s
        self.access_log = settings.access_log
        # The connection layer's question (``RawHandler``): guards must see every request.
        self.raw_enabled = settings.raw_infer and not self.guards

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = INFER_PATH.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            await self.fallback(scope, receive, send)
            return
        for guard in self.guards:
            refusal = guard(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        if scope["method"] != "POST":
            refusal = error_response(405, "method not allowed: inference takes POST")
            refusal.headers["Allow"] = "POST"
            await refusal(scope, receive, send)
            return
        await self.infer(scope, receive, send, match[1], match[2])

    async def infer(
        self, scope: Scope, receive: Receive, send: Send, name: str, version: str | None
    ) -> None:
        hooks: Hooks | None = scope.get(HOOKS)
        call = _Call(scope["headers"], name, version, config_of=self.dataplane.config_of)
        context.request_id.set(call.rid)
        answer: Answer | None
        try:
            # With hooks, the connection keeps the body's deadline.
            timeout_s = None if hooks is not None else self.body_timeout_s
            call.body = await read_body(receive, call.declared, self.limit, timeout_s)
            if call.coding is not None:
                call.body = inflate(call.body, call.coding, self.limit)
        except Exception as exc:
            answer = self._reply(call, exc)
        else:
            trace = None
            if tracing.enabled:
                trace = tracing.from_headers(scope["headers"], "http", len(call.body))
            pending = self.dataplane.submit(name, version, call, call.rid, call.header_value, trace)
            if not pending.done():
                watch = DisconnectWatch(pending, receive, hooks)
                try:
                    await pending.wait()  # a client gone cancels the request: logged as 499
                finally:
                    watch.close()
            answer = self._answer(call, pending)
        if answer is not None:
            status, headers, payload = answer
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})

    def raw_route(self, path: str, length: int) -> tuple[str, str | None] | None:
        """For the connection layer (``RawHandler``): an inference ``POST`` it may answer
        without ASGI, as (model, version). Not when the body is over the limit (the ASGI path
        refuses it with a 413)."""
        if length > self.limit:
            return None
        match = INFER_PATH.fullmatch(path)
        return None if match is None else (match[1], match[2])

    def answer_raw(self, exchange: RawExchange, route: tuple[str, str | None]) -> None:
        """``RawHandler.answer_raw``: the same answer as ``infer``, written in one piece, with
        no task: the request is handed to the data plane here, and its end (usually its
        batch's) writes the answer (``_raw_done``). A task per request, and the chain of
        coroutines it resumes twice, cost the event loop about as much as parsing the request;
        what must wait in a task (for a model still loading) waits in the data plane's."""
        call = _Call(
            exchange.headers, *route, exchange.take_body(), config_of=self.dataplane.config_of
        )
        trace = None
        if tracing.enabled:
            trace = tracing.from_headers(exchange.headers, "http", len(call.body))
        pending = self.dataplane.submit(
            call.name, call.version, call, call.rid, call.header_value, trace
        )
        # A caller that leaves gives up its place (``_raw_done`` unsets it, at once if done).
        exchange.hooks.on_lost = pending.cancel
        pending.add_done_callback(functools.partial(self._raw_done, exchange, call))

    def _raw_done(self, exchange: RawExchange, call: _Call, pending: Pending) -> None:
        exchange.hooks.on_lost = None
        try:
            answer = self._answer(call, pending)
            if answer is not None:
                exchange.respond(*answer)
        except Exception:  # a bug: close the connection rather than leave it hanging
            log.exception("inference request failed on the raw path", extra=call.log_fields)
            exchange.abort()

    def _answer(self, call: _Call, pending: Pending) -> Answer | None:
        """(status, headers, body) for a request that is done; None, logged as 499 (nginx's
        code), when the client went away: nobody is listening."""
        if pending.cancelled():
            self._log(call, 499)
            if pending.span is not None:
                pending.answered(499)
            return None
        answer = self._reply(call, pending.outcome(), pending.request, pending.execution)
        if pending.span is not None:
            pending.answered(answer[0], len(answer[2]))
        return answer

    def _reply(
        self,
        call: _Call,
        result: InferResponse | Exception,
        request: InferRequest | None = None,
        run: context.Execution | None = None,
    ) -> Answer:
        """(status, headers, body) for a response or an error, and its access-log line."""
        exc: Exception | None = None
        if isinstance(result, Exception):
            exc = result
        else:
            assert request is not None
            try:
                payload, json_length = encode_infer_response(
                    result, request.outputs, request.binary_output
                )
            except Exception as error:
                exc = error
        answer: Answer
        if exc is not None:
            if isinstance(exc, GatewayError):
                refusal = gateway_error_response(exc)
            else:
                log.exception("inference request failed", exc_info=exc, extra=call.log_fields)
                refusal = error_response(500, f"internal error: {type(exc).__name__}")
            refusal.headers["X-Request-ID"] = call.rid
            answer = (refusal.status_code, refusal.raw_headers, bytes(refusal.body))
        else:
            headers = [
                (b"content-type", _JSON if json_length is None else _BINARY),
                (b"content-length", b"%d" % len(payload)),
                (b"x-request-id", call.rid.encode("latin-1")),
            ]
            if json_length is not None:
                headers.append((b"inference-header-content-length", b"%d" % json_length))
            answer = (200, headers, payload)
        if self.access_log:
            log_inference(call.name, call.version, answer[0], call.started_ns, call.rid, run)
        return answer

    def _log(self, call: _Call, status: int, run: context.Execution | None = None) -> None:
        if self.access_log:
            log_inference(call.name, call.version, status, call.started_ns, call.rid, run)


class _Call:
    """One inference request: the model asked for, what its head says (read once), when it
    arrived, and its body. Called, it decodes the body: the decoder ``DataPlane.submit`` calls
    once the model is known."""

    __slots__ = (
        "body",
        "coding",
        "config_of",
        "declared",
        "header",
        "headers",
        "name",
        "rid",
        "started_ns",
        "version",
    )

    def __init__(
        self,
        request_headers: Sequence[tuple[bytes, bytes]],
        name: str,
        version: str | None,
        body: bytes = b"",
        config_of: Callable[[str, str | None], ModelConfig] | None = None,
    ) -> None:
        self.started_ns = time.perf_counter_ns()
        self.config_of = config_of  # the model's config, for the raw binary request
        self.name = name
        self.version = version
        self.body = body  # the ASGI path sets it once read
        self.headers = request_headers  # kept for ``header_value`` (a split's sticky header)
        declared = header = rid = coding = None
        for key, value in request_headers:
            if key == b"content-length":
                declared = value
            elif key == b"content-encoding":
                coding = value
            elif key == b"inference-header-content-length":
                header = value
            elif key == b"x-request-id" and rid is None:
                rid = context.client_request_id(value)
        self.declared: bytes | None = declared
        self.header: bytes | None = header
        self.rid: str = rid or context.new_request_id()
        self.coding: bytes | None = coding  # Content-Encoding (the raw path never has one)

    def header_value(self, name: str) -> str | None:
        """The request header ``name`` (lower case), for the data plane."""
        wanted = name.encode("latin-1")
        for key, value in self.headers:
            if key == wanted:
                return value.decode("latin-1")
        return None

    @property
    def log_fields(self) -> dict[str, Any]:
        """``extra`` for a log line about this request: callbacks run outside its context."""
        return {"fields": {"request_id": self.rid}}

    def __call__(self) -> InferRequest:
        """The request in the body, binary if the head says so."""
        header_length: int | None = None
        if self.header is not None:
            try:
                header_length = int(self.header)
            except ValueError:
                text = self.header[:32].decode("latin-1")
                raise InvalidInput(f"invalid Inference-Header-Content-Length {text!r}") from None
        if header_length == 0 and self.config_of is not None:  # Triton's raw binary request
            return raw_binary_request(self.config_of(self.name, self.version), self.body)
        return decode_infer_request(self.body, header_length)
