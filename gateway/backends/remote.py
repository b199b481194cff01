"""``V2Host``: another gateway node, or any Open Inference Protocol (v2) REST server, as a
``gateway.backends.base.Host``.

Batches and probes go over ``gateway.backends.http1``'s keep-alive connections (the hot path:
the head built once per model version), model loads over ``aiohttp``; tensors travel in the
binary-tensor extension both ways (the bytes are ``gateway.protocol.client``'s; answers are
read as sent, never decompressed, and refused past ``max_response_bytes``); the caller's
remaining deadline travels as Triton's ``timeout`` parameter (microseconds) and the ids of the
batched requests as ``X-Request-ID``. Failures are mapped at this edge (as httpx maps
httpcore's): refused / reset / timed-out connections become ``HostUnreachable`` (safe to retry
elsewhere), 503 ``Unavailable``, 429 ``Overloaded``, 404 ``ModelNotReady`` (not there), 504
``DeadlineExceeded``, other 4xx ``InvalidInput``. A response that is not valid HTTP or not a
decodable v2 answer is ``Unavailable`` (503): it counts against the host, and the router may
retry elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from gateway import context, tracing
from gateway.backends.base import Host, Tensors, check_dispatch, timed_out
from gateway.backends.http1 import BadAnswer, Http1Pool
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    HostUnreachable,
    InvalidInput,
    ModelLoadError,
    ModelNotReady,
    Overloaded,
    Unavailable,
)
from gateway.protocol.client import (
    HEADER_LENGTH,
    decode_response,
    encode_request,
    error_message,
    malformed,
)
from gateway.repository.config import ModelConfig
from gateway.repository.local import ModelSource
from gateway.routing.tiers import HostModel, parse_index

__all__ = ["MAX_RESPONSE_BYTES", "V2Host"]

log = logging.getLogger(__name__)

# What one answer of a host may hold, read or not: a batch's outputs are rarely over a few
# MiB, and a host that sends more (or an endless chunked body) fails the request instead of
# filling this process's memory.
MAX_RESPONSE_BYTES = 1 << 30
_CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError)
# Anything else aiohttp raises: a response that is not HTTP (bad status line, bad headers).
_CLIENT_ERRORS = (*_CONNECTION_ERRORS, aiohttp.ClientError)


_HEADER_LENGTH_FIELD = HEADER_LENGTH.encode()
_IDENTITY = (("Accept-Encoding", "identity"),)  # answers as sent: nothing to inflate
_HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()


def _field(name: str, value: str) -> bytes:
    """One header line; a value that could end the line early (CR, LF, NUL) or is not latin-1
    is sent with those characters replaced, never spliced into the head."""
    if not value.isprintable() or not value.isascii():
        value = "".join(c if c.isprintable() and c.isascii() else "?" for c in value)
    return f"{name}: {value}\r\n".encode("latin-1")


class V2Host(Host):
    """One v2 REST server. ``push``: ``prepare`` loads a model missing there through the
    repository API with its files (``parameters["file:<v>/model.onnx"]``, base64), as a
    gateway worker accepts; otherwise the model must already be ready there."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        labels: frozenset[str] = frozenset(),
        push: bool = False,
        conn_limit: int = 64,
        timeout_s: float = 30.0,
        probe_timeout_s: float = 1.0,
        load_timeout_s: float = 120.0,
        keepalive_s: float = 4.0,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self._name = name
        self.url = (url if "://" in url else f"http://{url}").rstrip("/")
        self._labels = labels
        self.push = push
        self.conn_limit = conn_limit
        self.timeout_s = timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.load_timeout_s = load_timeout_s
        self.keepalive_s = keepalive_s  # below the server's keep-alive, so it never closes first
        self.max_response_bytes = max_response_bytes
        self._session: aiohttp.ClientSession | None = None  # loads and unloads
        self._forward: Http1Pool | None = None  # batches and probes (``http1``)
        self._heads: dict[tuple[str, int], bytes] = {}
        self._index_head: bytes | None = None
        self._pushed: set[str] = set()
        # "model/version" -> bytes the last ``prepare`` pushed there (0: it was ready already)
        self._pushed_bytes: dict[str, int] = {}
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def labels(self) -> frozenset[str]:
        return self._labels

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.conn_limit, keepalive_timeout=self.keepalive_s
            )
            # Bodies as sent: a compressed one would grow past what ``_read`` measured (and
            # aiohttp would otherwise ask for gzip, which costs CPU on both sides of a fast link).
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,
                headers={"Accept-Encoding": "identity"},
            )
        return self._session

    def _lost(self, exc: BaseException) -> Unavailable:
        # The client sees the host's name and the kind of failure; the text (which names the
        # host's address) goes to the log only.
        log.warning("host %s: %s: %s", self._name, type(exc).__name__, exc)
        if isinstance(exc, (TimeoutError, *_CONNECTION_ERRORS)):
            return HostUnreachable(
                f"host {self._name} unreachable: {type(exc).__name__}", retry_after_s=1.0
            )
        return self._malformed(type(exc).__name__)

    def _malformed(self, detail: str) -> Unavailable:
        return malformed(self._name, detail)

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        """The body, refused (``Unavailable``) once it is over ``max_response_bytes``: from its
        ``Content-Length`` before reading, or as a chunked body grows."""
        limit = self.max_response_bytes
        declared = response.content_length
        if declared is not None:
            if declared > limit:
                raise self._malformed(f"a {declared}-byte body is over the {limit}-byte limit")
            return await response.read()
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise self._malformed(f"the body is over the {limit}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    def _pool(self) -> Http1Pool:
        if self._forward is None:
            self._forward = Http1Pool(
                self.url,
                limit=self.conn_limit,
                keepalive_s=self.keepalive_s,
                max_body_bytes=self.max_response_bytes,
                wanted=(HEADER_LENGTH, "Retry-After"),
            )
        return self._forward

    def _infer_head(self, model: str, version: int) -> bytes:
        """The request head up to its per-batch fields, built once per model version."""
        key = (model, version)
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) >= 1024:  # models come and go: a bound, not a cache policy
                self._heads.clear()
            head = self._heads[key] = self._pool().request_head(
                "POST",
                f"/v2/models/{quote(model, safe='')}/versions/{version}/infer",
                (("Content-Type", "application/octet-stream"), *_IDENTITY),
            )
        return head

    async def infer(
        self,
        model: str,
        version: int,
        inputs: Tensors,
        outputs: Sequence[str],
        timeout_s: float | None = None,
    ) -> Tensors:
        check_dispatch(f"host {self._name}", self._closed, timeout_s)
        body, head_length = encode_request(inputs, outputs, timeout_s)
        fields = [b"%s: %d\r\n" % (_HEADER_LENGTH_FIELD, head_length)]
        ids = context.upstream_request_id()
        if ids:
            fields.append(_field("X-Request-ID", ids))
        if tracing.enabled:
            fields += [_field(k, v) for k, v in tracing.inject({}).items()]
        limit_s = timeout_s if timeout_s is not None else self.timeout_s
        try:
            answer = await self._pool().request(
                self._infer_head(model, version), b"".join(fields), body, limit_s
            )
        except TimeoutError:
            raise timed_out(f"host {self._name}", timeout_s, self.timeout_s, 1.0) from None
        except BadAnswer as exc:
            raise self._malformed(str(exc)) from None
        except OSError as exc:
            raise self._lost(exc) from None
        headers = answer.headers
        if answer.status == 200:
            length = headers.get(_HEADER_LENGTH_KEY)
            return decode_response(
                answer.body, None if length is None else length.decode("latin-1"), self._name
            )
        retry_after = headers.get(b"retry-after")
        raise self._error(
            answer.status,
            answer.body,
            None if retry_after is None else retry_after.decode("latin-1"),
        )

    def _error(self, status: int, payload: bytes, retry_after: str | None) -> GatewayError:
        text = f"host {self._name}: {error_message(payload)}"
        retry_s = float(retry_after) if retry_after and retry_after.isdigit() else 1.0
        if status == 429:
            return Overloaded(text, retry_after_s=retry_s)
        if status == 503:
            return Unavailable(text, retry_after_s=retry_s)
        if status == 404:
            return ModelNotReady(text, retry_after_s=retry_s)
        if status == 504:
            return DeadlineExceeded(text)
        if 400 <= status < 500:
            return InvalidInput(text)
        return GatewayError(f"{text} (HTTP {status})")

    async def _get_ok(self, path: str, timeout_s: float | None = None) -> bool:
        """Whether ``GET path`` answers 200 (probes, readiness checks: the batches' pool)."""
        pool = self._pool()
        head = pool.request_head("GET", path, _IDENTITY)
        try:
            answer = await pool.request(
                head, b"", None, timeout_s or self.probe_timeout_s, wait=False
            )
        except (TimeoutError, BadAnswer, OSError):
            return False
        return answer.status == 200

    async def ready(self) -> bool:
        return await self._get_ok("/v2/health/ready")

    async def model_ready(self, model: str, version: int) -> bool:
        return await self._get_ok(f"/v2/models/{quote(model, safe='')}/versions/{version}/ready")

    def pushed_bytes(self, key: str) -> int | None:
        return self._pushed_bytes.get(key)

    async def repository_index(self) -> dict[str, HostModel] | None:
        """Where each model is on this host (``gateway.routing.tiers.parse_index`` of its
        ``POST /v2/repository/index``); None when it does not answer one. Never raises."""
        pool = self._pool()
        head = self._index_head
        if head is None:
            head = self._index_head = pool.request_head(
                "POST",
                "/v2/repository/index",
                (("Content-Type", "application/json"), ("Accept-Encoding", "identity")),
            )
        try:
            answer = await pool.request(head, b"", b"{}", self.probe_timeout_s, wait=False)
            if answer.status != 200:
                return None
            return parse_index(orjson.loads(answer.body))
        except (TimeoutError, BadAnswer, OSError, orjson.JSONDecodeError):
            return None

    async def prepare(self, source: ModelSource, version: int, config: ModelConfig) -> None:
        key = f"{source.name}/{version}"
        self._pushed_bytes[key] = 0
        # A load checks every host at once: the check may wait for one of the probe session's
        # connections (bounded), so it gets a request's time, not a probe's.
        path = f"/v2/models/{quote(source.name, safe='')}/versions/{version}/ready"
        if await self._get_ok(path, self.timeout_s):
            return
        if not self.push:
            if not await self.ready():
                raise HostUnreachable(f"host {self._name} is not ready")
            raise ModelNotReady(
                f"model '{source.name}' version {version} is not ready on host {self._name}"
            )
        files = await asyncio.to_thread(
            lambda: {
                f"file:{v}/model.onnx": base64.b64encode(p.read_bytes()).decode()
                for v, p in source.version_paths.items()
            }
        )
        body = {"parameters": {"config": json.dumps(config.to_dict()), **files}}
        size = sum(len(v) * 3 // 4 for v in files.values())  # the files' bytes, about
        url = f"{self.url}/v2/repository/models/{source.name}/load"
        try:
            async with asyncio.timeout(self.load_timeout_s):
                async with self._http().post(url, json=body) as response:
                    payload = await self._read(response)
                    status = response.status
        except (TimeoutError, *_CLIENT_ERRORS) as exc:
            raise self._lost(exc) from None
        if status != 200:
            raise ModelLoadError(
                f"host {self._name}: loading '{source.name}': {error_message(payload)}"
            )
        self._pushed.add(source.name)
        self._pushed_bytes[key] = size

    async def release(self, model: str) -> None:
        if model not in self._pushed or self._closed:
            return
        self._pushed.discard(model)
        url = f"{self.url}/v2/repository/models/{model}/unload"
        try:
            async with asyncio.timeout(self.probe_timeout_s + 5.0):
                async with self._http().post(url, json={}) as response:
                    await self._read(response)
        except (TimeoutError, Unavailable, *_CLIENT_ERRORS):
            pass

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._forward is not None:
            await self._forward.close()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self._name,
            "kind": self.kind,
            "url": self.url,
            "labels": sorted(self._labels),
            "push": self.push,
        }
