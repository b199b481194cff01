"""What an origin publishes so edges can fetch and verify a repository: the manifest format.

Layout, beside the ordinary repository (all JSON, UTF-8, keys sorted)::

    <root>/models.json                      the index: every model, its model-level files and
                                            the sha256 of each version's manifest
    <root>/<model>/<version>/manifest.json  one version's files: path, size, sha256
    <root>/<model>/<version>/manifest.json.gz  the same bytes gzipped (``manifests_gzip``)

``models.json``::

    {"format": 1, "manifests_gzip": true,
     "models": {"simple": {"files": [{"path": "config.pbtxt", "size": 412, "sha256": "…"}],
                           "versions": {"1": "<sha256 of 1/manifest.json>"}}}}

``manifests_gzip`` (optional, old readers ignore it): every manifest has a ``.gz`` beside it,
about a third of its bytes (chunk lists are mostly hex hashes); the hash in the index is that
of the plain bytes. It is a file of its own rather than a ``Content-Encoding`` because edges from
before it send aiohttp's default ``Accept-Encoding: gzip`` and hash the body as it comes, and
because static origins and S3 serve files, not negotiated encodings.

``<model>/<version>/manifest.json``::

    {"format": 1, "model": "simple", "version": 1,
     "chunking": {"algorithm": "fastcdc2020", "avg": 65536, "min": 16384, "max": 262144,
                  "max_chunks": 65536},
     "files": [{"path": "model.onnx", "size": 1234, "sha256": "…",
                "chunks": [{"offset": 0, "size": 301234, "sha256": "…"}, …]}]}

Versioning: ``format`` changes only when an old reader would misread the new one (readers
refuse any other ``format``); additions that old readers may ignore keep it. Chunk lists are
such an addition: a file's ``chunks`` (and the manifest's ``chunking``, which says how they were
cut) are optional, an edge that does not know them fetches the file whole, and an edge that does
fetches only the chunks it lacks from a manifest that has them. Chunks are cut by content
(FastCDC 2020, :mod:`pyfastcdc`) so that an edit in one place of a file moves no boundary
elsewhere: a new version of a model that changed one layer shares every other chunk with the
old one. A file of a single chunk lists none.

Model-level file paths are relative to the model directory (only plain files directly in it);
version file paths to the version directory (sub-directories allowed). Because the index names
each manifest's hash, an edge holding the manifest already needs only the index to know nothing
changed, and a file whose hash is unchanged between versions is never fetched twice.

:class:`Publisher` computes all of it from a directory on the fly (hashes memoised by inode,
size and mtime), which is how a gateway node serves its own repository to edges;
:func:`write_manifests` writes the same bytes to disk for static servers, CDNs and S3.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import InvalidInput, ModelLoadError
from gateway.repository.local import check_model_name, is_version

FORMAT = 1
CHUNKING = "fastcdc2020"
# Average chunk size (pyfastcdc's chunks come out ~1.25x this on average): small enough that
# the chunks around a changed 4 MB weight matrix add little to it (on bench/edge.py --delta's
# 100 MB model: 1 MiB adds 39 %, 256 KiB 23 %, 128 KiB 18 %, 64 KiB 2 %; the manifest is
# ~115 bytes a chunk: 150 KB there). A file of more than
# MAX_CHUNKS of them is cut with the average doubled until it has fewer (so a 10 GB model's
# manifest stays a few MB, under max_index_bytes); only a file crossing such a size between
# versions (4 GiB, 8 GiB, ...) shares no chunks with its previous version.
CHUNK_AVG_BYTES = 64 * 1024
MAX_CHUNKS = 65536
MAX_CHUNK_BYTES = 16 * 1024 * 1024  # the largest chunk an edge accepts (pyfastcdc's own bound)
INDEX_NAME = "models.json"
MANIFEST_NAME = "manifest.json"
MANIFEST_GZ_NAME = "manifest.json.gz"  # the same bytes gzipped (see ``manifests_gzip``)
_SHA256 = re.compile(r"[0-9a-f]{64}")  # fullmatch: no trailing newline
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")
_CHUNK_BYTES = 1 << 20
_PUBLISHED = (MANIFEST_NAME, MANIFEST_GZ_NAME, INDEX_NAME)  # never listed as model files


def check_sha256(value: str) -> str:
    if not _SHA256.fullmatch(value):
        raise InvalidInput(f"invalid sha256 {value[:80]!r}")
    return value


def check_relpath(path: str) -> str:
    """A relative ``a/b/c`` path of plain segments: nothing that can climb out of a directory."""
    parts = path.split("/")
    if not path or len(path) > 1024 or any(not _SEGMENT.fullmatch(p) for p in parts):
        raise InvalidInput(f"invalid path {path[:128]!r}")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def dumps(data: Any) -> bytes:
    """The canonical JSON bytes: what is hashed is exactly what is served."""
    return json.dumps(data, sort_keys=True, indent=1).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class Chunk:
    """A byte range of a file, named by its content."""

    offset: int
    size: int
    sha256: str

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    chunks: tuple[Chunk, ...] = ()  # empty: fetched whole

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256}
        if self.chunks:
            body["chunks"] = [
                {"offset": c.offset, "size": c.size, "sha256": c.sha256} for c in self.chunks
            ]
        return body


def chunk_bounds(avg_bytes: int, size: int = 0) -> tuple[int, int, int]:
    """(min, avg, max) chunk sizes for an average: FastCDC's usual avg/4 and avg*4; for a file
    of ``size`` bytes the average doubled until it makes at most ``MAX_CHUNKS`` chunks."""
    while size > avg_bytes * MAX_CHUNKS and avg_bytes < 4 * 1024 * 1024:
        avg_bytes *= 2
    return avg_bytes // 4, avg_bytes, avg_bytes * 4


def hash_and_chunk(path: Path, avg_bytes: int) -> tuple[str, tuple[Chunk, ...]]:
    """The file's sha256 and its content-defined chunks (none when ``avg_bytes`` is 0 or the
    file is one chunk), in one pass over the file."""
    if avg_bytes <= 0 or path.stat().st_size <= avg_bytes // 4:
        return sha256_file(path), ()
    from pyfastcdc import FastCDC

    low, avg, high = chunk_bounds(avg_bytes, path.stat().st_size)
    digest = hashlib.sha256()
    chunks = []
    for piece in FastCDC(avg, min_size=low, max_size=high).cut_file(str(path)):
        digest.update(piece.data)
        chunks.append(Chunk(piece.offset, piece.length, hashlib.sha256(piece.data).hexdigest()))
    return digest.hexdigest(), tuple(chunks) if len(chunks) > 1 else ()


def _parse_chunks(data: Any, size: int, source: str) -> tuple[Chunk, ...]:
    """A file's chunk list, checked to tile the file exactly: in order, no gap, no overlap."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ValueError("'chunks' must be a list")
    out = []
    offset = 0
    for item in data:
        chunk = Chunk(int(item["offset"]), int(item["size"]), check_sha256(item["sha256"]))
        if chunk.offset != offset or not 0 < chunk.size <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk at {chunk.offset} does not continue at {offset}")
        offset = chunk.end
        out.append(chunk)
    if out and offset != size:
        raise ValueError(f"chunks cover {offset} of {size} bytes")
    return tuple(out)


