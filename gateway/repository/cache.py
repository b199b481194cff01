"""A content-addressed, verified, bounded local cache of model files.

Layout under the cache directory::

    blobs/sha256/<hash>      complete files, named by their content (verified before any use)
    tmp/<hash>.part          downloads in progress; kept across restarts so they resume
    models/<model>/...       materialised model directories: hard links to blobs (copies where
                             links cannot be made), what ONNX Runtime is pointed at
    state.json               which blobs each model uses and when it was last used (for LRU)

A blob is hashed before its first use by this process and again whenever its inode, size or
mtime changes, so a corrupt or truncated file is never handed out: it is deleted and fetched
again. Downloads are single-flight per hash, streamed to ``tmp/`` in 1 MiB chunks, resumed from
the partial file's length after an interruption, and moved into place with ``os.replace``
only once the hash matches. A download never writes more than the size it was asked for (a
source sending more is cut off there), and small files of unknown size (manifests) are read
into memory up to a bound and written only once verified (:meth:`BlobCache.document`), so
every byte on disk is counted against the byte bound before it is written. The bound is kept
by evicting least-recently-used models that the caller does not protect (loaded or pinned
ones). A write the cache's own disk refuses (full, quota, read-only) is
:class:`CacheWriteError` (503, naming the reason, not the path), and that download's partial
file is removed: it holds space and cannot be finished now.

Why one module of this size: single-flight downloads, resume, verification and the LRU bound
all act on one reservation ledger; split, the invariant "no byte written past the bound"
would be spread over files.
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
import shutil
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import tracing
from gateway.errors import Unavailable
from gateway.repository.manifest import sha256_file
from gateway.repository.origin import OriginError, OriginMissing, too_large

log = logging.getLogger(__name__)

ATTEMPTS = 4  # per source; an attempt that made progress does not count
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)

Stream = Callable[[int], AsyncGenerator[bytes, None]]
Progress = Callable[[int], None]


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
        for path in self.blob_dir.iterdir():
            if len(path.name) == 64:
                self._sizes[path.name] = path.stat().st_size
        self._load_state()
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

    def save_state(self) -> None:
        body = {
            "models": {
                name: {"blobs": rec.blobs, "last_used": rec.last_used}
                for name, rec in self.models.items()
            }
        }
        write_atomic(self.root / "state.json", json.dumps(body, sort_keys=True).encode())

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes.values())

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
    ) -> Path:
        """A verified local copy of the blob: from the cache, else fetched (single-flight).

        ``size`` bounds what is written: the caller has reserved room for it (:meth:`reserve`).
        """
        future = self._inflight.get(sha256)
        if future is None:
            future = asyncio.ensure_future(self._obtain(sha256, size, list(sources), progress))
            self._inflight[sha256] = future
            future.add_done_callback(lambda f: self._done(sha256, f))
        return await asyncio.shield(future)

    def _done(self, sha256: str, future: asyncio.Future[Path]) -> None:
        self._inflight.pop(sha256, None)
        self._from_origin.discard(sha256)
        if not future.cancelled():
            future.exception()  # retrieved: waiters that gave up must not make it "unhandled"

    async def _verify(self, sha256: str) -> bool:
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
        with contextlib.suppress(FileNotFoundError):
            self.blob_path(sha256).unlink()

    async def _obtain(
        self, sha256: str, size: int, sources: list[Source], progress: Progress | None
    ) -> Path:
        if sha256 in self._sizes and await self._verify(sha256):
            self.stats.hits += 1
            if progress is not None and size:
                progress(size)
            return self.blob_path(sha256)
        self.stats.misses += 1
        started = time.perf_counter()
        try:
            return await self._download(sha256, size, sources, progress)
        finally:
            self.stats.fetch_s += time.perf_counter() - started

    async def _download(
        self, sha256: str, size: int, sources: list[Source], progress: Progress | None
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
                        await self._stream_into(part, digest, source, size, report)
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
                    report(digest.length)
                    if more:
                        break

    def _append(self, f: Any, chunk: bytes, digest: _Digest, source: Source) -> None:
        f.write(chunk)
        digest.update(chunk)
        self._count(source, len(chunk))

    def _count(self, source: Source, size_bytes: int) -> None:
        if source.kind == "peer":
            self.stats.bytes_from_peers += size_bytes
        else:
            self.stats.bytes_from_origin += size_bytes

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
        if path is not None and await self._verify(sha256):
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
            self._count(source, len(data))
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
        """Make room for ``needed_bytes`` (evicting LRU unprotected models) and hold it."""
        async with self._room:
            self._make_room(needed_bytes, protected, keep_blobs)
            self._reserved_bytes += needed_bytes
        try:
            yield
        finally:
            self._reserved_bytes -= needed_bytes

    def _make_room(self, needed: int, protected: set[str], keep_blobs: set[str]) -> None:
        def over() -> int:
            return self.used_bytes + self._reserved_bytes + needed - self.capacity_bytes

        if over() <= 0:
            return
        referenced = {sha for rec in self.models.values() for sha in rec.blobs} | keep_blobs
        for sha in [s for s in self._sizes if s not in referenced and s not in self._inflight]:
            self._forget(sha)
        victims = sorted(
            (name for name in self.models if name not in protected),
            key=lambda n: self.models[n].last_used,
        )
        for name in victims:
            if over() <= 0:
                break
            self.evict(name, keep_blobs)
        if over() > 0:
            raise Unavailable(
                f"model cache is full: {needed} more bytes needed, {self.used_bytes} bytes held "
                f"by loaded or pinned models, capacity {self.capacity_bytes} bytes"
            )

    def evict(self, name: str, keep_blobs: set[str] | None = None) -> None:
        record = self.models.pop(name, None)
        if record is None:
            return
        still = {sha for rec in self.models.values() for sha in rec.blobs} | (keep_blobs or set())
        for sha in record.blobs:
            if sha not in still and sha not in self._inflight:
                self._forget(sha)
        shutil.rmtree(self.models_dir / name, ignore_errors=True)
        self.stats.evictions += 1
        self.save_state()
        log.info("evicted model %s from the cache", name)

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

    def record(self, name: str, blobs: dict[str, int]) -> None:
        self.models[name] = ModelRecord(dict(blobs), time.time())
        self.save_state()

    def touch(self, name: str) -> None:
        record = self.models.get(name)
        if record is not None:
            record.last_used = time.time()


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


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
    data = bytearray()
    async with contextlib.aclosing(source.stream(0)) as chunks:
        async for chunk in chunks:
            data += chunk
            if len(data) > limit_bytes:
                raise too_large(source.name, limit_bytes)
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
    }


__all__ = [
    "BlobCache",
    "CacheStats",
    "CacheWriteError",
    "Source",
    "parse_size",
    "stats_dict",
    "write_error",
]
