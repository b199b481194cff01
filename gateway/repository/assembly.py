"""A file assembled from chunks: the part of the blob cache that builds a file whose manifest
lists chunks, some of which the cache holds (:meth:`BlobCache.ensure` with ``chunks`` calls
:func:`assemble`; a file none of whose chunks is cached is one download, whole, in ``cache.py``).

A chunk a cached file or the chunk store holds is copied in the kernel (``copy_file_range``, in
a thread, while the network fetch runs on the loop), the others are asked of peers by hash, then
of the origin by byte range (adjacent missing chunks in one range; the ranges of a file in one
request where the origin answers several at once, else one request each); each fetched chunk is
verified as it arrives (a wrong one is counted, dropped and fetched again, from the next source
or in the next round), and the file's own sha256 is checked right after it is handed out
(:meth:`BlobCache.check_built`). A chunk wanted by two assemblies at once is fetched once
(single-flight per chunk), and a peer asking for it waits for it (ranked: no cycles; the
answering side is :meth:`BlobCache.chunk_bytes`). An interrupted assembly resumes from its
partial file.

Why apart from ``cache.py``: building a file chunk by chunk (placing bytes at offsets, the
copying thread, peers and origin ranges, rounds of retries) is its own concern; it writes only
under the reservation the caller made for the whole file, so the byte bound stays the cache's.
It takes the cache as an argument and uses its ledger only through the methods
:class:`BlobCache` names for it (``holder``, ``claim_chunk``, ``pin``, ``adopt_built``...):
the chunk index (which cached file holds a chunk), the chunk store, the in-flight chunk
fetches that peers' requests wait on, and the files and stored chunks pinned while copied
(which room-making must not pack or sweep).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import hashlib
import logging
import os
import threading
from pathlib import Path

from gateway.repository.cache import (
    ATTEMPTS,
    BlobCache,
    Progress,
    Source,
    Transfer,
    read_bounded,
    write_error,
)
from gateway.repository.manifest import Chunk
from gateway.repository.origin import (
    MultiRangeUnsupported,
    OriginError,
    OriginMissing,
    RangeUnsupported,
)

log = logging.getLogger(__name__)

CHUNK_CONCURRENCY = 4  # chunk requests to peers, byte ranges to the origin, per file
RANGES_PER_REQUEST = 50  # in one multi-range request (servers cap them: starlette at 100)


async def assemble(
    cache: BlobCache,
    sha256: str,
    size: int,
    chunks: tuple[Chunk, ...],
    sources: list[Source],
    progress: Progress | None,
    transfer: Transfer,
) -> Path:
    """Build the file from chunks: those a resumed part holds, those cached files (or the
    chunk store) hold, the rest from peers by hash, then from the origin by byte range.
    The network fetch runs on the loop while a thread copies the held chunks in the kernel
    (``copy_file_range``: no bytes through Python). Every chunk is checked before the file
    is used: fetched ones by their sha256 as they arrive, copied ones come from files
    checked whole (stored ones were hashed in :func:`_plan`). The whole file's sha256, a
    sequential pass that would start only once the last chunk is in, is checked right
    after, in the background (:meth:`BlobCache.check_built`): a mismatch means the manifest's chunk
    list does not make up the file it names; the file is dropped and fetched whole."""
    part = cache.tmp_dir / f"{sha256}.chunks.part"
    claimed: dict[str, asyncio.Future[bytes]] = {}
    try:
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise write_error(cache.root, exc, f"blob {sha256[:12]}...") from None
    build = Build(fd, chunks, progress, transfer, asyncio.get_running_loop())
    cache.fetching_from_origin(sha256)  # a peer asking for the whole file waits for it
    try:
        await _plan(cache, build, part)
        waiting: list[tuple[Chunk, asyncio.Future[bytes]]] = []
        mine: list[Chunk] = []
        for chunk in build.todo():
            other = cache.chunk_in_flight(chunk.sha256)
            if chunk.sha256 in claimed or chunk.sha256 in build.seeded:
                continue  # the same bytes twice in this file, or copied: written together
            if other is not None:
                waiting.append((chunk, other))
                continue
            claimed[chunk.sha256] = build.loop.create_future()
            cache.claim_chunk(chunk.sha256, claimed[chunk.sha256])
            mine.append(chunk)
        copier = asyncio.ensure_future(asyncio.to_thread(build.copy_held))
        try:
            await _fetch_chunks(cache, build, mine, sources, claimed)
            for chunk, future in waiting:  # another assembly is fetching these
                with contextlib.suppress(OriginError, asyncio.CancelledError):
                    build.report(build.put(chunk, await asyncio.shield(future)), "cached")
            rest = [c for c in build.todo() if c.sha256 not in build.seeded]
            await _fetch_chunks(cache, build, rest, sources, {})
        except BaseException:
            build.abort()
            with contextlib.suppress(Exception):
                await copier
            raise
        copied = await copier
        os.ftruncate(fd, size)
    except OSError as exc:
        with contextlib.suppress(OSError):
            part.unlink()
        raise write_error(cache.root, exc, f"blob {sha256[:12]}...") from None
    except RangeUnsupported:
        part.unlink()  # the caller fetches the file whole
        raise
    finally:
        os.close(fd)
        cache.unpin(build.pinned)
        for key, future in claimed.items():
            cache.release_chunk(key, future)
            if not future.done():
                future.set_exception(OriginError(f"chunk {key[:12]}... not fetched"))
                future.exception()
    cache.stats.chunks_reused += build.reused
    cache.stats.bytes_cached += build.reused_bytes
    if not copied or build.todo():
        log.warning("blob %s: a cached file came up short; fetching it whole", sha256)
        with contextlib.suppress(OSError):
            part.unlink()
        return await cache.download(sha256, size, sources, progress, transfer)
    return cache.adopt_built(part, sha256, size, chunks)


async def _plan(cache: BlobCache, build: Build, part: Path) -> None:
    """Chunks a resumed part holds already (hashed in a thread), and the cached files to copy
    the others from: each checked whole against its hash first unless known good, so the
    copy itself need not hash (a corrupt one is dropped, its chunks fetched instead)."""
    if part.stat().st_size:
        found = await asyncio.to_thread(build.resume)
        if found:
            cache.stats.resumes += 1
            for chunk in found:  # fetched before the interruption: counted then
                if build.progress is not None:
                    build.progress(chunk.size)
    held = [cache.holder(c.sha256) for c in build.todo()]
    owners = {where[0] for where in held if where is not None}
    for owner in owners:
        if cache.complete(owner) is None or not await cache.verify(owner):
            continue
        for chunk in build.todo():
            where = cache.holder(chunk.sha256)
            if where is not None and where[0] == owner:
                build.seeded[chunk.sha256] = (cache.blob_path(owner), where[1])
    stored = {
        c.sha256 for c in build.todo() if c.sha256 in cache.store and c.sha256 not in build.seeded
    }
    # the files and stored chunks copied from are kept (not packed, swept) until the end
    build.pinned = stored | {sha for sha in owners if cache.complete(sha) is not None}
    cache.pin(build.pinned)
    good = await asyncio.to_thread(lambda: {c for c in stored if cache.store.read(c)})
    for sha in stored - good:
        cache.drop_stored(sha)  # fetched instead
    for chunk in build.todo():
        if chunk.sha256 in good:
            build.seeded[chunk.sha256] = (
                cache.store.path(chunk.sha256),
                Chunk(0, chunk.size, chunk.sha256),
            )


async def _fetch_chunks(
    cache: BlobCache,
    build: Build,
    wanted: list[Chunk],
    sources: list[Source],
    claimed: dict[str, asyncio.Future[bytes]],
) -> None:
    """Fetch ``wanted``: each from peers by hash, the rest from the origin by byte ranges
    (runs of adjacent chunks), in rounds until all are in or ``ATTEMPTS`` rounds failed."""
    limit = asyncio.Semaphore(CHUNK_CONCURRENCY)
    errors: list[str] = []

    def arrived(chunk: Chunk, data: bytes, source: Source) -> None:
        """A chunk's bytes (counted as transferred already): verified, then placed."""
        if hashlib.sha256(data).hexdigest() != chunk.sha256 or len(data) != chunk.size:
            cache.stats.corrupt += 1
            errors.append(f"{source.name}: chunk {chunk.sha256[:12]}... does not match")
            log.warning("%s sent a corrupt chunk %s; dropped", source.name, chunk.sha256)
            return
        cache.stats.chunks_fetched += 1
        build.report(build.put(chunk, data), source.kind)
        future = claimed.get(chunk.sha256)
        if future is not None and not future.done():
            future.set_result(data)

    async def from_peer(peer: Source, chunk: Chunk) -> None:
        assert peer.chunk is not None
        async with limit:
            if build.has(chunk):
                return
            try:
                data = await read_bounded(peer.chunk(chunk.sha256), peer.name, chunk.size)
            except (OriginError, OriginMissing):
                return
            cache.count(peer, len(data))
            arrived(chunk, data, peer)

    peers = [s for s in sources if s.chunk is not None]
    for peer in peers:
        await asyncio.gather(*(from_peer(peer, c) for c in wanted if not build.has(c)))
    # A peer ranking lower asked for a chunk this edge is fetching, and was told no: it is
    # going to the origin for it, so ask the peers again (it waits for us, we for it).
    for _ in peers:
        again = [c for c in wanted if not build.has(c) and cache.lower_asked(c.sha256)]
        if not again:
            break
        for peer in peers:
            await asyncio.gather(*(from_peer(peer, c) for c in again if not build.has(c)))
    cache.chunks_from_origin(c.sha256 for c in wanted if c.sha256 in claimed)

    async def from_origin(origin: Source, run: list[Chunk]) -> None:
        assert origin.span is not None
        async with limit:
            buffer = bytearray()
            queue = list(run)
            cache.chunks_from_origin(c.sha256 for c in run if c.sha256 in claimed)
            stream = origin.span(run[0].offset, run[-1].end)
            async with contextlib.aclosing(stream) as pieces:
                async for piece in pieces:
                    cache.count(origin, len(piece))  # what crossed the link, used or not
                    buffer += piece
                    while queue and len(buffer) >= queue[0].size:
                        chunk = queue.pop(0)
                        arrived(chunk, bytes(buffer[: chunk.size]), origin)
                        del buffer[: chunk.size]
                    if not queue:
                        break

    async def from_origin_at_once(origin: Source, runs: list[list[Chunk]]) -> None:
        """Runs of chunks in one request for several ranges: the chunks each piece
        completes are placed; those the answer left out stay missing."""
        assert origin.spans is not None
        chunks = [c for run in runs for c in run]
        starts = [c.offset for c in chunks]
        async with limit:
            cache.chunks_from_origin(c.sha256 for c in chunks if c.sha256 in claimed)
            at, buffer = 0, bytearray()  # contiguous bytes of the file from ``at``
            stream = origin.spans([(run[0].offset, run[-1].end) for run in runs])
            async with contextlib.aclosing(stream) as pieces:
                async for offset, piece in pieces:
                    cache.count(origin, len(piece))
                    if offset != at + len(buffer):
                        at, buffer = offset, bytearray()
                    buffer += piece
                    end = at + len(buffer)
                    keep = end
                    for i in range(bisect.bisect_left(starts, at), len(chunks)):
                        chunk = chunks[i]
                        if chunk.offset >= end:
                            break
                        if chunk.end <= end:
                            if not build.has(chunk):
                                arrived(
                                    chunk,
                                    bytes(buffer[chunk.offset - at : chunk.end - at]),
                                    origin,
                                )
                        else:
                            keep = min(keep, chunk.offset)
                    del buffer[: keep - at]  # bytes no chunk still needs
                    at = keep

    for origin in [s for s in sources if s.span is not None]:
        for attempt in range(ATTEMPTS):
            runs = _runs([c for c in wanted if not build.has(c)])
            if not runs:
                return
            if origin.spans is not None and len(runs) > 1:
                groups = [
                    runs[i : i + RANGES_PER_REQUEST]
                    for i in range(0, len(runs), RANGES_PER_REQUEST)
                ]
                results = await asyncio.gather(
                    *(from_origin_at_once(origin, group) for group in groups),
                    return_exceptions=True,
                )
                for result in results:
                    if isinstance(result, (MultiRangeUnsupported, OriginMissing)):
                        continue  # one range per request, below (missing: raised there)
                    if isinstance(result, OriginError):
                        errors.append(result.message)
                    elif isinstance(result, BaseException):
                        raise result
                # what the answer left out (one range, or cut off): a range each, now
                runs = _runs([c for c in wanted if not build.has(c)])
            results = await asyncio.gather(
                *(from_origin(origin, run) for run in runs), return_exceptions=True
            )
            for result in results:
                if isinstance(result, (RangeUnsupported, OriginMissing)):
                    raise result
                if isinstance(result, OriginError):
                    errors.append(result.message)
                elif isinstance(result, BaseException):
                    raise result
            if any(not build.has(c) for c in wanted):
                await asyncio.sleep(min(0.1 * 2**attempt, 1.0))
    if any(not build.has(c) for c in wanted):
        raise OriginError("cannot fetch chunks: " + (errors[-1] if errors else "no source"))