def _files(data: Any, source: str) -> tuple[FileEntry, ...]:
    if not isinstance(data, list):
        raise ModelLoadError(f"{source}: 'files' must be a list")
    out = []
    for item in data:
        try:
            size = int(item["size"])
            entry = FileEntry(
                check_relpath(str(item["path"])),
                size,
                check_sha256(item["sha256"]),
                _parse_chunks(item.get("chunks"), size, source),
            )
        except (KeyError, TypeError, ValueError, InvalidInput) as exc:
            raise ModelLoadError(f"{source}: bad file entry {str(item)[:200]}: {exc}") from None
        if entry.size < 0:
            raise ModelLoadError(f"{source}: negative size for {entry.path}")
        out.append(entry)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ModelIndex:
    """One model in ``models.json``."""

    name: str
    files: tuple[FileEntry, ...]
    versions: dict[int, str]  # version -> sha256 of its manifest
    manifests_gzip: bool = False  # each manifest.json has a manifest.json.gz beside it


@dataclass(frozen=True, slots=True)
class Manifest:
    """One version's ``manifest.json``."""

    model: str
    version: int
    files: tuple[FileEntry, ...]
    chunk_avg_bytes: int = 0  # how its chunks were cut (``chunking``); 0: unknown or none

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


def parse_index(raw: bytes, source: str = INDEX_NAME) -> dict[str, ModelIndex]:
    try:
        data = json.loads(raw)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r} is not {FORMAT}")
        models: dict[str, ModelIndex] = {}
        gz = data.get("manifests_gzip") is True
        for name, body in data["models"].items():
            check_model_name(name)
            versions = {int(v): check_sha256(h) for v, h in body["versions"].items()}
            if any(v < 1 for v in versions):
                raise ValueError(f"model {name}: versions must be >= 1")
            models[name] = ModelIndex(name, _files(body.get("files", []), source), versions, gz)
    except (ValueError, KeyError, TypeError, AttributeError, InvalidInput) as exc:
        raise ModelLoadError(f"{source}: not a repository index: {exc}") from None
    return models


