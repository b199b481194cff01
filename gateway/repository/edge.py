"""An edge replica's repository: models pulled once from an origin into a verified local cache.

:class:`EdgeRepository` is a :class:`LocalRepository` whose directory is the cache's
``models/``: :meth:`fetch` (awaited by the data plane before every load) reads the origin's
index, fetches what the chosen versions need into the blob cache (peers first, then the
origin), and materialises ``models/<name>``; :meth:`source` is then the local one.

The origin is asked for its index at most every ``INDEX_TTL_S`` and with a validator (ETag or
Last-Modified), so a restarted edge costs the origin one small, usually 304, request; a request
for a name the index does not list asks again at most every ``UNKNOWN_NAME_REFRESH_S`` (made-up
names must not drive traffic to the origin). A
restarted edge does not wait for that answer (stale-while-revalidate): a model whose files are
all in the cache loads at once from the index and manifests saved there (each file still
verified against its sha256), while the index is revalidated in the background; when the
origin's index turns out to have changed such a model, ``on_change`` (the data plane's
``reload_soon``) loads it again from the fresh index. When the origin cannot be reached, cached
models keep loading and serving, the revalidation is retried with a backoff, and uncached
models fail with :class:`~gateway.errors.Unavailable` (503).

A manifest that lists a file's chunks (and ``edge_chunks``, on by default) has the file built
from chunks (:meth:`BlobCache.ensure`): a new version of a model fetches only the chunks no
cached file holds, asking peers by chunk hash (``/v2/repository/chunks/sha256/{hash}``) and the
origin by byte range. ``edge_chunks = false`` is the edge as it was before chunk lists: files
whole, chunk lists ignored. Progress notes and ``gateway_cache_fetched_bytes`` split bytes by
source: origin, peer, and cached (chunks the cache held already).

On an HTTP origin the index is also checked every ``edge_poll_s`` while the edge idles (none
while a fetch runs; backing off while the origin fails): the pooled connection stays open for
the next pull, and a model the cache holds gets its newest version's manifest as soon as the
index lists it, so that version's load starts with the chunk fetch. Such a load does not wait
for its own index question either (:meth:`_fetch_meanwhile`): with a copy the check answered
within ``RECENT_POLLS`` x ``edge_poll_s`` it fetches at once and asks meanwhile, and ends only
with the answer (fetching again when the answer lists something else for the model).

The origin is not trusted further than its hashes: the index, each manifest and each
``config.pbtxt`` are read whole only up to ``max_index_bytes``; every file is written only up
to the size the index or its manifest gives, within the cache's byte bound. Errors for clients
name models, not the origin's URL or the cache's paths; the details go to the log.

Why one module of this size: index freshness, fetch planning and materialisation share the
index state and the single-flight bookkeeping of fetches; the blob cache and origins are apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import hashlib
import importlib
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from gateway.errors import GatewayError, ModelLoadError, ModelNotFound, Unavailable
from gateway.repository.cache import (
    BlobCache,
    CacheWriteError,
    ChunkStream,
    Progress,
    Source,
    Stream,
    Transfer,
    stats_dict,
    write_atomic,
    write_error,
)
from gateway.repository.config import ModelConfig, parse_pbtxt
from gateway.repository.local import LocalRepository, ModelSource, check_model_name
from gateway.repository.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ModelIndex,
    parse_index,
    parse_manifest,
)
from gateway.repository.origin import (
    BLOB_PREFIX,
    CHUNK_PREFIX,
    HttpOrigin,
    Origin,
    OriginError,
    OriginMissing,
    open_origin,
)
from gateway.settings import Settings

log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_T = TypeVar("_T")

INDEX_TTL_S = 2.0
RECENT_POLLS = 1.5  # an index answered within 1.5 x edge_poll_s is fetched by while re-asked
# a transfer of at least this much hides a second connection's set-up and the index question
# (~3 round trips of a 25 ms, 100 Mbit/s link); a smaller one is followed by the question
ASK_BESIDE_BYTES = 1 << 20
UNKNOWN_NAME_REFRESH_S = 10.0
FETCH_CONCURRENCY = 4
PARSED_KEPT = 8  # prefetched manifests kept parsed, for the loads that follow
PEER_WAIT_S = 300.0
REVALIDATE_RETRY_S = (1.0, 60.0)  # first and longest wait between retries while unreachable


def default_cache_dir(model_repo: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gateway" / hashlib.sha256(model_repo.encode()).hexdigest()[:16]


class Served(Protocol):
    """What an edge repository needs of the data plane that serves its models."""

    def in_use(self, name: str) -> bool:
        """Whether some version of ``name`` is loaded (never evicted then)."""

    def reload_soon(self, name: str) -> None:
        """Load ``name`` again: the origin changed it."""


class EdgeRepository(LocalRepository):
    """Same interface as :class:`LocalRepository`; files come from an origin on first use."""

    def __init__(
        self,
        settings: Settings,
        origin: Origin | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        root = (
            Path(settings.cache_dir)
            if settings.cache_dir
            else default_cache_dir(settings.model_repo)
        )
        self.cache = BlobCache(root, settings.cache_size_bytes)
        super().__init__(self.cache.models_dir)
        self.url = settings.model_repo
        self.max_index_bytes = settings.max_index_bytes
        self.origin = origin if origin is not None else open_origin(settings.model_repo)
        self.peers = [
            HttpOrigin(p, connect_timeout_s=1.0, read_timeout_s=PEER_WAIT_S) for p in settings.peers
        ]
        self.pinned = set(settings.prefetch)
        self.chunks = settings.edge_chunks  # false: files whole, chunk lists ignored
        self.poll_s = settings.edge_poll_s  # 0: the index is asked only when a load needs it
        self.in_use: Callable[[str], bool] = lambda name: False
        # called with a model's name when the revalidated index changed a model that was
        # fetched from the saved index (the data plane's ``reload_soon``)
        self.on_change: Callable[[str], None] = lambda name: None
        self.clock = clock
        self.cache.on_dropped = self._dropped
        self.reachable: bool | None = None  # None: not asked yet
        self.origin_error = ""
        self._index: dict[str, ModelIndex] | None = None
        self._validator: str | None = None
        self._checked_at = -1e18
        self._index_task: asyncio.Future[None] | None = None
        self._answered = False  # the origin has answered an index request in this process
        self._revalidation: asyncio.Future[None] | None = None
        self._revalidation_tried = asyncio.Event()  # its first attempt is over
        self._poll: asyncio.Future[None] | None = None  # the periodic index check
        self._prefetching: dict[str, asyncio.Future[bytes]] = {}  # manifest sha256 -> its fetch
        # (manifest sha256, its path) -> the manifest, parsed when prefetched: the load that
        # follows then starts its chunk fetch without parsing it again (~3 ms per 1300 chunks)
        self._parsed: dict[tuple[str, str], Manifest] = {}
        self._stale_used: dict[str, ModelIndex] = {}  # fetched from the saved, unchecked index
        self._fetching: dict[str, asyncio.Future[None]] = {}
        self._progress: dict[str, tuple[int, int]] = {}  # name -> (done, total) bytes
        self._transfers: dict[str, Transfer] = {}  # name -> bytes by source, while fetching
        self._versions: dict[str, int] = {}  # name -> newest version being fetched
        self._load_index()

    # -- the origin's index -----------------------------------------------------------------

    def _load_index(self) -> None:
        path = self.cache.root / "index.json"
        if not path.exists():
            return
        try:
            self._index = parse_index(path.read_bytes(), str(path))
            validator = self.cache.root / "index.validator"
            self._validator = validator.read_text() or None if validator.exists() else None
        except (GatewayError, OSError) as exc:
            log.warning("cached index %s unusable: %s", path, exc)

    def _index_due(self, name: str | None) -> bool:
        """Whether to ask the origin for its index again: when older than ``INDEX_TTL_S``; for
        a name it does not list, only when older than ``UNKNOWN_NAME_REFRESH_S``."""
        age_s = self.clock() - self._checked_at
        if name is not None and name not in (self._index or {}):
            return age_s >= UNKNOWN_NAME_REFRESH_S
        return self._index is None or age_s >= INDEX_TTL_S

    async def refresh_index(
        self, force: bool = False, name: str | None = None
    ) -> dict[str, ModelIndex]:
        """The origin's index, asked again when due (single-flight); ``name``: the model a
        request asks for."""
        if force or self._index_due(name):
            if self._index_task is None:
                self._index_task = asyncio.ensure_future(self._refresh())
                self._index_task.add_done_callback(self._index_done)
            await asyncio.shield(self._index_task)
        if self._index is None:
            raise Unavailable("the origin is unreachable and no index is cached", retry_after_s=1.0)
        return self._index

    def _index_done(self, task: asyncio.Future[None]) -> None:
        self._index_task = None
        if not task.cancelled():
            task.exception()

    async def _refresh(self) -> None:
        try:
            raw, validator = await self.origin.index(
                self._validator if self._index else None, self.max_index_bytes
            )
        except OriginError as exc:
            self.reachable, self.origin_error = False, exc.message
            self._checked_at = self.clock()
            log.warning("origin unreachable, serving from the cache: %s", exc.message)
            return
        except OriginMissing as exc:
            self.reachable, self.origin_error = False, exc.message
            self._checked_at = self.clock()
            log.warning("origin has no index: %s", exc.message)
            raise ModelLoadError(
                "the origin has no models.json (publish it with `gateway manifest`)"
            ) from None
        self.reachable, self.origin_error = True, ""
        self._checked_at = self.clock()
        self._answered = True
        self._poll_soon()
        stale, self._stale_used = self._stale_used, {}
        if raw is None:
            return  # unchanged: what was loaded from the saved index is current
        try:
            self._index = parse_index(raw, "the origin's models.json")
        except ModelLoadError as exc:
            log.warning("%s: %s", self.url, exc.message)
            raise
        write_atomic(self.cache.root / "index.json", raw)
        write_atomic(self.cache.root / "index.validator", (validator or "").encode())
        self._validator = validator
        for name, used in sorted(stale.items()):
            if self._index.get(name) != used:
                log.info("model %s changed at the origin; loading it again", name)
                self.on_change(name)

    def _poll_soon(self) -> None:
        """Start the periodic index check once the origin has answered (HTTP origins only:
        the check is also what keeps their connection open between pulls)."""
        if self.poll_s > 0 and self._poll is None and isinstance(self.origin, HttpOrigin):
            # in a context of its own: not in the trace of the request that started it
            self._poll = asyncio.get_running_loop().create_task(
                self._poll_loop(), context=contextvars.Context()
            )

    async def _poll_loop(self) -> None:
        """Ask for the index every ``poll_s`` on the pooled connection, so that a new version's
        pull pays no connection set-up (nor, when this check saw it first, the index and the
        manifest: a model the cache holds gets its newest version's manifest fetched here)."""
        failed = 0  # checks in a row that found the origin unreachable: wait longer
        while True:
            # ``poll_s`` after the last check (a load's counts), and not during a fetch: it
            # has the connection, and a check beside it would open another
            every_s = min(self.poll_s * 2**failed, max(self.poll_s, REVALIDATE_RETRY_S[1]))
            wait_s = self._checked_at + every_s - self.clock()
            await asyncio.sleep(min(max(wait_s, 0.0), every_s))
            if wait_s > 0 or self._fetching:
                if self._fetching:
                    await asyncio.sleep(min(self.poll_s, 0.5))
                continue
            before = self._index
            try:
                index = await self.refresh_index(force=True)
            except GatewayError as exc:
                log.debug("index check: %s", exc.message)
                continue
            except OSError as exc:  # the cache's disk refused the index
                log.warning("index check: %s", exc)
                continue
            finally:
                failed = 0 if self.reachable else min(failed + 1, 16)
            if index is before:
                continue  # unchanged (304), or the index a load asked for meanwhile
            for name in sorted(n for n in index if n in self.cache.models):
                if (before or {}).get(name) != index[name]:
                    await self._prefetch_manifest(name, index[name])

    async def _prefetch_manifest(self, name: str, entry: ModelIndex) -> None:
        """The manifest of the newest version of a model the cache holds, into the cache
        (small: a load of that version then starts with its chunk fetch)."""
        if not entry.versions:
            return
        version = max(entry.versions)
        sha = entry.versions[version]
        if self.cache.complete(sha) is not None:
            return
        protected = {n for n in self.cache.models if n in self.pinned or self.in_use(n)}
        sources = self._manifest_sources(name, version, sha, entry)
        work = self.cache.document(sha, sources, self.max_index_bytes, protected, {sha})
        self._prefetching[sha] = done = asyncio.ensure_future(work)  # a load waits for it
        try:
            await done
        except (GatewayError, OSError) as exc:  # the load that needs it asks again
            log.info("model %s: manifest of version %d not prefetched: %s", name, version, exc)
            return
        finally:
            del self._prefetching[sha]
        relpath = f"{name}/{version}/{MANIFEST_NAME}"
        with contextlib.suppress(GatewayError):  # the load says what is wrong with it
            manifest = parse_manifest(done.result(), relpath)
            while len(self._parsed) >= PARSED_KEPT:
                del self._parsed[next(iter(self._parsed))]  # the oldest
            self._parsed[(sha, relpath)] = manifest
            for f in manifest.files:  # serialised now, not when the fetch records them
                self.cache.note_rows(f.chunks)
        log.info("model %s: version %d listed at the origin; its manifest fetched", name, version)

    def _revalidate_soon(self) -> None:
        """Ask the origin for its index in the background, retrying while it is unreachable."""
        if self._revalidation is None or self._revalidation.done():
            self._revalidation = asyncio.ensure_future(self._revalidate())

    async def _revalidate(self) -> None:
        delay, longest = REVALIDATE_RETRY_S
        if isinstance(self.origin, HttpOrigin):
            # aiohttp takes ~0.1 s to import: not on the event loop while models load
            await asyncio.to_thread(importlib.import_module, "aiohttp")
        while True:
            try:
                await self.refresh_index(force=True)
            except GatewayError as exc:
                log.warning("repository index: %s", exc.message)
            self._revalidation_tried.set()
            if self._answered:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)

    async def revalidated(self) -> None:
        """Wait for the first attempt of the background revalidation, if one was started
        (answered, changed models handed to ``on_change``, or the origin found unreachable)."""
        if self._revalidation is not None:
            await self._revalidation_tried.wait()

    def _saved_index(self, name: str) -> dict[str, ModelIndex] | None:
        """The index saved in the cache, when ``name`` can be served from the cache before the
        origin has answered in this process (and the revalidation is then started)."""
        if self._answered or self._index is None or name not in self._index:
            return None
        if not self.cache.cached(name):
            return None
        self._revalidate_soon()
        return self._index

    # -- LocalRepository interface ----------------------------------------------------------

    def model_names(self) -> list[str]:
        return sorted(set(self._index or {}) | set(self.cache.models))

    async def startup_names(self) -> list[str]:
        """Models to load at start: the pinned (prefetch) ones and those already cached.

        With an index saved in the cache this does not wait for the origin: the index is
        revalidated in the background while cached models load."""
        if self._index is not None and not self._answered:
            self._revalidate_soon()
            index = self._index
        else:
            try:
                index = await self.refresh_index()
            except GatewayError as exc:
                log.warning("repository index: %s", exc.message)
                index = {}
        cached = [n for n in self.cache.models if self.cache.cached(n) and n in index]
        return sorted(self.pinned | set(cached))

    def on_demand(self, name: str) -> bool:
        """Whether a request for ``name`` should fetch and load it first (with no index yet,
        the load answers: 503 while the origin cannot be asked)."""
        if self._index is None or name in self._index or name in self.cache.models:
            return True
        return self._index_due(name)

    def note(self, name: str) -> str:
        """Cache state for the repository index's ``reason``."""
        progress = self._progress.get(name)
        if progress is not None:
            done, total = progress
            t = self._transfers.get(name, Transfer())
            return (
                f"fetching: {done}/{total} bytes "
                f"(origin {t.origin}, peer {t.peer}, cached {t.cached})"
            )
        if self.cache.cached(name):
            size = sum(self.cache.models[name].blobs.values())
            return f"cached: {size} bytes"
        if name in self.cache.models:
            return "packed: rebuilt from the cache's chunks when loaded"
        return "not cached"

    def fetching_version(self, name: str) -> int | None:
        """While ``name`` is not (fully) in the cache: the version a fetch would serve (the
        newest one being fetched, else the newest in the index); None when it is cached (a load
        from the cache is quick) or the index does not list it."""
        if self.cache.cached(name):
            return None
        version = self._versions.get(name)
        if version is not None:
            return version
        entry = (self._index or {}).get(name)
        return max(entry.versions) if entry is not None and entry.versions else None

    async def fetch(self, name: str) -> None:
        """Bring ``models/<name>`` up to date with the origin (single-flight per model)."""
        check_model_name(name)
        future = self._fetching.get(name)
        if future is None:
            future = asyncio.ensure_future(self._fetch(name, None))
            self._fetching[name] = future
            future.add_done_callback(lambda f: self._fetch_done(name, f))
        await asyncio.shield(future)

    def _fetch_done(self, name: str, future: asyncio.Future[None]) -> None:
        self._fetching.pop(name, None)
        self._progress.pop(name, None)
        self._transfers.pop(name, None)
        self._versions.pop(name, None)
        if not future.cancelled():
            future.exception()

    async def pull(self, name: str, progress: Progress | None = None) -> None:
        """``gateway pull``: fetch without loading, reporting bytes as they arrive."""
        await self._fetch(check_model_name(name), progress, latest=True)

    def source(self, name: str, config: ModelConfig | None = None) -> ModelSource:
        self.cache.touch(name)
        return super().source(name, config)

    def blob_path(self, sha256: str) -> Path | None:
        """A complete cached blob, for peers (``GET /v2/repository/blobs/sha256/{hash}``)."""
        return self.cache.complete(sha256)

    async def peer_blob(self, sha256: str) -> Path | None:
        """``blob_path`` for a peer, waiting (bounded) for a download from the origin in flight."""
        return await self.cache.complete_soon(sha256, PEER_WAIT_S)

    async def peer_chunk(self, sha256: str, rank: int | None = None) -> bytes | None:
        """A chunk by hash, for peers (``GET /v2/repository/chunks/...?rank=``): held, or
        awaited (bounded) from a fetch in flight here when that fetch is from the origin or
        the asking edge's ``rank`` is higher than this edge's (waits never go round)."""
        return await self.cache.chunk_bytes(sha256, rank, PEER_WAIT_S)

    def stats(self) -> dict[str, Any]:
        """Counters for the metrics module: hits, misses, bytes, seconds, evictions, bytes used."""
        return {
            **stats_dict(self.cache.stats),
            "bytes_used": self.cache.used_bytes,
            "capacity_bytes": self.cache.capacity_bytes,
            "models_cached": sum(1 for n in self.cache.models if self.cache.cached(n)),
            "origin_reachable": bool(self.reachable),
        }

    def attach(self, served: Served) -> None:
        """Wire to the data plane: loaded models are never evicted, models changed at the origin
        after a restart are loaded again. (Its counters reach /metrics as one of the data
        plane's ``metric_sources``: ``metric_families``.)"""
        self.in_use = served.in_use
        self.on_change = served.reload_soon

    def metric_families(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.stats()
        counters = [
            ("gateway_cache_hits", "Blobs found in the edge cache and verified", s["hits"]),
            ("gateway_cache_misses", "Blobs fetched into the edge cache", s["misses"]),
            ("gateway_cache_evictions", "Models evicted from the edge cache", s["evictions"]),
            (
                "gateway_cache_corrupt",
                "Cached or fetched files that failed verification",
                s["corrupt"],
            ),
            ("gateway_cache_fetch_seconds", "Time spent fetching blobs", s["fetch_s"]),
        ]
        families: list[Any] = [CounterMetricFamily(n, h, value=v) for n, h, v in counters]
        fetched = CounterMetricFamily(
            "gateway_cache_fetched_bytes",
            "Bytes of files fetched into the edge cache, by source (cached: chunks of new files "
            "copied from files the cache held)",
            labels=["source"],
        )
        fetched.add_metric(["origin"], s["bytes_from_origin"])
        fetched.add_metric(["peer"], s["bytes_from_peers"])
        fetched.add_metric(["cached"], s["bytes_cached"])  # chunks reused from cached files
        families.append(fetched)
        families.append(
            GaugeMetricFamily(
                "gateway_cache_used_bytes", "Bytes held by the edge cache", value=s["bytes_used"]
            )
        )
        families.append(
            GaugeMetricFamily(
                "gateway_cache_capacity_bytes", "Edge cache bound", value=s["capacity_bytes"]
            )
        )
        return families

    def _dropped(self, sha256: str) -> None:
        """A file built from chunks proved wrong after its load: load its models again (the
        file is then fetched whole)."""
        for name, record in self.cache.models.items():
            if sha256 in record.blobs:
                log.warning("model %s: a file proved wrong after its load; loading it again", name)
                self.on_change(name)

    async def close(self) -> None:
        await self.cache.settled()
        for task in (self._revalidation, self._poll):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.origin.close()
        for peer in self.peers:
            await peer.close()

    # -- fetching ---------------------------------------------------------------------------

    def _reader(self, relpath: str) -> Stream:
        origin = self.origin
        return lambda offset: origin.stream(relpath, offset)

    def _manifest_sources(
        self, name: str, version: int, sha256: str, entry: ModelIndex
    ) -> list[Source]:
        relpath = f"{name}/{version}/{MANIFEST_NAME}"
        sources = self._sources(sha256, relpath)
        if entry.manifests_gzip:  # a third of the bytes; the plain one if it fails
            packed = f"{relpath}.gz"
            sources.insert(-1, Source("origin", self.url, self._reader(packed), gzip=True))
        return sources

    def _sources(self, sha256: str, relpath: str) -> list[Source]:
        def reader(where: Origin, path: str) -> Stream:
            return lambda offset: where.stream(path, offset)

        def chunk(peer: Origin) -> ChunkStream:
            return lambda sha: peer.stream(f"{CHUNK_PREFIX}{sha}?rank={self.cache.rank}", 0)

        origin = self.origin
        sources = [
            Source("peer", p.url, reader(p, BLOB_PREFIX + sha256), chunk=chunk(p))
            for p in self.peers
        ]
        span = lambda start, end: origin.stream(relpath, start, end)  # noqa: E731
        spans = None
        if isinstance(origin, HttpOrigin):  # several ranges per request (S3 has none)
            spans = lambda ranges: origin.ranges(relpath, ranges)  # noqa: E731
        sources.append(Source("origin", self.url, reader(origin, relpath), span=span, spans=spans))
        return sources

    async def _learn_chunks(self, name: str, missing: Iterable[FileEntry], avg: int) -> None:
        """When a missing file has chunks but the cache knows none of them, cut the files of
        the model's cached version(s) as the origin would: after an origin starts publishing
        chunk lists (or this edge is upgraded), the first new version already moves only its
        change."""
        chunked = [f for f in missing if f.chunks]
        record = self.cache.models.get(name)
        if not chunked or record is None or any(self.cache.seeds(f.chunks) for f in chunked):
            return
        for sha in record.blobs:
            await self.cache.learn_chunks(sha, avg)

    def _link_bytes(self, f: FileEntry) -> int:
        """Bytes of a missing file that peers or the origin send (held chunks are copied here;
        a file of which none is held comes whole)."""
        if not (self.chunks and f.chunks):
            return f.size
        held = [self.cache.holds_chunk(c.sha256) for c in f.chunks]
        if not any(held):
            return f.size
        return sum(c.size for c, here in zip(f.chunks, held, strict=True) if not here)

    async def _fetch(self, name: str, progress: Progress | None, latest: bool = False) -> None:
        try:
            await self._fetch_files(name, progress, latest)
        except CacheWriteError as exc:
            raise CacheWriteError(
                f"model '{name}' cannot be cached: {exc.message}", exc.retry_after_s
            ) from None
        except OSError as exc:  # materialising, state files: the cache's disk refused a write
            raise write_error(self.cache.root, exc, f"model '{name}'") from None
        except OriginError as exc:
            log.warning("model %s: cannot fetch from %s: %s", name, self.url, exc.message)
            raise OriginError(
                f"model '{name}' is not cached and cannot be fetched from the origin now",
                retry_after_s=5.0,
            ) from None

    async def _fetch_files(self, name: str, progress: Progress | None, latest: bool) -> None:
        steps = _Steps()
        saved = None if latest else self._saved_index(name)
        if saved is not None:
            # A restart: serve what the cache holds now; the revalidation reloads on change.
            self._stale_used[name] = saved[name]
            if await self._fetch_from(name, saved, progress, cached_only=True, steps=steps):
                return
            self._stale_used.pop(name, None)  # not all cached after all: ask the origin now
        if self._recent(name):
            await self._fetch_meanwhile(name, progress, steps)
            return
        index = await self.refresh_index(name=name)
        steps.mark("index")
        await self._fetch_from(name, index, progress, cached_only=False, steps=steps)

    def _recent(self, name: str) -> bool:
        """Whether the index held is recent enough to fetch by while the origin is asked: the
        periodic check runs (it keeps the copy current) and the origin answered within
        ``RECENT_POLLS`` x ``edge_poll_s``."""
        return (
            self._poll is not None
            and self.reachable is True
            and self._index is not None
            and name in self._index
            and self.clock() - self._checked_at < self.poll_s * RECENT_POLLS
        )

    async def _fetch_meanwhile(self, name: str, progress: Progress | None, steps: _Steps) -> None:
        """Fetch ``name`` by the recent index while asking the origin for the index (when due),
        so that the load pays no round trip for it; the load is over only once the answer is
        in, and an answer that lists something else for ``name`` is fetched too (a version
        published since the last check is still served by this load).

        When the question goes out: on HTTP/1.1 a connection carries one request at a time, and
        the transfer, not the small index, should have the one the periodic check kept open. So
        with nothing to take over the link, at once (the files are built here meanwhile); with
        at least ``ASK_BESIDE_BYTES`` to take, once the transfer's first bytes arrive (on a second
        connection, whose set-up the rest of the transfer hides); with less, after the fetch
        (a second connection would take longer than the transfer)."""
        held = self._index or {}
        ask = asyncio.Event()
        beside = False

        def planned(link_bytes: int) -> None:
            nonlocal beside
            beside = link_bytes >= ASK_BESIDE_BYTES
            if link_bytes == 0:
                ask.set()

        def first_bytes() -> None:
            if beside:
                ask.set()

        asking = asyncio.ensure_future(self._ask_after(ask, name))
        try:
            try:
                await self._fetch_from(
                    name, held, progress, False, steps, first_bytes=first_bytes, planned=planned
                )
            except GatewayError:
                # the held index may be what failed (a file since removed): the answer tells
                ask.set()
                try:
                    fresh = await asking
                except GatewayError:
                    fresh = held
                if fresh.get(name) == held.get(name):
                    raise
            else:
                ask.set()
                fresh = await asking
                steps.mark("index (meanwhile)")
                if fresh.get(name) == held.get(name):
                    return
            log.info("model %s changed at the origin during its fetch; fetching it again", name)
            await self._fetch_from(name, fresh, progress, cached_only=False, steps=steps)
        finally:
            if not asking.done():
                asking.cancel()

    async def _ask_after(self, event: asyncio.Event, name: str) -> dict[str, ModelIndex]:
        await event.wait()
        return await self.refresh_index(name=name)

    async def _fetch_from(
        self,
        name: str,
        index: dict[str, ModelIndex],
        progress: Progress | None,
        cached_only: bool,
        steps: _Steps | None = None,
        first_bytes: Callable[[], None] | None = None,
        planned: Callable[[int], None] | None = None,
    ) -> bool:
        """Fetch ``name`` as ``index`` describes it; with ``cached_only``, only when every file
        it needs is in the cache already (else False, nothing done). ``first_bytes`` is called
        as bytes from a peer or the origin arrive, ``planned`` with the bytes the transfer will
        take from them once the manifests are in."""
        entry = index.get(name)
        if entry is None:
            raise ModelNotFound(f"model '{name}' is not in the repository")
        # Models never evicted to make room, and the blobs this fetch has so far.
        protected = {n for n in self.cache.models if n in self.pinned or self.in_use(n)}
        protected.add(name)
        keep: set[str] = set()
        files: dict[str, FileEntry] = {f.path: f for f in entry.files}
        config = ModelConfig(name=name)
        steps = steps if steps is not None else _Steps()
        if "config.pbtxt" in files:
            spec = files["config.pbtxt"]
            if cached_only and self.cache.complete(spec.sha256) is None:
                return False
            if spec.size > self.max_index_bytes:  # read whole below, like the index
                raise ModelLoadError(f"model '{name}': config.pbtxt is over max_index_bytes")
            keep.add(spec.sha256)
            sources = _noted(self._sources(spec.sha256, f"{name}/config.pbtxt"), first_bytes)
            raw = await self.cache.document(
                spec.sha256, sources, self.max_index_bytes, protected, keep
            )
            config = parse_pbtxt(raw.decode(errors="replace"), f"{name}/config.pbtxt", name)
            steps.mark("config")
        chosen = config.version_policy.select(list(entry.versions))
        if not chosen:
            raise ModelLoadError(
                f"model '{name}': no version at the origin matches the version policy "
                f"(found {sorted(entry.versions) or 'none'})"
            )
        if not cached_only:
            self._versions[name] = max(chosen)
        blobs: dict[str, int] = {}
        chunk_avg = 0
        for version in chosen:
            sha = entry.versions[version]
            relpath = f"{name}/{version}/{MANIFEST_NAME}"
            if cached_only and self.cache.complete(sha) is None:
                return False
            keep.add(sha)
            prefetch = self._prefetching.get(sha)
            if prefetch is not None:  # the index check is fetching it: not twice
                await asyncio.wait([prefetch])
            sources = _noted(self._manifest_sources(name, version, sha, entry), first_bytes)
            raw = await self.cache.document(sha, sources, self.max_index_bytes, protected, keep)
            # the same bytes (``document`` checked them against ``sha``): parsed once
            manifest = self._parsed.pop((sha, relpath), None) or parse_manifest(raw, relpath)
            blobs[sha] = len(raw)
            for f in manifest.files:
                files[f"{version}/{f.path}"] = f
            chunk_avg = max(chunk_avg, manifest.chunk_avg_bytes)
        steps.mark("manifests")
        blobs.update({f.sha256: f.size for f in files.values()})
        total = sum(f.size for f in {f.sha256: f for f in files.values()}.values())
        missing = {f.sha256: f for f in files.values() if self.cache.complete(f.sha256) is None}
        if cached_only and missing:
            return False
        needed = sum(f.size for f in missing.values())
        if self.chunks and chunk_avg and not cached_only:
            await self._learn_chunks(name, missing.values(), chunk_avg)
        self._progress[name] = (0, total)
        transfer = self._transfers[name] = Transfer()
        done = 0

        def advance(delta: int) -> None:
            nonlocal done
            done += delta
            self._progress[name] = (done, total)
            if progress is not None:
                progress(delta)

        started = time.perf_counter()
        limit = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def one(rel: str, f: FileEntry) -> None:
            async with limit:
                sources = _noted(self._sources(f.sha256, f"{name}/{rel}"), first_bytes)
                chunks = f.chunks if self.chunks else ()
                try:
                    await self.cache.ensure(f.sha256, f.size, sources, advance, chunks, transfer)
                except OriginMissing as exc:
                    raise ModelLoadError(f"origin lists {name}/{rel} but has not: {exc}") from None

        unique = {f.sha256: (rel, f) for rel, f in files.items()}
        # cached files holding chunks of missing ones are kept until those are built
        seeds = self.cache.seeds(c for f in missing.values() for c in f.chunks)
        if planned is not None:
            planned(sum(self._link_bytes(f) for f in missing.values()))
        steps.mark("plan")
        async with self.cache.reserve(needed, protected, set(blobs) | seeds):
            await asyncio.gather(*(one(rel, f) for rel, f in unique.values()))
        steps.mark("fetch")
        self.cache.materialise(name, {rel: f.sha256 for rel, f in files.items()})
        await self.cache.record(name, blobs)
        self.cache.check_built()  # whole-file checks of files built from chunks, meanwhile
        steps.mark("record")
        if missing:
            log.info(
                "model %s: fetched %d of %d files (%d bytes: origin %d, peer %d, cached %d) "
                "in %.2f s (%s)",
                name,
                len(missing),
                len(unique),
                needed,
                transfer.origin,
                transfer.peer,
                transfer.cached,
                time.perf_counter() - started,
                steps,
            )
        return True


def _noted(sources: list[Source], call: Callable[[], None] | None) -> list[Source]:
    """``sources`` whose reads call ``call`` as their first bytes arrive (None: as they are)."""
    if call is None:
        return sources
    return [
        dataclasses.replace(
            s,
            stream=_noting(s.stream, call),
            span=_noting(s.span, call) if s.span is not None else None,
            chunk=_noting(s.chunk, call) if s.chunk is not None else None,
            spans=_noting(s.spans, call) if s.spans is not None else None,
        )
        for s in sources
    ]


def _noting(
    read: Callable[_P, AsyncGenerator[_T, None]], call: Callable[[], None]
) -> Callable[_P, AsyncGenerator[_T, None]]:
    async def noted(*args: _P.args, **kwargs: _P.kwargs) -> AsyncGenerator[_T, None]:
        async with contextlib.aclosing(read(*args, **kwargs)) as pieces:
            async for piece in pieces:
                call()
                yield piece

    return noted


class _Steps:
    """Seconds each step of a fetch took, for its log line (where the time before the
    transfer goes: the index, manifests, planning)."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._took: list[tuple[str, float]] = []

    def mark(self, step: str) -> None:
        now = time.perf_counter()
        self._took.append((step, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{step} {s * 1000:.0f} ms" for step, s in self._took)


__all__ = ["EdgeRepository", "default_cache_dir"]
