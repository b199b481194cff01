"""The response cache (``response_cache { enable: true }``): keys, the byte-bounded LRU, hits
that skip the queue, Triton's statistics and metrics; the shared cache in a real
``redis-server`` (two data planes as two replicas), and a Redis that is down being a miss."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from gateway.backends.onnxruntime import OnnxRuntimeFactory
from gateway.dataplane import DataPlane
from gateway.protocol.types import InferRequest, RequestedOutput
from gateway.repository.local import LocalRepository
from gateway.response_cache import (
    LocalStore,
    RedisStore,
    ResponseCache,
    build_cache,
    decode_entry,
    encode_entry,
    request_key,
    size_of,
)
from gateway.settings import Settings
from gateway.testing.redis_server import RedisServer, redis_server_binary
from tests import models
from tests.helpers import free_port, get, start_gateway, triton_infer

CACHED = models.SIMPLE_CONFIG.replace('"simple"', '"cached"') + "response_cache { enable: true }\n"


def _request(seed: int = 0, outputs: list[str] | None = None) -> InferRequest:
    rng = np.random.default_rng(seed)
    return InferRequest(
        inputs={
            "INPUT0": rng.integers(0, 100, (1, 16), dtype=np.int32),
            "INPUT1": rng.integers(0, 100, (1, 16), dtype=np.int32),
        },
        outputs=[RequestedOutput(n) for n in outputs] if outputs else None,
    )


@pytest.fixture(scope="module")
def cache_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache_repo")
    models.add_sub(root, "cached", config=CACHED)
    models.add_sub(root, "plain", config=models.SIMPLE_CONFIG.replace('"simple"', '"plain"'))
    return root


async def _dataplane(repo: Path, **settings: object) -> DataPlane:
    config = Settings(model_repo=str(repo), warmup=False, **settings)  # type: ignore[arg-type]
    dataplane = DataPlane(config, LocalRepository(repo), OnnxRuntimeFactory(config))
    await dataplane.start()
    return dataplane


def _stats(dataplane: DataPlane, name: str) -> dict[str, object]:
    stats: dict[str, object] = dataplane.model_stats(name)["model_stats"][0]
    return stats


# -- keys and stores -------------------------------------------------------------------------


def test_key_covers_model_version_inputs_and_outputs() -> None:
    base = _request()
    key = request_key("m", 1, base)
    assert key == request_key("m", 1, _request())  # same bytes: same key
    assert key != request_key("m", 2, base)
    assert key != request_key("n", 1, base)
    assert key != request_key("m", 1, _request(seed=1))
    assert key != request_key("m", 1, _request(outputs=["OUTPUT0"]))
    reshaped = InferRequest(inputs={k: v.reshape(2, 8) for k, v in base.inputs.items()})
    assert key != request_key("m", 1, reshaped)  # same bytes, other shape
    retyped = InferRequest(inputs={k: v.view(np.float32) for k, v in base.inputs.items()})
    assert key != request_key("m", 1, retyped)  # same bytes, other datatype
    text = np.array([b"ab", b"c"], dtype=object)
    assert request_key("m", 1, InferRequest({"T": text})) != request_key(
        "m", 1, InferRequest({"T": np.array([b"a", b"bc"], dtype=object)})
    )


def test_local_store_is_lru_within_its_bytes() -> None:
    entry = {"Y": np.zeros(100, dtype=np.float32)}  # 400 bytes + overhead
    store = LocalStore(capacity_bytes=1200)
    for key in (b"a", b"b"):
        assert store.put(key, entry)
    assert store.get(b"a") is not None  # a is now the most recent
    assert store.put(b"c", entry)  # b goes
    assert store.get(b"b") is None and store.get(b"a") is not None
    assert store.evictions == 1 and store.used_bytes <= 1200 and len(store) == 2
    assert not store.put(b"huge", {"Y": np.zeros(1000, dtype=np.float32)})  # over the bound
    kept = store.get(b"a")
    assert kept is not None and not kept["Y"].flags.writeable  # hits share it: read-only


def test_redis_entry_round_trip_and_malformed() -> None:
    outputs = {
        "F": np.arange(6, dtype=np.float32).reshape(2, 3),
        "T": np.array([[b"x", b""], [b"yz", b"\x00"]], dtype=object),
        "B": np.array([True, False]),
    }
    back = decode_entry(encode_entry(outputs))
    for name, array in outputs.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape
        assert (back[name] == array).all()
    data = encode_entry(outputs)
    for broken in (data[:-1], data + b"x", b"\xff\xff\xff\x00", b""):
        with pytest.raises(ValueError):
            decode_entry(broken)


# -- the data plane with the local cache -----------------------------------------------------


async def test_hit_skips_the_queue_and_counts_as_triton_does(cache_repo: Path) -> None:
    dataplane = await _dataplane(cache_repo, response_cache_bytes=1 << 20)
    try:
        request = _request()
        first = await dataplane.infer("cached", None, request)
        pending = dataplane.submit("cached", None, _request())
        assert pending.done()  # answered in place: no queue, no batch, no task
        second = pending.result()
        for name in ("OUTPUT0", "OUTPUT1"):
            assert (first.outputs[name] == second.outputs[name]).all()
        assert pending.execution is not None and pending.execution.host == "cache"
        other = await dataplane.infer("cached", None, _request(outputs=["OUTPUT1"]))
        assert list(other.outputs) == ["OUTPUT1"]  # asked outputs are part of the key
        stats = _stats(dataplane, "cached")
        inference = stats["inference_stats"]
        assert isinstance(inference, dict)
        assert inference["cache_hit"]["count"] == 1
        assert inference["cache_miss"]["count"] == 2
        assert inference["cache_miss"]["ns"] > 0
        assert inference["success"]["count"] == 3  # hits are successes
        assert stats["execution_count"] == 2  # but not executions
        text = dataplane.metrics.render().decode()
        assert 'nv_cache_num_hits_per_model_total{model="cached",version="1"} 1.0' in text
        assert 'nv_cache_num_misses_per_model_total{model="cached",version="1"} 2.0' in text
        assert "nv_cache_num_entries 2.0" in text
        # a model without response_cache is never cached, even with a cache configured
        await dataplane.infer("plain", None, _request())
        assert not dataplane.submit("plain", None, _request()).done()
        assert _stats(dataplane, "plain")["inference_stats"]["cache_hit"]["count"] == 0  # type: ignore[index]
    finally:
        await dataplane.stop()


async def test_no_cache_bytes_no_cache(cache_repo: Path) -> None:
    dataplane = await _dataplane(cache_repo)
    try:
        assert dataplane.cache is None
        await dataplane.infer("cached", None, _request())
        assert not dataplane.submit("cached", None, _request()).done()
        await asyncio.sleep(0.2)
    finally:
        await dataplane.stop()


async def test_failed_request_is_not_cached(cache_repo: Path) -> None:
    dataplane = await _dataplane(cache_repo, response_cache_bytes=1 << 20)
    try:
        bad = InferRequest(inputs={"INPUT0": np.zeros((1, 16), dtype=np.int32)})  # INPUT1 missing
        for _ in range(2):
            with pytest.raises(Exception, match="missing"):
                await dataplane.infer("cached", None, bad)
        assert dataplane.cache is not None and len(dataplane.cache.store) == 0  # type: ignore[arg-type]
        misses = _stats(dataplane, "cached")["inference_stats"]["cache_miss"]  # type: ignore[index]
        assert misses["count"] == 0  # refused by the model: never a miss
    finally:
        await dataplane.stop()


# -- Redis: shared between replicas; down is a miss ------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def _replicas(repo: Path, url: str) -> AsyncIterator[tuple[DataPlane, DataPlane]]:
    """Two data planes sharing one Redis: two gateway replicas, in one loop."""
    # A generous timeout: on a loaded machine 50 ms can pass, and a timeout is (rightly) a miss.
    a = await _dataplane(repo, response_cache_redis_url=url, response_cache_redis_timeout_s=2.0)
    b = await _dataplane(repo, response_cache_redis_url=url, response_cache_redis_timeout_s=2.0)
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


async def _settled(dataplane: DataPlane) -> None:
    """Until the background Redis writes are done."""
    cache = dataplane.cache
    assert cache is not None and isinstance(cache.store, RedisStore)
    for _ in range(200):
        if not cache.store._puts:
            return
        await asyncio.sleep(0.01)


async def test_redis_cache_is_shared_by_replicas(
    cache_repo: Path, redis_server: RedisServer
) -> None:
    async with _replicas(cache_repo, redis_server.url) as (a, b):
        await _shared(a, b)


async def _shared(a: DataPlane, b: DataPlane) -> None:
    first = await a.infer("cached", None, _request(seed=5))
    await _settled(a)
    second = await b.infer("cached", None, _request(seed=5))  # the other replica: a hit
    assert (first.outputs["OUTPUT0"] == second.outputs["OUTPUT0"]).all()
    hit = _stats(b, "cached")["inference_stats"]
    assert isinstance(hit, dict)
    assert hit["cache_hit"]["count"] == 1 and hit["cache_miss"]["count"] == 0
    assert _stats(b, "cached")["execution_count"] == 0
    assert _stats(a, "cached")["inference_stats"]["cache_miss"]["count"] == 1  # type: ignore[index]


async def test_redis_down_is_a_miss_not_an_error(
    cache_repo: Path, redis_server: RedisServer
) -> None:
    async with _replicas(cache_repo, redis_server.url) as (a, _):
        await _down(a, redis_server)


async def _down(a: DataPlane, redis_server: RedisServer) -> None:
    await a.infer("cached", None, _request(seed=7))
    await _settled(a)
    redis_server.stop()
    started = time.monotonic()
    for seed in range(20):
        response = await a.infer("cached", None, _request(seed=seed))
        assert set(response.outputs) == {"OUTPUT0", "OUTPUT1"}
    assert time.monotonic() - started < 5.0  # no timeout per request: Redis is left alone
    cache = a.cache
    assert cache is not None and isinstance(cache.store, RedisStore)
    assert cache.store.errors["get"] >= 1
    assert "gateway_response_cache_errors_total" in a.metrics.render().decode()


async def test_redis_that_never_answers_times_out_as_a_miss(cache_repo: Path) -> None:
    """A listener that accepts and never answers (a hung Redis): the lookup gives up after
    the timeout and the request is served."""

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dataplane = await _dataplane(
        cache_repo,
        response_cache_redis_url=f"redis://127.0.0.1:{port}/0",
        response_cache_redis_timeout_s=0.05,
    )
    try:
        started = time.monotonic()
        response = await dataplane.infer("cached", None, _request())
        assert time.monotonic() - started < 2.0
        assert "OUTPUT0" in response.outputs
    finally:
        await dataplane.stop()
        server.close()


def test_store_choice(tmp_path: Path) -> None:
    cache = ResponseCache(LocalStore(10))
    assert list(cache.metric_families())  # families without any lookup yet


# -- through a real gateway process ----------------------------------------------------------


def test_gateway_serves_hits_and_reports_them(cache_repo: Path, tmp_path: Path) -> None:
    gw = start_gateway(cache_repo, tmp_path, "--response-cache-bytes", "1048576")
    try:
        inputs = _request(seed=3).inputs
        client = httpclient.InferenceServerClient(gw.address)
        first = triton_infer(client, "cached", inputs, binary=True)
        second = triton_infer(client, "cached", inputs, binary=False)
        assert (first.as_numpy("OUTPUT0") == second.as_numpy("OUTPUT0")).all()
        status, body = get(f"{gw.url}/v2/models/cached/stats")
        assert status == 200
        inference = json.loads(body)["model_stats"][0]["inference_stats"]
        assert inference["cache_hit"]["count"] == 1 and inference["cache_miss"]["count"] == 1
        status, config = get(f"{gw.url}/v2/models/cached/config")
        assert json.loads(config)["response_cache"] == {"enable": True}
        metrics = get(f"{gw.url}/metrics")[1].decode()
        assert 'nv_cache_num_hits_per_model_total{model="cached",version="1"} 1.0' in metrics
    finally:
        gw.stop()


def test_a_hit_writes_outputs_asked_for_in_shared_memory(cache_repo: Path, tmp_path: Path) -> None:
    """Outputs asked for in a registered shared-memory region are written there on a hit too
    (the cached answer is not only sent in the body)."""
    import uuid

    import tritonclient.utils.shared_memory as shm

    gw = start_gateway(cache_repo, tmp_path, "--response-cache-bytes", "1048576")
    tag = uuid.uuid4().hex[:8]
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    handles = []
    try:
        out = shm.create_shared_memory_region("out", f"/gwcache_{tag}", 64, create_only=True)
        handles.append(out)
        client = httpclient.InferenceServerClient(gw.address)
        client.register_system_shared_memory("out", f"/gwcache_{tag}", 64)
        inputs = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        wanted = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
        wanted.set_shared_memory("out", 64)
        for _ in range(2):  # a miss, then a hit
            shm.set_shared_memory_region(out, [np.zeros((1, 16), np.int32)])
            client.infer("cached", inputs, outputs=[wanted])
            written = shm.get_contents_as_numpy(out, np.int32, [1, 16]).copy()  # not a view
            np.testing.assert_array_equal(written, a + b + 0)
        stats = json.loads(get(f"{gw.url}/v2/models/cached/stats")[1])["model_stats"][0]
        assert stats["inference_stats"]["cache_hit"]["count"] == 1
        client.unregister_system_shared_memory()
    finally:
        for handle in handles:
            shm.destroy_shared_memory_region(handle)
        gw.stop()


# -- pins: sizes, copies, wording, the stores' edges, metrics, the choice of store ------------


def test_entry_sizes_count_bytes_and_each_bytes_element() -> None:
    assert size_of({"Y": np.zeros(100, np.float32)}) == 64 + 400
    mixed = np.array([b"ab", "cde", 5], dtype=object)  # 2 + 3 bytes, 8 for the non-text one
    assert size_of({"T": mixed, "Y": np.zeros(2, np.int64)}) == 64 + (2 + 3 + 8) + 3 * 8 + 16
    assert size_of({}) == 64


def test_local_store_keeps_read_only_copies_and_counts_bytes_exactly() -> None:
    entry = {"Y": np.arange(100, dtype=np.float32)}  # 464 bytes with the overhead
    store = LocalStore(capacity_bytes=2 * 464)
    assert store.put(b"a", entry) and store.used_bytes == 464
    assert store.put(b"a", entry) and store.used_bytes == 464 and len(store) == 1  # replaced
    assert store.put(b"b", entry) and store.used_bytes == 928 and store.evictions == 0  # full
    entry["Y"][:] = -1  # the answer the batch handed over changes later: the cache does not
    kept = store.get(b"a")
    assert kept is not None and kept["Y"][5] == 5 and not np.shares_memory(kept["Y"], entry["Y"])
    strided = {"Y": np.arange(200, dtype=np.float32)[::2]}  # a view into a bigger output
    assert store.put(b"c", strided)  # evicts b (a was used last)
    assert store.get(b"b") is None and store.evictions == 1 and store.used_bytes == 928
    copy = store.get(b"c")
    assert copy is not None and copy["Y"].flags.c_contiguous and copy["Y"].base is None
    assert not LocalStore(463).put(b"a", {"Y": np.arange(100, dtype=np.float32)})


def test_malformed_entries_say_why() -> None:
    data = encode_entry({"F": np.arange(3, dtype=np.float32)})
    for broken, why in (
        (data[:-1], "malformed cache entry: truncated entry"),
        (data + b"x", "malformed cache entry: trailing bytes"),
    ):
        with pytest.raises(ValueError) as caught:
            decode_entry(broken)
        assert str(caught.value) == why
    with pytest.raises(ValueError, match=r"^malformed cache entry: "):
        decode_entry(b"\x02\x00\x00\x00[")
    back = decode_entry(data)
    assert not back["F"].flags.writeable  # hits share it


async def test_local_cache_metrics_and_counts(cache_repo: Path) -> None:
    dataplane = await _dataplane(cache_repo, response_cache_bytes=1 << 20)
    try:
        cache = dataplane.cache
        assert cache is not None and isinstance(cache.store, LocalStore)
        first = await dataplane.infer("cached", None, _request(seed=9))
        hit = dataplane.submit("cached", None, _request(seed=9))
        assert hit.done() and hit.execution is not None
        assert (hit.execution.batch_size, hit.execution.host) == (1, "cache")
        assert (hit.result().outputs["OUTPUT0"] == first.outputs["OUTPUT0"]).all()
        assert hit.result().model_version == "1"
        assert (cache.lookups, cache.hits, cache.misses) == (2, 1, 1)
        stats = _stats(dataplane, "cached")["inference_stats"]
        assert isinstance(stats, dict)
        assert stats["success"]["count"] == 2 and stats["cache_hit"]["count"] == 1
        assert stats["cache_miss"]["count"] == 1
        values = {f.name: f.samples[0].value for f in cache.metric_families()}
        assert values == {
            "nv_cache_num_entries": 1,
            "nv_cache_num_lookups": 2,
            "nv_cache_num_hits": 1,
            "nv_cache_num_misses": 1,
            "nv_cache_num_evictions": 0,
            "nv_cache_util": cache.store.used_bytes / (1 << 20),
        }
        assert 0 < values["nv_cache_util"] < 1
    finally:
        await dataplane.stop()


def test_build_cache_takes_redis_then_local_bytes_then_none() -> None:
    assert build_cache(Settings(warmup=False)) is None
    local = build_cache(Settings(response_cache_bytes=1000))
    assert local is not None and isinstance(local.store, LocalStore)
    assert local.store.capacity_bytes == 1000
    redis_cache = build_cache(
        Settings(
            response_cache_bytes=1000,
            response_cache_redis_url="redis://127.0.0.1:1/0",
            response_cache_redis_timeout_s=0.25,
            response_cache_redis_ttl_s=3.0,
            response_cache_redis_prefix="p:",
        )
    )
    assert redis_cache is not None
    store = redis_cache.store
    assert isinstance(store, RedisStore)
    assert (store.url, store.timeout_s, store.ttl_s, store.prefix) == (
        "redis://127.0.0.1:1/0", 0.25, 3.0, b"p:",
    )  # fmt: skip
    errors = {f.name: f for f in redis_cache.metric_families()}
    assert set(errors) == {
        "nv_cache_num_lookups", "nv_cache_num_hits", "nv_cache_num_misses",
        "gateway_response_cache_errors",
    }  # fmt: skip
    assert {s.labels["op"]: s.value for s in errors["gateway_response_cache_errors"].samples} == {
        "get": 0,
        "put": 0,
    }


async def test_redis_store_prefix_ttl_pause_and_bounds(redis_server: RedisServer) -> None:
    import redis

    direct = redis.Redis.from_url(redis_server.url)
    store = RedisStore(redis_server.url, 2.0, ttl_s=30.0, prefix="t:", max_entry_bytes=200)
    try:
        assert store.available() and await store.get(b"k") is None  # absent: a miss, no error
        entry = {"Y": np.arange(4, dtype=np.int32)}
        assert store.put_soon(b"k", entry)
        while store._puts:
            await asyncio.sleep(0.01)
        assert direct.get(b"t:k") == encode_entry(entry)  # under the prefix
        assert 0 < direct.pttl(b"t:k") <= 30_000  # with the TTL, in milliseconds
        got = await store.get(b"k")
        assert got is not None and (got["Y"] == entry["Y"]).all()
        assert not store.put_soon(b"big", {"Y": np.zeros(100, np.int32)})  # over 200 bytes
        forever = RedisStore(redis_server.url, 2.0, prefix="f:")
        assert forever.put_soon(b"k", entry)
        while forever._puts:
            await asyncio.sleep(0.01)
        assert direct.pttl(b"f:k") == -1  # no TTL: kept until Redis evicts it
        await forever.close()
        brief = RedisStore(redis_server.url, 2.0, ttl_s=0.5, prefix="b:")
        assert brief.put_soon(b"k", entry)
        while brief._puts:
            await asyncio.sleep(0.01)
        assert 0 < direct.pttl(b"b:k") <= 500  # under a second is a TTL too
        await brief.close()
        direct.set(b"t:bad", b"\x01\x00\x00\x00x")
        assert await store.get(b"bad") is None  # malformed: a miss, counted, Redis paused
        assert store.errors == {"get": 1, "put": 0} and not store.available()
        assert await store.get(b"k") is None  # paused: not even asked
        assert not store.put_soon(b"k2", entry)
        assert store.errors == {"get": 1, "put": 0}
        store._paused_until = 0.0
        assert store.available() and await store.get(b"k") is not None
    finally:
        await store.close()
        direct.close()


def test_local_store_evictions_free_exactly_what_they_held() -> None:
    big, small = {"Y": np.zeros(100, np.float32)}, {"Y": np.zeros(10, np.float32)}  # 464, 104
    store = LocalStore(capacity_bytes=1000)
    store.put(b"big", big)
    store.put(b"small", small)
    assert store.used_bytes == 568
    store.put(b"big2", big)  # 1032 > 1000: the oldest (big) goes
    assert store.used_bytes == 568 and store.evictions == 1
    store.put(b"big3", big)  # then small goes
    assert store.used_bytes == 928 and store.evictions == 2 and len(store) == 2
    exact = LocalStore(capacity_bytes=464)
    assert exact.put(b"a", big) and exact.used_bytes == 464  # an entry of exactly the bound
    fortran = {"M": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))}
    assert exact.put(b"f", fortran)
    kept = exact.get(b"f")
    assert kept is not None and kept["M"].flags.c_contiguous  # encoded on hits as it is
    words = np.array([[b"ab", b"c"], [b"", b"defg"]], dtype=object)
    assert size_of({"T": words}) == 64 + 7 + 4 * 8  # every element of a 2-D BYTES tensor


def test_a_truncated_bytes_entry_names_its_tensor() -> None:
    data = bytearray(encode_entry({"T": np.array([b"abc", b"de"], dtype=object)}))
    data[-6] = 200  # the second element's length prefix now overruns the data
    with pytest.raises(ValueError, match=r"^malformed cache entry: input 'T': "):
        decode_entry(bytes(data))


def test_cache_metric_help_and_miss_time() -> None:
    local = {f.name: f.documentation for f in ResponseCache(LocalStore(10)).metric_families()}
    assert local == {
        "nv_cache_num_entries": "Responses in the cache",
        "nv_cache_num_lookups": "Response cache lookups",
        "nv_cache_num_hits": "Response cache hits",
        "nv_cache_num_misses": "Response cache misses",
        "nv_cache_num_evictions": "Responses evicted (LRU)",
        "nv_cache_util": "Share of the cache's bytes in use (0..1)",
    }
    redis_cache = ResponseCache(RedisStore("redis://127.0.0.1:1/0", 0.1))
    shared = {f.name: f.documentation for f in redis_cache.metric_families()}
    assert shared["gateway_response_cache_errors"] == (
        "Redis calls that failed or timed out (each a miss, never an error)"
    )


async def test_a_miss_counts_only_its_own_time(cache_repo: Path) -> None:
    dataplane = await _dataplane(cache_repo, response_cache_bytes=1 << 20)
    try:
        await dataplane.infer("cached", None, _request(seed=11))
        miss = _stats(dataplane, "cached")["inference_stats"]["cache_miss"]  # type: ignore[index]
        assert miss["count"] == 1 and 0 < miss["ns"] < 10**10  # lookup + insertion, not a clock
    finally:
        await dataplane.stop()


async def test_redis_failures_are_counted_per_call_and_in_flight_puts_bounded() -> None:
    """A Redis that refuses connections: each failed call counts under its own name. One that
    accepts and never answers: at most 256 writes wait at once, the next is not attempted."""
    refused = RedisStore(f"redis://127.0.0.1:{free_port()}/0", 0.5, pause_s=0.0)
    try:
        assert refused.put_soon(b"k", {"Y": np.zeros(1, np.int32)})
        while refused._puts:
            await asyncio.sleep(0.01)
        assert refused.errors == {"get": 0, "put": 1}
        assert await refused.get(b"k") is None and await refused.get(b"k") is None
        assert refused.errors == {"get": 2, "put": 1}
    finally:
        await refused.close()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    entry = {"Y": np.zeros(4, np.int32)}
    exact = len(encode_entry(entry))
    stuck = RedisStore(f"redis://127.0.0.1:{port}/0", 5.0, max_entry_bytes=exact)
    try:
        assert all(stuck.put_soon(b"k%d" % i, entry) for i in range(256))  # exactly the bound
        assert not stuck.put_soon(b"one-more", entry)
    finally:
        await stuck.close()
        server.close()