def parse_manifest(raw: bytes, source: str) -> Manifest:
    try:
        data = json.loads(raw)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r} is not {FORMAT}")
        chunking = data.get("chunking") or {}
        manifest = Manifest(
            check_model_name(str(data["model"])),
            int(data["version"]),
            _files(data["files"], source),
            int(chunking.get("avg", 0)) if chunking.get("algorithm") == CHUNKING else 0,
        )
    except (ValueError, KeyError, TypeError, AttributeError, InvalidInput) as exc:
        raise ModelLoadError(f"{source}: not a manifest: {exc}") from None
    return manifest


class Publisher:
    """Index, manifests, files and blobs of a repository directory, computed on demand.

    Every method may hash files: call them from a thread. Nothing whose real path is outside
    the root is listed or served, whichever link on the way (a file's, a version or a model
    directory's) leads out; and only files the index lists are served.
    """

    def __init__(self, root: Path, chunk_avg_bytes: int = CHUNK_AVG_BYTES) -> None:
        self.root = root
        self.chunk_avg_bytes = chunk_avg_bytes  # 0: no chunk lists (the format before them)
        self._hashes: dict[Path, tuple[tuple[int, int, int], str, tuple[Chunk, ...]]] = {}
        self._blobs: dict[str, Path] = {}
        self._chunks: dict[str, tuple[Path, Chunk]] = {}  # chunk sha256 -> file, where
        # (model, version) -> (its files' paths and hashes, manifest bytes, gzipped): a
        # manifest of a large file lists thousands of chunks, too slow to build per request
        self._manifests: dict[tuple[str, int], tuple[tuple[Any, ...], bytes, bytes]] = {}
        self._lock = threading.Lock()

    def _hash(self, path: Path) -> FileEntry:
        st = path.stat()
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._hashes.get(path)
        if known is None or known[0] != key:
            known = (key, *hash_and_chunk(path, self.chunk_avg_bytes))
            with self._lock:
                self._hashes[path] = known
                for chunk in known[2]:
                    self._chunks[chunk.sha256] = (path, chunk)
        return FileEntry("", st.st_size, known[1], known[2])

    def _entries(self, directory: Path, recursive: bool) -> tuple[FileEntry, ...]:
        found: list[FileEntry] = []
        paths = directory.rglob("*") if recursive else directory.iterdir()
        for path in sorted(paths):
            rel = path.relative_to(directory).as_posix()
            if path.name in _PUBLISHED or not path.is_file():
                continue
            if not self._inside(path):
                continue
            if any(not _SEGMENT.fullmatch(p) for p in rel.split("/")):
                continue
            entry = self._hash(path)
            found.append(FileEntry(rel, entry.size, entry.sha256, entry.chunks))
            self._blobs[entry.sha256] = path
        return tuple(found)

    def _inside(self, path: Path) -> bool:
        try:
            path.resolve().relative_to(self.root.resolve())
        except ValueError:
            return False
        return True

    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        names = []
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and _SEGMENT.fullmatch(p.name) and self._inside(p):
                names.append(p.name)
        return names

    def versions(self, model: str) -> list[int]:
        """The model's version directories (inside the root), ascending."""
        directory = self.root / check_model_name(model)
        if not directory.is_dir() or not self._inside(directory):
            return []
        found = []
        for sub in directory.iterdir():
            if sub.is_dir() and is_version(sub.name) and int(sub.name) >= 1 and self._inside(sub):
                found.append(int(sub.name))
        return sorted(found)

    def manifest(self, model: str, version: int) -> bytes:
        return self._manifest(model, version)[0]

    def manifest_gz(self, model: str, version: int) -> bytes:
        """The manifest gzipped (``manifest.json.gz``): a third of the bytes on the wire."""
        return self._manifest(model, version)[1]

    def _manifest(self, model: str, version: int) -> tuple[bytes, bytes]:
        """Manifest bytes and their gzip, built again only when a file of the version changed
        (every file is still stat'ed: hashes are memoised by inode, size and mtime)."""
        directory = self.root / check_model_name(model) / str(version)
        files = self._entries(directory, recursive=True) if self._inside(directory) else ()
        key = tuple((f.path, f.size, f.sha256) for f in files)
        with self._lock:
            known = self._manifests.get((model, version))
        if known is not None and known[0] == key:
            return known[1], known[2]
        raw = self._build_manifest(model, version, files)
        packed = gzip.compress(raw, compresslevel=6, mtime=0)  # the same bytes every time
        with self._lock:
            self._manifests[(model, version)] = (key, raw, packed)
        return raw, packed

    def _build_manifest(self, model: str, version: int, files: tuple[FileEntry, ...]) -> bytes:
        body: dict[str, Any] = {
            "format": FORMAT,
            "model": model,
            "version": version,
            "files": [f.to_dict() for f in files],
        }
        if self.chunk_avg_bytes:
            low, avg, high = chunk_bounds(self.chunk_avg_bytes)
            body["chunking"] = {
                "algorithm": CHUNKING,
                "avg": avg,
                "min": low,
                "max": high,
                "max_chunks": MAX_CHUNKS,  # a larger file: avg (and min, max) doubled
            }
        return dumps(body)

    def index(self) -> bytes:
        models: dict[str, Any] = {}
        for name in self.model_names():
            directory = self.root / name
            versions = {}
            for version in self.versions(name):
                raw = self.manifest(name, version)
                versions[str(version)] = hashlib.sha256(raw).hexdigest()
            files = self._entries(directory, recursive=False)
            models[name] = {"files": [f.to_dict() for f in files], "versions": versions}
        return dumps({"format": FORMAT, "manifests_gzip": True, "models": models})

    def file(self, relpath: str) -> Path | None:
        """A plain file of the repository by its ``<model>/...`` path, or None."""
        check_relpath(relpath)
        path = self.root / relpath
        if not path.is_file() or not self._inside(path):
            return None
        return path

    def blob(self, sha256: str) -> Path | None:
        """A file with this content, if the repository has one (hashes it on first ask)."""
        check_sha256(sha256)
        path = self._blobs.get(sha256)
        if path is None:
            self.index()
            path = self._blobs.get(sha256)
        if path is None or not path.is_file() or not self._inside(path):
            return None  # gone, or a link on its way now leads out of the root
        if self._hash(path).sha256 != sha256:
            return None
        return path

    def chunk(self, sha256: str) -> bytes | None:
        """A chunk's bytes by its hash (checked: the file may have changed since it was cut)."""
        check_sha256(sha256)
        if sha256 not in self._chunks:
            self.index()
        found = self._chunks.get(sha256)
        if found is None:
            return None
        path, chunk = found
        if not path.is_file() or not self._inside(path):
            return None
        with path.open("rb") as f:
            f.seek(chunk.offset)
            data = f.read(chunk.size)
        return data if hashlib.sha256(data).hexdigest() == sha256 else None


