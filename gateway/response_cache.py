"""The response cache: Triton's ``response_cache { enable: true }`` at the front door.

A model whose config enables it has each request's answer kept under a key made of the model,
its version, every input's name, datatype, shape and exact bytes, and the outputs asked for. A
request with the same key is answered from the cache at once: it never enters a queue or a
batch. Only successful answers are kept.

Two stores, one chosen by the settings (as Triton takes one cache implementation):

- :class:`LocalStore`: in this process, LRU, bounded by bytes (``response_cache_bytes``).
- :class:`RedisStore`: shared by every replica through Redis (``response_cache_redis_url``),
  as Triton's redis cache is. Every Redis call has a short timeout; a Redis that is down or slow
  is a miss (and the answer is not stored), never an error, and after a failure Redis is left
  alone for a moment so a dead server does not cost a timeout per request.

Statistics are Triton's: a hit counts the lookup time in ``cache_hit``, a miss the lookup plus
the insertion in ``cache_miss``; both count as successful requests, only misses as executions.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gateway import context
from gateway.backends.base import Tensors
from gateway.protocol.tensors import join_bytes, split_bytes
from gateway.protocol.types import InferRequest, InferResponse, datatype_of, numpy_dtype
from gateway.shared_memory import write_outputs

if TYPE_CHECKING:
    from gateway.lifecycle import LoadedVersion
    from gateway.pending import Pending
    from gateway.settings import Settings

log = logging.getLogger(__name__)

_ENTRY_OVERHEAD_BYTES = 64  # per entry, besides its tensors: key, bookkeeping
_HEADER = struct.Struct("<I")


def request_key(model: str, version: int, request: InferRequest) -> bytes:
    """The cache key: model, version, each input (name, datatype, shape, bytes, in name order)
    and the outputs asked for, in the order asked (the answer lists them so)."""
    digest = hashlib.blake2b(digest_size=32)
    digest.update(orjson.dumps([model, version]))
    for name in sorted(request.inputs):
        array = request.inputs[name]
        digest.update(orjson.dumps([name, datatype_of(array), list(array.shape)]))
        if array.dtype == np.object_:
            digest.update(join_bytes(array))
        else:
            digest.update(np.ascontiguousarray(array).data)
    asked = [o.name for o in request.outputs] if request.outputs else None
    digest.update(orjson.dumps(asked))
    return digest.digest()


def size_of(outputs: Tensors) -> int:
    """Bytes an entry takes (BYTES elements counted by their length)."""
    total = _ENTRY_OVERHEAD_BYTES
    for array in outputs.values():
        if array.dtype == np.object_:
            total += sum(len(x) if isinstance(x, bytes | str) else 8 for x in array.reshape(-1))
            total += 8 * array.size
        else:
            total += array.nbytes
    return total


def _frozen(outputs: Tensors) -> Tensors:
    """Copies of the answer's tensors that nobody can change (hits share them), and that do
    not keep the whole batch's output alive."""
    kept: Tensors = {}
    for name, array in outputs.items():
        copy = np.array(array, copy=True, order="C")
        copy.flags.writeable = False
        kept[name] = copy
    return kept


def encode_entry(outputs: Tensors) -> bytes:
    """An answer as bytes for Redis: a JSON header (name, datatype, shape, length per tensor),
    then the raw data. No pickle: a shared cache must not run what it reads."""
    header: list[list[Any]] = []
    blobs: list[bytes] = []
    for name, array in outputs.items():
        datatype = datatype_of(array)
        data = join_bytes(array) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes()
        header.append([name, datatype, list(array.shape), len(data)])
        blobs.append(data)
    head = orjson.dumps(header)
    return _HEADER.pack(len(head)) + head + b"".join(blobs)


def decode_entry(data: bytes) -> Tensors:
    """``encode_entry``'s inverse; ``ValueError`` for anything malformed."""
    try:
        (head_len,) = _HEADER.unpack_from(data, 0)
        header = orjson.loads(data[4 : 4 + head_len])
        offset = 4 + head_len
        outputs: Tensors = {}
        for name, datatype, shape, length in header:
            chunk = data[offset : offset + length]
            if len(chunk) != length:
                raise ValueError("truncated entry")
            offset += length
            shape_t = tuple(int(d) for d in shape)
            if datatype == "BYTES":
                array = split_bytes(chunk, int(np.prod(shape_t, dtype=np.int64)), str(name))
                array = array.reshape(shape_t)
            else:
                array = np.frombuffer(chunk, dtype=numpy_dtype(datatype)).reshape(shape_t)
            array.flags.writeable = False
            outputs[str(name)] = array
    except Exception as exc:
        raise ValueError(f"malformed cache entry: {exc}") from None
    if offset != len(data):
        raise ValueError("malformed cache entry: trailing bytes")
    return outputs