class Build:
    """A file being assembled from chunks at their offsets (``pwrite``: the network on the loop
    and the copying thread write at once), and the thread that hashes it in order."""

    def __init__(
        self,
        fd: int,
        chunks: tuple[Chunk, ...],
        progress: Progress | None,
        transfer: Transfer,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.fd = fd
        self.chunks = chunks
        self.progress = progress
        self.transfer = transfer
        self.loop = loop
        self.seeded: dict[str, tuple[Path, Chunk]] = {}  # chunk -> cached file, where in it
        self.pinned: set[str] = set()  # files and stored chunks copied from
        self.reused = 0
        self.reused_bytes = 0
        self._done: set[int] = set()  # offsets of the chunks in place
        self._ready = threading.Condition()
        self._aborted = False
        self._by_sha: dict[str, list[Chunk]] = {}
        for chunk in chunks:
            self._by_sha.setdefault(chunk.sha256, []).append(chunk)

    def todo(self) -> list[Chunk]:
        with self._ready:
            return [c for c in self.chunks if c.offset not in self._done]

    def has(self, chunk: Chunk) -> bool:
        with self._ready:
            return chunk.offset in self._done

    def put(self, chunk: Chunk, data: bytes) -> list[Chunk]:
        """Write verified bytes at every place the file has this chunk; returns the places."""
        written = []
        for place in self._by_sha[chunk.sha256]:
            if self.has(place):
                continue
            os.pwrite(self.fd, data, place.offset)
            written.append(place)
            with self._ready:
                self._done.add(place.offset)
                self._ready.notify_all()
        return written

    def report(self, places: list[Chunk], kind: str) -> None:
        """Count placed chunks (on the event loop): the first as ``kind``, copies as cached."""
        for i, place in enumerate(places):
            self.transfer.add(kind if i == 0 else "cached", place.size)
            if kind == "cached":
                self.reused += 1
                self.reused_bytes += place.size
            if self.progress is not None:
                self.progress(place.size)

    def abort(self) -> None:
        with self._ready:
            self._aborted = True
            self._ready.notify_all()

    def resume(self) -> list[Chunk]:
        """(thread) Keep the chunks a partial file from before holds already."""
        found = []
        for chunk in self.chunks:
            data = os.pread(self.fd, chunk.size, chunk.offset)
            if len(data) == chunk.size and hashlib.sha256(data).hexdigest() == chunk.sha256:
                self._done.add(chunk.offset)
                found.append(chunk)
        return found

    def copy_held(self) -> bool:
        """(thread) Copy every chunk a cached file or the chunk store holds to its places, in
        the kernel; False when aborted or a source came up short."""
        opened: dict[Path, int] = {}
        try:
            for sha, (path, where) in self.seeded.items():
                places = [p for p in self._by_sha[sha] if not self.has(p)]
                if self._aborted:
                    return False
                if not places:
                    continue
                src = opened.get(path)
                if src is None:
                    src = opened[path] = os.open(path, os.O_RDONLY)
                for place in places:
                    if not _copy_range(src, where.offset, self.fd, place.offset, where.size):
                        return False
                with self._ready:
                    self._done.update(p.offset for p in places)
                self.loop.call_soon_threadsafe(self.report, places, "cached")
        except OSError:
            return False
        finally:
            for fd in opened.values():
                os.close(fd)
        return True


def _copy_range(src: int, src_offset: int, dst: int, dst_offset: int, size: int) -> bool:
    """Copy ``size`` bytes between open files at these offsets, in the kernel where it can
    (``copy_file_range``), else through a buffer; False when the source is shorter."""
    done = 0
    while done < size:
        n = 0
        try:
            n = os.copy_file_range(src, dst, size - done, src_offset + done, dst_offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        if n == 0:  # not supported here (or the end of the source): through a buffer
            data = os.pread(src, size - done, src_offset + done)
            n = os.pwrite(dst, data, dst_offset + done) if data else 0
        if n == 0:
            return False
        done += n
    return True


def _runs(chunks: list[Chunk]) -> list[list[Chunk]]:
    """Adjacent chunks grouped: each run is one byte range."""
    runs: list[list[Chunk]] = []
    for chunk in sorted(chunks, key=lambda c: c.offset):
        if runs and runs[-1][-1].end == chunk.offset:
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    return runs


__all__ = ["CHUNK_CONCURRENCY", "RANGES_PER_REQUEST", "Build", "assemble"]