def write_manifests(root: Path, chunk_avg_bytes: int = CHUNK_AVG_BYTES) -> dict[str, int]:
    """Write every ``<model>/<version>/manifest.json`` and ``models.json`` under ``root``.

    Files are replaced atomically. Returns model -> number of versions. ``chunk_avg_bytes`` 0:
    no chunk lists (what edges before them published).
    """
    publisher = Publisher(root, chunk_avg_bytes)
    counts: dict[str, int] = {}
    for name in publisher.model_names():
        counts[name] = 0
        for version in publisher.versions(name):
            raw, packed = publisher._manifest(name, version)
            _atomic_write(root / name / str(version) / MANIFEST_GZ_NAME, packed)
            _atomic_write(root / name / str(version) / MANIFEST_NAME, raw)
            counts[name] += 1
    _atomic_write(root / INDEX_NAME, publisher.index())
    return counts


def gunzip(data: bytes, limit_bytes: int) -> bytes:
    """A gzip member's content, refused past ``limit_bytes`` (no bomb fills memory) or when
    cut short or not gzip: ``ValueError``."""
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflate.decompress(data, limit_bytes + 1)
    except zlib.error as exc:
        raise ValueError(f"not gzip: {exc}") from None
    if len(out) > limit_bytes:
        raise ValueError(f"more than {limit_bytes} bytes once unpacked")
    if not inflate.eof:
        raise ValueError("gzip data cut short")
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
