"""A content-addressed, verified, bounded local cache of model files.

Layout under the cache directory::

    blobs/sha256/<hash>      complete files, named by their content (verified before any use)
    tmp/<hash>.part          downloads in progress; kept across restarts so they resume
    models/<model>/...       materialised model directories: hard links to blobs (copies where
                             links cannot be made), what ONNX Runtime is pointed at
    state.json               which blobs each model uses and when it was last used (for LRU)
    chunks.json              the content-defined chunks of cached files (from their manifests)
    chunks/sha256/<hash>     chunks of packed files that no whole file holds (``chunks.py``)
    packed.json              packed files: their chunk lists and last use

A blob is hashed before its first use by this process and again whenever its inode, size or
mtime changes, so a corrupt or truncated file is never handed out: it is deleted and fetched
again. Downloads are single-flight per hash, streamed to ``tmp/`` in 1 MiB chunks, resumed from
the partial file's length after an interruption, and moved into place with ``os.replace``
only once the hash matches. A download never writes more than the size it was asked for (a
source sending more is cut off there), and small files of unknown size (manifests) are read
into memory up to a bound and written only once verified (:meth:`BlobCache.document`), so
every byte on disk is counted against the byte bound before it is written. A write the cache's
own disk refuses (full, quota, read-only) is :class:`CacheWriteError` (503, naming the reason,
not the path), and that download's partial file is removed: it holds space and cannot be
finished now.

Files whose manifest lists chunks, some of which the cache holds, are assembled chunk by chunk
(:meth:`BlobCache.ensure` with ``chunks``; a file none of whose chunks is cached is one download,
whole, as above): held chunks copied, the rest from peers by hash, then from the origin by byte
range, each verified as it arrives, single-flight per chunk. The building is
:mod:`gateway.repository.assembly`'s; this module keeps what it builds on (the chunk index, the
chunk store, the chunk fetches in flight that peers' requests wait on: :meth:`chunk_bytes`),
takes the built file into the ledger, and checks its whole sha256 right after it is handed out
(:meth:`BlobCache.check_built`).

Room, by chunk: files stay whole while a model directory links them (the load path reads a
plain file; sub-file ranges cannot be linked), and a file no directory needs (an older version,
an idle model whose bytes other files mostly hold) is packed: its chunks no whole file holds go
to the chunk store and the file is deleted, to be rebuilt here when wanted. Every byte on disk
is counted once. :meth:`BlobCache._make_room` gives up bytes cheapest loss first, then least
recently used first over packed files and whole models; a chunk a packed file needs is kept
(moved out of a whole file evicted before it). Which chunks of a file no other file holds is
read from a chunk -> holders index, and the state files are written once per room-making, so
making room stays cheap with hundreds of models.

Why these in one module: single-flight downloads, resume, verification, packing and the LRU
bound all act on one reservation ledger; split, the invariant "no byte written past the bound"
would be spread over files. Assembly is apart (``assembly.py``): it writes only within the
reservation made for the whole file, and takes the cache as an argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import tracing
from gateway.errors import Unavailable
from gateway.repository.chunks import ChunkStore
from gateway.repository.manifest import Chunk, gunzip, hash_and_chunk, sha256_file
from gateway.repository.origin import (
    OriginError,
    OriginMissing,
    RangeUnsupported,
    too_large,
)

log = logging.getLogger(__name__)

ATTEMPTS = 4  # per source; an attempt that made progress does not count
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)

Stream = Callable[[int], AsyncGenerator[bytes, None]]
Span = Callable[[int, int], AsyncGenerator[bytes, None]]  # bytes [start, end) of the file
ChunkStream = Callable[[str], AsyncGenerator[bytes, None]]  # a chunk by its sha256
# several byte ranges [start, end) of the file in one request: (file offset, bytes) pieces
Spans = Callable[[list[tuple[int, int]]], AsyncGenerator[tuple[int, bytes], None]]
Progress = Callable[[int], None]
BACKGROUND_AFTER_S = 0.5  # whole-file checks and packing start this long after a fetch


def parse_size(text: str) -> int:
    """``"10GiB"``, ``"500M"``, ``"1048576"`` -> bytes (k/M/G/T are powers of 1024)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r}")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


class CacheWriteError(Unavailable):
    """The cache directory's file system refused a write (no space left, quota, read-only)."""


def write_error(root: Path, exc: OSError, what: str) -> CacheWriteError:
    """The 503 for a write the cache's disk refused, naming the reason (the path: logged)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = f"the disk is full ({exc.strerror or exc})"
    else:
        reason = f"{exc.strerror or exc}"
    log.error("the model cache at %s cannot store %s: %s", root, what, reason)
    return CacheWriteError(f"the model cache cannot store {what}: {reason}", retry_after_s=5.0)


@dataclass(frozen=True, slots=True)
class Source:
    """Somewhere a blob can be read from, tried in order: peers first, the origin last."""

    kind: str  # "peer" | "origin"
    name: str
    stream: Stream
    span: Span | None = None  # byte ranges of the file (origins)
    chunk: ChunkStream | None = None  # chunks by hash (peers)
    spans: Spans | None = None  # several byte ranges in one request (HTTP origins)
    gzip: bool = False  # documents: the stream is the gzip of the file (``manifest.json.gz``)


@dataclass(slots=True)
class Transfer:
    """One fetch's bytes by where they came from: what progress notes show."""

    origin: int = 0
    peer: int = 0
    cached: int = 0  # chunks (or whole files) the cache held already

    def add(self, kind: str, size_bytes: int) -> None:
        setattr(self, kind, getattr(self, kind) + size_bytes)