class LocalStore:
    """In-process LRU of answers, bounded by bytes (an entry larger than the bound is not kept,
    as in Triton's local cache)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[bytes, tuple[Tensors, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Tensors | None:
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0]

    def put(self, key: bytes, outputs: Tensors) -> bool:
        size = size_of(outputs)
        if size > self.capacity_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.used_bytes -= old[1]
        while self.used_bytes + size > self.capacity_bytes and self._entries:
            _, (_, freed) = self._entries.popitem(last=False)
            self.used_bytes -= freed
            self.evictions += 1
        self._entries[key] = (_frozen(outputs), size)
        self.used_bytes += size
        return True


class RedisStore:
    """Answers in Redis, shared by replicas; every call bounded by ``timeout_s``, failures
    counted and turned into misses."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        ttl_s: float = 0.0,
        prefix: str = "gateway:response:",
        max_entry_bytes: int = 16 * 1024 * 1024,
        pause_s: float = 1.0,
    ) -> None:
        import redis.asyncio as aioredis  # only this module talks to Redis

        self.url = url
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.prefix = prefix.encode()
        self.max_entry_bytes = max_entry_bytes
        self.pause_s = pause_s  # after a failure, Redis is not asked for this long
        self.errors: dict[str, int] = {"get": 0, "put": 0}
        self._paused_until = 0.0
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._puts: set[asyncio.Task[None]] = set()

    def available(self) -> bool:
        return time.monotonic() >= self._paused_until

    def _failed(self, op: str, exc: BaseException) -> None:
        self.errors[op] += 1
        if self.available():
            log.warning("response cache: redis %s failed (%s); treated as a miss", op, exc)
        self._paused_until = time.monotonic() + self.pause_s

    async def get(self, key: bytes) -> Tensors | None:
        if not self.available():
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                data = await self._client.get(self.prefix + key)
        except Exception as exc:  # down, slow, refused: a miss
            self._failed("get", exc)
            return None
        if not isinstance(data, bytes):  # absent (the client is built without decoding)
            return None
        try:
            return decode_entry(data)
        except ValueError as exc:
            self._failed("get", exc)
            return None

    def put_soon(self, key: bytes, outputs: Tensors) -> bool:
        """Store in the background (the answer is not held back); False if not attempted."""
        if not self.available() or len(self._puts) >= 256:
            return False
        data = encode_entry(outputs)
        if len(data) > self.max_entry_bytes:
            return False
        task = asyncio.ensure_future(self._put(key, data))
        self._puts.add(task)
        task.add_done_callback(self._puts.discard)
        return True

    async def _put(self, key: bytes, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                if self.ttl_s > 0:
                    await self._client.set(self.prefix + key, data, px=int(self.ttl_s * 1000))
                else:
                    await self._client.set(self.prefix + key, data)
        except Exception as exc:
            self._failed("put", exc)

    async def close(self) -> None:
        for task in list(self._puts):
            task.cancel()
        try:
            await self._client.aclose()
        except Exception:  # closing a client whose server is gone
            log.debug("response cache: closing the redis client failed", exc_info=True)


class ResponseCache:
    """The data plane's side of the cache: looks a request up, answers a hit, stores a miss's
    answer when its batch ends. Exactly one store."""

    def __init__(self, store: LocalStore | RedisStore) -> None:
        self.store = store
        self.lookups = 0
        self.hits = 0
        self.misses = 0

    def serve(self, pending: Pending, lv: LoadedVersion, run: Callable[[], None]) -> None:
        """Answer ``pending`` from the cache, or ``run()`` it (queue it) and keep its answer.

        The local store answers in place; Redis is asked in a task of the request's own."""
        request = pending.request
        assert request is not None
        started_ns = time.perf_counter_ns()
        key = request_key(pending.name, lv.version, request)
        store = self.store
        if isinstance(store, LocalStore):
            self._answer(pending, lv, key, store.get(key), started_ns, run)
        else:
            pending.start_task(self._ask_redis(store, pending, lv, key, started_ns, run))

    async def _ask_redis(
        self,
        store: RedisStore,
        pending: Pending,
        lv: LoadedVersion,
        key: bytes,
        started_ns: int,
        run: Callable[[], None],
    ) -> None:
        found = await store.get(key)
        if pending.done():  # cancelled while Redis was asked
            return
        try:
            self._answer(pending, lv, key, found, started_ns, run)
        except Exception as exc:
            pending.settle(error=exc)

    def _answer(
        self,
        pending: Pending,
        lv: LoadedVersion,
        key: bytes,
        found: Tensors | None,
        started_ns: int,
        run: Callable[[], None],
    ) -> None:
        self.lookups += 1
        lookup_ns = time.perf_counter_ns() - started_ns
        request = pending.request
        assert request is not None
        if found is not None:
            self.hits += 1
            lv.stats.cache_hit.add(lookup_ns)
            lv.stats.record_request(True, lookup_ns)
            rows = next(iter(found.values())).shape[:1] if lv.config.batched and found else ()
            response = InferResponse(
                model_name=pending.name,
                model_version=str(lv.version),
                outputs=dict(found),
                id=request.id,
            )
            batch = int(rows[0]) if rows else 1
            if request.shared_targets:
                write_outputs(request, response)  # into the client's shared memory
            pending.settle(response, execution=context.Execution(batch, 0, 0, "cache"))
            return
        run()  # a request its model refuses (raises here) is no miss: it was never servable
        self.misses += 1
        lv.stats.cache_miss.add(lookup_ns)
        pending.add_done_callback(lambda done: self._keep(done, lv, key))

    def _keep(self, pending: Pending, lv: LoadedVersion, key: bytes) -> None:
        """A miss's end: store a successful answer; the time counts as the miss's."""
        response = pending.response
        if pending.cancelled() or pending.error is not None or response is None:
            return
        started_ns = time.perf_counter_ns()
        try:
            if isinstance(self.store, LocalStore):
                self.store.put(key, response.outputs)
            else:
                self.store.put_soon(key, response.outputs)
        except Exception:  # never the request's failure
            log.exception("response cache: storing an answer failed")
        lv.stats.cache_miss.add(time.perf_counter_ns() - started_ns, count=0)

    async def close(self) -> None:
        if isinstance(self.store, RedisStore):
            await self.store.close()

    def metric_families(self) -> Iterator[Any]:
        """The cache's own families (Triton's local cache reports entries, lookups, hits,
        misses, evictions, utilisation)."""
        entries = GaugeMetricFamily("nv_cache_num_entries", "Responses in the cache")
        lookups = CounterMetricFamily("nv_cache_num_lookups", "Response cache lookups")
        hits = CounterMetricFamily("nv_cache_num_hits", "Response cache hits")
        misses = CounterMetricFamily("nv_cache_num_misses", "Response cache misses")
        lookups.add_metric([], self.lookups)
        hits.add_metric([], self.hits)
        misses.add_metric([], self.misses)
        store = self.store
        if isinstance(store, LocalStore):
            entries.add_metric([], len(store))
            evictions = CounterMetricFamily("nv_cache_num_evictions", "Responses evicted (LRU)")
            evictions.add_metric([], store.evictions)
            util = GaugeMetricFamily("nv_cache_util", "Share of the cache's bytes in use (0..1)")
            util.add_metric([], store.used_bytes / store.capacity_bytes)
            yield from (entries, lookups, hits, misses, evictions, util)
            return
        errors = CounterMetricFamily(
            "gateway_response_cache_errors",
            "Redis calls that failed or timed out (each a miss, never an error)",
            labels=["op"],
        )
        for op, n in sorted(store.errors.items()):
            errors.add_metric([op], n)
        yield from (lookups, hits, misses, errors)


def build_cache(settings: Settings) -> ResponseCache | None:
    """The cache the settings ask for: Redis when a URL is set, else the local store when it
    has bytes, else none (a model's ``response_cache`` is then ignored, as in Triton)."""
    if settings.response_cache_redis_url:
        return ResponseCache(
            RedisStore(
                settings.response_cache_redis_url,
                settings.response_cache_redis_timeout_s,
                settings.response_cache_redis_ttl_s,
                settings.response_cache_redis_prefix,
            )
        )
    if settings.response_cache_bytes > 0:
        return ResponseCache(LocalStore(settings.response_cache_bytes))
    return None


__all__ = [
    "LocalStore",
    "RedisStore",
    "ResponseCache",
    "build_cache",
    "decode_entry",
    "encode_entry",
    "request_key",
]