@dataclass(slots=True)
class CacheStats:
    hits: int = 0  # blobs found in the cache and verified
    misses: int = 0  # blobs that had to be fetched
    bytes_from_origin: int = 0
    bytes_from_peers: int = 0
    fetch_s: float = 0.0
    evictions: int = 0  # models evicted
    corrupt: int = 0  # cached or downloaded files whose hash did not match
    resumes: int = 0  # downloads continued from a partial file
    bytes_cached: int = 0  # chunks of new files copied from cached files instead of fetched
    chunks_fetched: int = 0
    chunks_reused: int = 0
    packed: int = 0  # files packed into the chunk store (their shared bytes given up)
    peer_waits: int = 0  # chunk requests from peers that waited for a fetch in flight here


@dataclass(slots=True)
class Packed:
    """A file held as chunks: those no whole file holds are in the chunk store."""

    chunks: tuple[Chunk, ...]
    last_used: float  # wall-clock seconds: chunks are evicted least recently used first


@dataclass(slots=True)
class ModelRecord:
    blobs: dict[str, int] = field(default_factory=dict)  # sha256 -> size
    last_used: float = 0.0  # wall-clock seconds (persisted across restarts)


class BlobCache:
    def __init__(self, root: Path, capacity_bytes: int) -> None:
        self.root = root
        self.capacity_bytes = capacity_bytes
        self.blob_dir = root / "blobs" / "sha256"
        self.tmp_dir = root / "tmp"
        self.models_dir = root / "models"
        for d in (self.blob_dir, self.tmp_dir, self.models_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.stats = CacheStats()
        self.models: dict[str, ModelRecord] = {}
        self._sizes: dict[str, int] = {}
        # sha256 -> (inode, size, mtime_ns, ctime_ns) when last hashed and found right; kept
        # across restarts, so a blob is hashed again only once something changed it.
        self._verified: dict[str, tuple[int, ...]] = {}
        self._inflight: dict[str, asyncio.Future[Path]] = {}
        self._verified_dirty = False
        self._from_origin: set[str] = set()  # in flight, being read from the origin
        self._reserved_bytes = 0
        self._room = asyncio.Lock()
        self._file_chunks: dict[str, tuple[Chunk, ...]] = {}  # cached file -> its chunks
        self._chunk_at: dict[str, tuple[str, Chunk]] = {}  # chunk sha256 -> (file, where)
        # chunk sha256 -> the cached files holding it: room-making asks which chunks of a
        # file no other file holds without going over every file's chunk list
        self._holders: dict[str, dict[str, Chunk]] = {}  # chunk -> file -> where in it
        self._chunk_inflight: dict[str, asyncio.Future[bytes]] = {}
        self._chunk_from_origin: set[str] = set()  # in flight, being read from the origin
        self._lower_asked: dict[str, bool] = {}  # in flight here; a lower peer was told no
        # Peer chunk requests carry the asker's rank: a peer waits for a fetch in flight here
        # only when it is from the origin or the asker ranks higher, so waits never go round.
        self.rank = secrets.randbits(62)
        self.store = ChunkStore(root)
        self._packed: dict[str, Packed] = {}  # file sha256 -> its chunks, file not on disk
        self._needed: dict[str, int] = {}  # chunk sha256 -> packed files listing it
        self._rows_json: dict[int, tuple[tuple[Chunk, ...], str]] = {}  # see _rows_text
        self._defer_state = False  # making room: state files written once, at the end
        self._state_dirty = False
        self._seeding: dict[str, int] = {}  # stored chunks builds are about to copy
        self._whole_only: set[str] = set()  # files whose chunk list did not make them up
        self._unchecked: set[str] = set()  # built from chunks, whole-file check not started
        self._tasks: set[asyncio.Future[None]] = set()  # background work (see ``settled``)
        self._background_turn = asyncio.Lock()
        # called with a file's sha256 when a file built from chunks proved wrong and was dropped
        # (the edge loads the models using it again)
        self.on_dropped: Callable[[str], None] = lambda sha256: None
        for path in self.blob_dir.iterdir():
            if len(path.name) == 64:
                self._sizes[path.name] = path.stat().st_size
        self._load_state()
        self._load_chunks()
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            data = json.loads((root / "verified.json").read_text())
            self._verified = {str(k): tuple(int(x) for x in v) for k, v in data.items()}

    # -- state ------------------------------------------------------------------------------

    def _load_state(self) -> None:
        path = self.root / "state.json"
        try:
            data = json.loads(path.read_text())
            for name, body in data.get("models", {}).items():
                self.models[name] = ModelRecord(
                    {str(k): int(v) for k, v in body["blobs"].items()}, float(body["last_used"])
                )
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("cache state %s unreadable (%s); starting with no model records", path, exc)

    def _load_chunks(self) -> None:
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, KeyError):
            data = json.loads((self.root / "chunks.json").read_text())
            for sha, rows in data.items():
                if sha in self._sizes:
                    self.note_chunks(sha, tuple(Chunk(int(o), int(n), str(h)) for o, n, h in rows))
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, KeyError):
            data = json.loads((self.root / "packed.json").read_text())
            for sha, body in data.items():
                if sha not in self._sizes:
                    rows = tuple(Chunk(int(o), int(n), str(h)) for o, n, h in body["chunks"])
                    self._add_packed(sha, Packed(rows, float(body["last_used"])))

    def _add_packed(self, sha256: str, packed: Packed) -> None:
        self._pop_packed(sha256)
        self._packed[sha256] = packed
        for chunk in {c.sha256 for c in packed.chunks}:
            self._needed[chunk] = self._needed.get(chunk, 0) + 1

    def _pop_packed(self, sha256: str) -> Packed | None:
        packed = self._packed.pop(sha256, None)
        for chunk in {c.sha256 for c in packed.chunks} if packed is not None else ():
            self._needed[chunk] -= 1
            if not self._needed[chunk]:
                del self._needed[chunk]
        return packed

    def note_chunks(self, sha256: str, chunks: tuple[Chunk, ...]) -> None:
        """Remember where the chunks of a cached file lie, to build other files from them."""
        if not chunks or sha256 in self._file_chunks:
            return
        self._file_chunks[sha256] = chunks
        for chunk in chunks:
            self._chunk_at.setdefault(chunk.sha256, (sha256, chunk))
            self._holders.setdefault(chunk.sha256, {}).setdefault(sha256, chunk)

    async def learn_chunks(self, sha256: str, avg_bytes: int) -> None:
        """Cut a cached file whose chunks are unknown (fetched from a manifest without chunk
        lists, or by an edge from before them) as an origin with this average would, so a new
        version can be built from it; the cut also hashes it, and a file found corrupt is
        dropped."""
        if sha256 in self._file_chunks or sha256 not in self._sizes or not 0 < avg_bytes:
            return
        if not 1024 <= avg_bytes <= 4 * 1024 * 1024:
            return
        try:
            found, chunks = await asyncio.to_thread(
                hash_and_chunk, self.blob_path(sha256), avg_bytes
            )
        except (OSError, ValueError):
            return
        if found != sha256:
            log.warning("cached blob %s is corrupt; deleting it", sha256)
            self.stats.corrupt += 1
            self._forget(sha256)
            return
        self._remember(sha256)
        self.note_chunks(sha256, chunks)

    def seeds(self, chunks: Iterable[Chunk]) -> set[str]:
        """The cached files, whole or packed, that hold some of these chunks (kept while a
        file is built)."""
        wanted = {c.sha256 for c in chunks}
        found = {self._chunk_at[c][0] for c in wanted if c in self._chunk_at}
        stored = {c for c in wanted if c in self.store}
        if stored:
            found |= {
                sha
                for sha, packed in self._packed.items()
                if any(c.sha256 in stored for c in packed.chunks)
            }
        return found

    def holds_chunk(self, sha256: str) -> bool:
        return sha256 in self._chunk_at or sha256 in self.store

    async def chunk_bytes(
        self, sha256: str, asker_rank: int | None = None, wait_s: float = 0.0
    ) -> bytes | None:
        """A chunk by its hash, for peers, checked before it goes out: from a cached file or
        the chunk store, else (within ``wait_s``) from a fetch of it in flight here, when that
        fetch is from the origin or the asking edge ranks higher than this one (its fetch
        then waits for ours, never the other way round: no cycles)."""
        data = await self._held_chunk(sha256)
        if data is not None:
            return data
        future = self._chunk_inflight.get(sha256)
        if future is None or wait_s <= 0:
            return None
        if sha256 not in self._chunk_from_origin and (
            asker_rank is None or asker_rank <= self.rank
        ):
            if asker_rank is not None:
                self._lower_asked[sha256] = True  # see assembly._fetch_chunks
            return None
        self.stats.peer_waits += 1
        try:
            return await asyncio.wait_for(asyncio.shield(future), wait_s)
        except Exception:  # timed out, or the fetch failed (its future is never cancelled)
            return await self._held_chunk(sha256)

    # -- what a build from chunks uses (``assembly.py``) -----------------------------------

    def fetching_from_origin(self, sha256: str) -> None:
        """A file being built here reads from the origin: a peer asking for it waits."""
        self._from_origin.add(sha256)

    def chunk_in_flight(self, sha256: str) -> asyncio.Future[bytes] | None:
        """The fetch of a chunk some build claimed, when one did."""
        return self._chunk_inflight.get(sha256)

    def claim_chunk(self, sha256: str, future: asyncio.Future[bytes]) -> None:
        """A build fetches this chunk: other builds and peers wait on ``future``."""
        self._chunk_inflight[sha256] = future

    def chunks_from_origin(self, shas: Iterable[str]) -> None:
        """Claimed chunks now read from the origin: a peer of any rank may wait for them."""
        self._chunk_from_origin.update(shas)

    def lower_asked(self, sha256: str) -> bool:
        """Whether a lower-ranked peer was told no for this chunk (and it goes to the origin
        for it); cleared by asking."""
        return self._lower_asked.pop(sha256, False)

    def release_chunk(self, sha256: str, future: asyncio.Future[bytes]) -> None:
        """The claim made with ``future`` is over (fetched or failed)."""
        if self._chunk_inflight.get(sha256) is future:
            del self._chunk_inflight[sha256]
            self._chunk_from_origin.discard(sha256)
            self._lower_asked.pop(sha256, None)

    def holder(self, chunk_sha256: str) -> tuple[str, Chunk] | None:
        """A cached file that holds the chunk, and where in it."""
        return self._chunk_at.get(chunk_sha256)

    def pin(self, shas: Iterable[str]) -> None:
        """Files and stored chunks a build copies from: neither packed nor swept until
        :meth:`unpin`."""
        for sha in shas:
            self._seeding[sha] = self._seeding.get(sha, 0) + 1

    def unpin(self, shas: Iterable[str]) -> None:
        for sha in shas:
            self._seeding[sha] -= 1
            if not self._seeding[sha]:
                del self._seeding[sha]

    def adopt_built(self, part: Path, sha256: str, size: int, chunks: tuple[Chunk, ...]) -> Path:
        """A file built from chunks becomes a cached blob, its whole-file check still to run
        (:meth:`check_built`); when it was held packed, the chunks stored for it alone go."""
        os.replace(part, self.blob_path(sha256))
        self._sizes[sha256] = size
        self._unchecked.add(sha256)
        self.note_chunks(sha256, chunks)
        if self._pop_packed(sha256) is not None:
            self._sweep()
            self.save_state()
        return self.blob_path(sha256)

    async def _held_chunk(self, sha256: str) -> bytes | None:
        found = self._chunk_at.get(sha256)
        if found is not None and found[0] in self._sizes:
            data = await asyncio.to_thread(_read_at, self.blob_path(found[0]), found[1])
            if data is not None and hashlib.sha256(data).hexdigest() == sha256:
                return data
        if sha256 in self.store:
            data = await asyncio.to_thread(self.store.read, sha256)
            if data is None:
                self.drop_stored(sha256)
            return data
        return None

    def drop_stored(self, sha256: str) -> None:
        """A stored chunk found missing or corrupt: dropped (fetched again when wanted)."""
        if sha256 in self.store:
            log.warning("stored chunk %s is corrupt; dropped", sha256)
            self.stats.corrupt += 1
            self.store.remove(sha256)

    def save_state(self) -> None:
        """Write the state files; while room is made (many files packed or dropped one after
        another) once at its end. A crash before then loses efficiency, never correctness:
        a file the state does not list is fetched again, a chunk no packed file lists swept."""
        if self._defer_state:
            self._state_dirty = True
            return
        self._state_dirty = False
        live = [(sha, rows) for sha, rows in self._file_chunks.items() if sha in self._sizes]
        chunks = ",".join(f'"{sha}":{self._rows_text(rows)}' for sha, rows in live)
        write_atomic(self.root / "chunks.json", f"{{{chunks}}}".encode())
        packed = ",".join(
            f'"{sha}":{{"chunks":{self._rows_text(p.chunks)},"last_used":{json.dumps(p.last_used)}}}'
            for sha, p in self._packed.items()
        )
        write_atomic(self.root / "packed.json", f"{{{packed}}}".encode())
        if len(self._rows_json) > 2 * (len(live) + len(self._packed)) + 16:  # forgotten lists
            kept = {id(rows) for _, rows in live} | {id(p.chunks) for p in self._packed.values()}
            self._rows_json = {k: v for k, v in self._rows_json.items() if k in kept}
        body = {
            "models": {
                name: {"blobs": rec.blobs, "last_used": rec.last_used}
                for name, rec in self.models.items()
            }
        }
        write_atomic(self.root / "state.json", json.dumps(body, sort_keys=True).encode())

    def note_rows(self, rows: tuple[Chunk, ...]) -> None:
        """Serialise a chunk list ahead of the fetch that records it (a prefetched manifest's:
        the state written right after the fetch, on the way to the load, then only joins)."""
        if rows:
            self._rows_text(rows)

    def _rows_text(self, rows: tuple[Chunk, ...]) -> str:
        """A chunk list as JSON, memoised (a list never changes; a big model's has thousands
        of rows, and the state is written after every fetch)."""
        text = self._rows_json.get(id(rows))
        if text is None or text[0] is not rows:
            text = (rows, json.dumps([[c.offset, c.size, c.sha256] for c in rows]))
            self._rows_json[id(rows)] = text
        return text[1]

    @property
    def used_bytes(self) -> int:
        """Every byte the cache holds on disk, once: whole files and stored chunks."""
        return sum(self._sizes.values()) + self.store.used_bytes

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256

    def complete(self, sha256: str) -> Path | None:
        """The blob's path if a complete file is present (not necessarily verified yet)."""
        return self.blob_path(sha256) if sha256 in self._sizes else None

    async def complete_soon(self, sha256: str, timeout_s: float) -> Path | None:
        """``complete``, first waiting for a download from the origin already under way: a peer
        asking for a blob this edge is fetching gets it from here, not the origin (no cycles:
        downloads from peers are not waited for)."""
        future = self._inflight.get(sha256)
        if future is not None and sha256 in self._from_origin:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(future), timeout_s)
        return self.complete(sha256)

    def cached(self, name: str) -> bool:
        record = self.models.get(name)
        return record is not None and all(sha in self._sizes for sha in record.blobs)

    # -- getting blobs ----------------------------------------------------------------------

    async def ensure(
        self,
        sha256: str,
        size: int,
        sources: Iterable[Source],
        progress: Progress | None = None,
        chunks: tuple[Chunk, ...] = (),
        transfer: Transfer | None = None,
    ) -> Path:
        """A verified local copy of the blob: from the cache, else fetched (single-flight).

        ``size`` bounds what is written: the caller has reserved room for it (:meth:`reserve`).
        With ``chunks`` (the file's chunk list) only the chunks no cached file holds are
        fetched, when a source can read byte ranges; ``transfer`` counts bytes by source.
        """
        future = self._inflight.get(sha256)
        if future is None:
            work = self._obtain(sha256, size, list(sources), progress, chunks, transfer)
            future = asyncio.ensure_future(work)
            self._inflight[sha256] = future
            future.add_done_callback(lambda f: self._done(sha256, f))
        return await asyncio.shield(future)

    def _done(self, sha256: str, future: asyncio.Future[Path]) -> None:
        self._inflight.pop(sha256, None)
        self._from_origin.discard(sha256)
        if not future.cancelled():
            future.exception()  # retrieved: waiters that gave up must not make it "unhandled"

    async def verify(self, sha256: str) -> bool:
        path = self.blob_path(sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            self._sizes.pop(sha256, None)
            return False
        if self._verified.get(sha256) == _stat_key(st):
            return True
        if await asyncio.to_thread(sha256_file, path) == sha256:
            self._remember(sha256)
            return True
        log.warning("cached blob %s is corrupt; deleting and fetching it again", sha256)
        self.stats.corrupt += 1
        self._forget(sha256)
        return False

    def _remember(self, sha256: str) -> None:
        """Record that the blob, as it is on disk now, has the right content."""
        with contextlib.suppress(FileNotFoundError):
            self._verified[sha256] = _stat_key(self.blob_path(sha256).stat())
            self._verified_dirty = True

    def save_verified(self) -> None:
        if self._verified_dirty:
            self._verified_dirty = False
            live = {k: v for k, v in self._verified.items() if k in self._sizes}
            write_atomic(self.root / "verified.json", json.dumps(live).encode())

    def _forget(self, sha256: str) -> None:
        self._sizes.pop(sha256, None)
        self._verified.pop(sha256, None)
        for chunk in self._file_chunks.pop(sha256, ()):
            holders = self._holders.get(chunk.sha256, {})
            holders.pop(sha256, None)
            if not holders:
                self._holders.pop(chunk.sha256, None)
            if self._chunk_at.get(chunk.sha256, ("",))[0] == sha256:
                del self._chunk_at[chunk.sha256]
                # a chunk another whole file holds too is found there from now on
                for other, where in holders.items():
                    self._chunk_at[chunk.sha256] = (other, where)
                    break
        with contextlib.suppress(FileNotFoundError):
            self.blob_path(sha256).unlink()

    async def _obtain(
        self,
        sha256: str,
        size: int,
        sources: list[Source],
        progress: Progress | None,
        chunks: tuple[Chunk, ...],
        transfer: Transfer | None,
    ) -> Path:
        transfer = transfer if transfer is not None else Transfer()
        if sha256 in self._sizes and await self.verify(sha256):
            self.stats.hits += 1
            self.note_chunks(sha256, chunks)
            transfer.add("cached", size)
            if progress is not None and size:
                progress(size)
            return self.blob_path(sha256)
        self.stats.misses += 1
        started = time.perf_counter()
        try:
            if self._assembles(sha256, chunks, sources):
                # assembly builds on this module's ledger and types: imported when first used
                from gateway.repository.assembly import assemble

                try:
                    return await assemble(self, sha256, size, chunks, sources, progress, transfer)
                except RangeUnsupported as exc:
                    log.info("%s; fetching blob %s... whole", exc.message, sha256[:12])
            path = await self.download(sha256, size, sources, progress, transfer)
            self.note_chunks(sha256, chunks)
            return path
        finally:
            self.stats.fetch_s += time.perf_counter() - started

    def _assembles(self, sha256: str, chunks: tuple[Chunk, ...], sources: list[Source]) -> bool:
        """Whether to build the file from chunks: when it has a chunk list, a source reads byte
        ranges, and the cache holds some of its chunks (or a build was interrupted). A file of
        which nothing is cached is one stream, whole, as before: peers by blob first (a peer
        fetching it from the origin answers once it has it), then the origin."""
        if not chunks or sha256 in self._whole_only:
            return False
        if all(self.holds_chunk(c.sha256) for c in chunks):
            return True  # a packed file: built here, nothing crosses the link
        if all(s.span is None for s in sources):
            return False
        if (self.tmp_dir / f"{sha256}.chunks.part").exists():
            return True
        return any(self.holds_chunk(c.sha256) for c in chunks)

    async def download(
        self,
        sha256: str,
        size: int,
        sources: list[Source],
        progress: Progress | None,
        transfer: Transfer,
    ) -> Path:
        part = self.tmp_dir / f"{sha256}.part"
        errors: list[str] = []
        reported = 0
        digest = _Digest()

        def report(now: int) -> None:
            nonlocal reported
            if progress is not None and now != reported:
                progress(now - reported)
            reported = now

        for source in sources:
            failures = 0
            while failures < (1 if source.kind == "peer" else ATTEMPTS):
                offset = part.stat().st_size if part.exists() else 0
                if offset > size:
                    part.unlink()
                    offset = 0
                if offset:
                    self.stats.resumes += 1
                report(offset)
                if source.kind == "origin":
                    self._from_origin.add(sha256)
                if digest.length != offset:  # a partial file from before: hash what it has
                    digest = await asyncio.to_thread(_Digest.of_prefix, part, offset)
                try:
                    with tracing.fetching(source.kind, source.name, sha256, digest):
                        await self._stream_into(part, digest, source, size, report, transfer)
                except OSError as exc:  # our own disk (origins raise OriginError): no retry
                    with contextlib.suppress(OSError):
                        part.unlink()
                    raise write_error(self.root, exc, f"blob {sha256[:12]}...") from None
                except OriginMissing as exc:
                    errors.append(exc.message)
                    break
                except OriginError as exc:
                    errors.append(exc.message)
                    if (part.stat().st_size if part.exists() else 0) == offset:
                        failures += 1  # no progress: back off; progress resumes at once
                        await asyncio.sleep(min(0.1 * 2**failures, 1.0))
                    continue
                if self._accept(part, digest, sha256, size):
                    return self.blob_path(sha256)
                digest = _Digest()
                report(0)
                failures += 1
                errors.append(f"{source.name}: content does not match sha256 {sha256[:12]}...")
        raise OriginError(
            f"cannot fetch blob {sha256[:12]}...: " + (errors[-1] if errors else "no source")
        )

    async def _stream_into(
        self,
        part: Path,
        digest: _Digest,
        source: Source,
        size: int,
        report: Callable[[int], None],
        transfer: Transfer,
    ) -> None:
        """Append the source's bytes from ``digest.length`` on, hashing them as they pass, up
        to ``size``: what a source sends past it is never written (the hash then decides).

        No fsync: a blob torn by a crash has a different size or mtime, so it is hashed (and
        refused) before its next use.
        """
        with part.open("ab") as f:
            async with contextlib.aclosing(source.stream(digest.length)) as chunks:
                async for chunk in chunks:
                    more = len(chunk) > size - digest.length
                    if more:
                        chunk = chunk[: size - digest.length]
                    self._append(f, chunk, digest, source)
                    transfer.add(source.kind, len(chunk))
                    report(digest.length)
                    if more:
                        break

    def _append(self, f: Any, chunk: bytes, digest: _Digest, source: Source) -> None:
        f.write(chunk)
        digest.update(chunk)
        self.count(source, len(chunk))

    def count(self, source: Source, size_bytes: int) -> None:
        if source.kind == "peer":
            self.stats.bytes_from_peers += size_bytes
        else:
            self.stats.bytes_from_origin += size_bytes

    # -- files built from chunks (``assembly.py``): their whole-file checks -------------------

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` a moment from now, one piece at a time: the model's load, which
        follows a fetch at once, goes first."""

        async def later() -> None:
            await asyncio.sleep(BACKGROUND_AFTER_S)
            async with self._background_turn:
                await work

        task = asyncio.ensure_future(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def check_built(self) -> None:
        """Start the whole-file checks of the files built from chunks since the last call
        (the edge calls this once their model directory is made, before the load)."""
        for sha256 in self._unchecked:
            self._background(self._check_whole(sha256))
        self._unchecked.clear()

    async def settled(self) -> None:
        """Wait for the work a fetch left running (whole-file checks, old versions packed)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _check_whole(self, sha256: str) -> None:
        """The whole-file sha256 of a file built from chunks (see ``assembly.assemble``),
        hashed in a thread of low priority: the model's load, running meanwhile, goes first."""
        try:
            found = await _in_low_priority_thread(sha256_file, self.blob_path(sha256))
        except OSError:
            return  # gone meanwhile (evicted): nothing to check
        if sha256 not in self._sizes:
            return
        if found == sha256:
            self._remember(sha256)
            self.save_verified()
            return
        log.error(
            "blob %s: its chunks (each checked) do not make up the file its manifest names; "
            "dropped, to be fetched whole",
            sha256,
        )
        self.stats.corrupt += 1
        self._whole_only.add(sha256)
        async with self._room:
            await self._drop_file(sha256)
        self.save_state()
        self.on_dropped(sha256)

    def _accept(self, part: Path, digest: _Digest, sha256: str, size: int) -> bool:
        """Check a finished download's hash and move it into place atomically; drop it if wrong."""
        if digest.hexdigest() != sha256 or digest.length != size:
            self.stats.corrupt += 1
            part.unlink()
            return False
        target = self.blob_path(sha256)
        os.replace(part, target)
        self._sizes[sha256] = digest.length
        self._remember(sha256)
        return True

    async def document(
        self,
        sha256: str,
        sources: Iterable[Source],
        limit_bytes: int,
        protected: set[str],
        keep_blobs: set[str],
    ) -> bytes:
        """A small file of unknown size (a manifest), whole: from the cache, else read into
        memory from the first source that has it, at most ``limit_bytes`` (a source without end
        costs neither memory nor disk), checked against its hash, and written under a
        reservation of its exact size. Small: neither resumed nor single-flight."""
        path = self.complete(sha256)
        if path is not None and await self.verify(sha256):
            self.stats.hits += 1
            return await asyncio.to_thread(path.read_bytes)
        self.stats.misses += 1
        errors: list[str] = []
        for source in sources:
            try:
                data = await _read_whole(source, limit_bytes)
            except (OriginError, OriginMissing) as exc:
                errors.append(exc.message)
                continue
            self.count(source, len(data))
            if source.gzip:
                try:
                    data = gunzip(data, limit_bytes)
                except ValueError as exc:
                    self.stats.corrupt += 1
                    errors.append(f"{source.name}: {exc}")
                    continue
            if hashlib.sha256(data).hexdigest() != sha256:
                self.stats.corrupt += 1
                errors.append(f"{source.name}: content does not match sha256 {sha256[:12]}...")
                continue
            async with self.reserve(len(data), protected, keep_blobs | {sha256}):
                try:
                    write_atomic(self.blob_path(sha256), data)
                except OSError as exc:
                    raise write_error(self.root, exc, f"blob {sha256[:12]}...") from None
                self._sizes[sha256] = len(data)
            self._remember(sha256)
            return data
        raise OriginError(
            f"cannot fetch blob {sha256[:12]}...: " + (errors[-1] if errors else "no source")
        )

    # -- room -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def reserve(
        self, needed_bytes: int, protected: set[str], keep_blobs: set[str]
    ) -> AsyncIterator[None]:
        """Make room for ``needed_bytes`` (:meth:`_make_room`) and hold it."""
        async with self._room:
            await self._make_room(needed_bytes, protected, keep_blobs)
            self._reserved_bytes += needed_bytes
        try:
            yield
        finally:
            self._reserved_bytes -= needed_bytes

    async def _make_room(self, needed: int, protected: set[str], keep_blobs: set[str]) -> None:
        """Give up bytes, cheapest loss first, until ``needed`` more fit under the bound:

        1. files no model uses: packed (when most of their bytes are in other files), else
           dropped; stored chunks no packed file needs;
        2. models neither loaded nor pinned, least recently used first: their files packed
           where that gives up only bytes other files hold (a later load rebuilds them here);
        3. chunks, least recently used first: packed files in the order of their last use,
           each chunk deleted once no packed file needs it (a model listing one is evicted);
        4. whole models, least recently used first, as before chunks.
        """

        if self.used_bytes + self._reserved_bytes + needed <= self.capacity_bytes:
            return
        self._defer_state = True
        try:
            await self._give_up(needed, protected, keep_blobs)
        finally:
            self._defer_state = False
            if self._state_dirty:
                self.save_state()

    async def _give_up(self, needed: int, protected: set[str], keep_blobs: set[str]) -> None:
        """:meth:`_make_room`'s steps."""

        def over() -> int:
            return self.used_bytes + self._reserved_bytes + needed - self.capacity_bytes

        referenced = {sha for rec in self.models.values() for sha in rec.blobs} | keep_blobs
        for sha in [s for s in self._sizes if s not in referenced and self._loose(s)]:
            if not await self._pack(sha, time.time()):
                await self._drop_file(sha)
        self._sweep()
        victims = sorted(
            (name for name in self.models if name not in protected),
            key=lambda n: self.models[n].last_used,
        )
        for name in victims:
            if over() <= 0:
                return
            await self._pack_model(name, keep_blobs)
        # chunks and whole models by their last use, oldest first
        kept = keep_blobs | {
            sha for n in protected if n in self.models for sha in self.models[n].blobs
        }
        order: list[tuple[float, str, str]] = [
            (self._last_use(sha), "packed", sha) for sha in self._packed if sha not in kept
        ]
        order += [(self.models[n].last_used, "model", n) for n in victims]
        for _, kind, key in sorted(order):
            if over() <= 0:
                break
            if kind == "packed" and key in self._packed:
                await self._drop_packed(key, keep_blobs)
            elif kind == "model":
                await self.evict(key, keep_blobs)
        if over() > 0:
            raise Unavailable(
                f"model cache is full: {needed} more bytes needed, {self.used_bytes} bytes held "
                f"by loaded or pinned models, capacity {self.capacity_bytes} bytes"
            )

    def _loose(self, sha256: str) -> bool:
        """Whether nothing in flight is reading or writing the file."""
        return sha256 not in self._inflight and sha256 not in self._seeding

    def _last_use(self, sha256: str) -> float:
        """A packed file's last use: its own, or that of a model listing it, if later."""
        users = [r.last_used for r in self.models.values() if sha256 in r.blobs]
        return max([self._packed[sha256].last_used, *users])

    def _unique(self, sha256: str) -> dict[str, Chunk]:
        """The chunks of a whole file that no other whole file and no stored chunk holds."""
        rows = self._file_chunks.get(sha256, ())
        return {
            c.sha256: c
            for c in rows
            if c.sha256 not in self.store
            and not any(h != sha256 and h in self._sizes for h in self._holders[c.sha256])
        }

    async def _pack(self, sha256: str, last_used: float) -> bool:
        """Pack a whole file no model directory links: store its chunks no other file holds,
        then delete it. Only when that frees at least half of it and the stored chunks fit
        under the bound before the file goes; else False (nothing done)."""
        size = self._sizes.get(sha256)
        if size is None or sha256 not in self._file_chunks or not self._loose(sha256):
            return False
        unique = self._unique(sha256)
        unique_bytes = sum(c.size for c in unique.values())
        if unique_bytes * 2 > size:
            return False
        if self.used_bytes + self._reserved_bytes + unique_bytes > self.capacity_bytes:
            return False
        if not await self.verify(sha256):
            return False
        written = await self._store_chunks(self.blob_path(sha256), list(unique.values()))
        if written is None:
            return False
        self._add_packed(sha256, Packed(self._file_chunks[sha256], last_used))
        self._forget(sha256)
        self.stats.packed += 1
        self.save_state()
        log.info("packed blob %s... (%d bytes of chunks kept apart)", sha256[:12], written)
        return True

    async def _store_chunks(self, path: Path, chunks: list[Chunk]) -> int | None:
        """Copy these chunks of a verified file into the chunk store; None when the file came
        up short or the disk refused (the store keeps what was counted)."""

        def copy() -> list[Chunk] | None:
            done = []
            for chunk in chunks:
                data = _read_at(path, chunk)
                if data is None or hashlib.sha256(data).hexdigest() != chunk.sha256:
                    return None
                try:
                    self.store.write(chunk.sha256, data)
                except OSError:
                    return None
                done.append(chunk)
            return done

        done = await asyncio.to_thread(copy)
        for chunk in chunks if done is not None else ():
            self.store.add(chunk.sha256, chunk.size)
        if done is None:  # count what may be on disk, so the sweep removes it
            for chunk in chunks:
                if self.store.path(chunk.sha256).exists():
                    self.store.add(chunk.sha256, chunk.size)
            return None
        return sum(c.size for c in done)

    async def _drop_file(self, sha256: str) -> None:
        """Delete a whole file, first storing the chunks of it that packed files need and no
        other file holds (a chunk is evicted only when no file needs it). They are copied from
        the end of the file back, cutting it short after each, so the disk holds at most one
        chunk more than before."""
        unique = [c for s, c in self._unique(sha256).items() if s in self._needed]
        if unique:  # each chunk is checked as it is moved
            path = self.blob_path(sha256)
            self._sizes.pop(sha256, None)  # from here on it is cut short: not a source

            def move() -> list[Chunk]:
                done = []
                with contextlib.suppress(OSError):
                    for chunk in sorted(unique, key=lambda c: -c.offset):
                        data = _read_at(path, chunk)
                        if data is None or hashlib.sha256(data).hexdigest() != chunk.sha256:
                            break
                        self.store.write(chunk.sha256, data)
                        done.append(chunk)
                        os.truncate(path, chunk.offset)
                return done

            for chunk in await asyncio.to_thread(move):
                self.store.add(chunk.sha256, chunk.size)
        self._forget(sha256)

    async def _pack_model(self, name: str, keep_blobs: set[str]) -> None:
        """Pack the files of a model (not loaded, not pinned) that other files mostly hold;
        its directory goes, its record stays: a later fetch rebuilds it from chunks here."""
        record = self.models[name]
        users: dict[str, int] = {}
        for rec in self.models.values():
            for sha in rec.blobs:
                users[sha] = users.get(sha, 0) + 1
        worth = [
            sha
            for sha in record.blobs
            if sha in self._sizes
            and sha in self._file_chunks
            and sha not in keep_blobs
            and users[sha] == 1
            and self._loose(sha)
            and sum(c.size for c in self._unique(sha).values()) * 2 <= self._sizes[sha]
        ]
        if not worth:
            return
        shutil.rmtree(self.models_dir / name, ignore_errors=True)
        for sha in worth:
            await self._pack(sha, record.last_used)

    async def _drop_packed(self, sha256: str, keep_blobs: set[str]) -> None:
        """Evict a packed file: a model listing it goes too; then the sweep."""
        self._pop_packed(sha256)
        for name in [n for n, r in self.models.items() if sha256 in r.blobs]:
            await self.evict(name, keep_blobs)
        self._sweep()
        self.save_state()

    def _sweep(self) -> None:
        """Delete stored chunks that no packed file needs or that a whole file holds."""
        for sha in list(self.store.sizes):
            if sha in self._seeding:
                continue
            if sha not in self._needed or sha in self._chunk_at:
                self.store.remove(sha)

    async def evict(self, name: str, keep_blobs: set[str] | None = None) -> None:
        record = self.models.pop(name, None)
        if record is None:
            return
        still = {sha for rec in self.models.values() for sha in rec.blobs} | (keep_blobs or set())
        shutil.rmtree(self.models_dir / name, ignore_errors=True)
        for sha in record.blobs:
            if sha not in still and self._loose(sha):
                if sha in self._sizes:
                    await self._drop_file(sha)
                self._pop_packed(sha)
        self._sweep()
        self.stats.evictions += 1
        self.save_state()
        log.info("evicted model %s from the cache", name)

    async def retire(self, blobs: Iterable[str]) -> None:
        """Files a model no longer lists (an older version): packed at once when most of
        their bytes are in other files (a roll-back then moves nothing over the link); else
        left whole, to go when room is needed."""
        referenced = {sha for rec in self.models.values() for sha in rec.blobs}
        async with self._room:
            for sha in blobs:
                if sha not in referenced and sha in self._sizes:
                    await self._pack(sha, time.time())

    # -- model directories ------------------------------------------------------------------

    def materialise(self, name: str, files: dict[str, str]) -> Path:
        """Make ``models/<name>`` hold exactly ``files`` (relative path -> blob hash)."""
        directory = self.models_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        for rel, sha in files.items():
            target = directory / rel
            blob = self.blob_path(sha)
            with contextlib.suppress(FileNotFoundError):
                if os.path.samefile(target, blob):
                    continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            try:
                os.link(blob, tmp)
            except OSError:
                shutil.copyfile(blob, tmp)
            os.replace(tmp, target)
            if sha in self._verified:
                self._remember(sha)  # a new link changes the blob's ctime, not its content
        self.save_verified()
        wanted = {directory / rel for rel in files}
        for path in sorted(directory.rglob("*"), reverse=True):
            if path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()  # only when empty
            elif path not in wanted:
                path.unlink()
        return directory

    async def record(self, name: str, blobs: dict[str, int]) -> None:
        """Note what ``name`` uses now; files it used before and no model uses are retired."""
        old = self.models.get(name)
        self.models[name] = ModelRecord(dict(blobs), time.time())
        self.save_state()
        if old is not None:  # not on the way to the load: in the background
            self._background(self.retire([sha for sha in old.blobs if sha not in blobs]))

    def touch(self, name: str) -> None:
        record = self.models.get(name)
        if record is not None:
            record.last_used = time.time()


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


async def _in_low_priority_thread(work: Callable[[Path], str], path: Path) -> str:
    """``work(path)`` in a thread of its own at nice 10 (Linux schedules threads apart), so
    the thread pool's threads keep their priority."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    def settle(result: str | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result or "")

    def run() -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        result: str | None = None
        error: BaseException | None = None
        try:
            result = work(path)
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="gateway-check", daemon=True).start()
    return await future


def _read_at(path: Path, chunk: Chunk) -> bytes | None:
    """The chunk's bytes from the file at ``path``; None when it is shorter or gone."""
    try:
        with path.open("rb") as f:
            f.seek(chunk.offset)
            data = f.read(chunk.size)
    except OSError:
        return None
    return data if len(data) == chunk.size else None


class _Digest:
    """A running sha256 and how many bytes went into it."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.length = 0

    def update(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self.length += len(chunk)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    @classmethod
    def of_prefix(cls, path: Path, length: int) -> _Digest:
        digest = cls()
        with path.open("rb") as f:
            while digest.length < length:
                chunk = f.read(min(1 << 20, length - digest.length))
                if not chunk:
                    break
                digest.update(chunk)
        return digest


async def _read_whole(source: Source, limit_bytes: int) -> bytes:
    return await read_bounded(source.stream(0), source.name, limit_bytes)


async def read_bounded(stream: AsyncGenerator[bytes, None], where: str, limit_bytes: int) -> bytes:
    data = bytearray()
    async with contextlib.aclosing(stream) as chunks:
        async for chunk in chunks:
            data += chunk
            if len(data) > limit_bytes:
                raise too_large(where, limit_bytes)
    return bytes(data)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def stats_dict(stats: CacheStats) -> dict[str, Any]:
    return {
        "hits": stats.hits,
        "misses": stats.misses,
        "bytes_from_origin": stats.bytes_from_origin,
        "bytes_from_peers": stats.bytes_from_peers,
        "fetch_s": round(stats.fetch_s, 6),
        "evictions": stats.evictions,
        "corrupt": stats.corrupt,
        "resumes": stats.resumes,
        "bytes_cached": stats.bytes_cached,
        "chunks_fetched": stats.chunks_fetched,
        "chunks_reused": stats.chunks_reused,
        "packed": stats.packed,
        "peer_waits": stats.peer_waits,
    }


__all__ = [
    "BlobCache",
    "CacheStats",
    "CacheWriteError",
    "Source",
    "Transfer",
    "parse_size",
    "stats_dict",
    "write_error",
]
