"""What an origin publishes so edges can fetch and verify a repository: the manifest format.

Layout, beside the ordinary repository (all JSON, UTF-8, keys sorted)::

    <root>/models.json                      the index: every model, its model-level files and
                                            the sha256 of each version's manifest
    <root>/<model>/<version>/manifest.json  one version's files: path, size, sha256

``models.json``::

    {"format": 1,
     "models": {"simple": {"files": [{"path": "config.pbtxt", "size": 412, "sha256": "…"}],
                           "versions": {"1": "<sha256 of 1/manifest.json>"}}}}

``<model>/<version>/manifest.json``::

    {"format": 1, "model": "simple", "version": 1,
     "files": [{"path": "model.onnx", "size": 1234, "sha256": "…"}]}

Model-level file paths are relative to the model directory (only plain files directly in it);
version file paths to the version directory (sub-directories allowed). Because the index names
each manifest's hash, an edge holding the manifest already needs only the index to know nothing
changed, and a file whose hash is unchanged between versions is never fetched twice.

:class:`Publisher` computes all of it from a directory on the fly (hashes memoised by inode,
size and mtime), which is how a gateway node serves its own repository to edges;
:func:`write_manifests` writes the same bytes to disk for static servers, CDNs and S3.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import InvalidInput, ModelLoadError
from gateway.repository.local import check_model_name, is_version

FORMAT = 1
INDEX_NAME = "models.json"
MANIFEST_NAME = "manifest.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")  # fullmatch: no trailing newline
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")
_CHUNK_BYTES = 1 << 20


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
class FileEntry:
    path: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def _files(data: Any, source: str) -> tuple[FileEntry, ...]:
    if not isinstance(data, list):
        raise ModelLoadError(f"{source}: 'files' must be a list")
    out = []
    for item in data:
        try:
            entry = FileEntry(
                check_relpath(str(item["path"])), int(item["size"]), check_sha256(item["sha256"])
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


@dataclass(frozen=True, slots=True)
class Manifest:
    """One version's ``manifest.json``."""

    model: str
    version: int
    files: tuple[FileEntry, ...]

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


def parse_index(raw: bytes, source: str = INDEX_NAME) -> dict[str, ModelIndex]:
    try:
        data = json.loads(raw)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r} is not {FORMAT}")
        models: dict[str, ModelIndex] = {}
        for name, body in data["models"].items():
            check_model_name(name)
            versions = {int(v): check_sha256(h) for v, h in body["versions"].items()}
            if any(v < 1 for v in versions):
                raise ValueError(f"model {name}: versions must be >= 1")
            models[name] = ModelIndex(name, _files(body.get("files", []), source), versions)
    except (ValueError, KeyError, TypeError, AttributeError, InvalidInput) as exc:
        raise ModelLoadError(f"{source}: not a repository index: {exc}") from None
    return models


def parse_manifest(raw: bytes, source: str) -> Manifest:
    try:
        data = json.loads(raw)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r} is not {FORMAT}")
        manifest = Manifest(
            check_model_name(str(data["model"])),
            int(data["version"]),
            _files(data["files"], source),
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

    def __init__(self, root: Path) -> None:
        self.root = root
        self._hashes: dict[Path, tuple[tuple[int, int, int], str]] = {}
        self._blobs: dict[str, Path] = {}
        self._lock = threading.Lock()

    def _hash(self, path: Path) -> FileEntry:
        st = path.stat()
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._hashes.get(path)
        if known is None or known[0] != key:
            known = (key, sha256_file(path))
            with self._lock:
                self._hashes[path] = known
        return FileEntry("", st.st_size, known[1])

    def _entries(self, directory: Path, recursive: bool) -> tuple[FileEntry, ...]:
        found: list[FileEntry] = []
        paths = directory.rglob("*") if recursive else directory.iterdir()
        for path in sorted(paths):
            rel = path.relative_to(directory).as_posix()
            if path.name in (MANIFEST_NAME, INDEX_NAME) or not path.is_file():
                continue
            if not self._inside(path):
                continue
            if any(not _SEGMENT.fullmatch(p) for p in rel.split("/")):
                continue
            entry = self._hash(path)
            found.append(FileEntry(rel, entry.size, entry.sha256))
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
        directory = self.root / check_model_name(model) / str(version)
        files = self._entries(directory, recursive=True) if self._inside(directory) else ()
        body = {
            "format": FORMAT,
            "model": model,
            "version": version,
            "files": [f.to_dict() for f in files],
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
        return dumps({"format": FORMAT, "models": models})

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


def write_manifests(root: Path) -> dict[str, int]:
    """Write every ``<model>/<version>/manifest.json`` and ``models.json`` under ``root``.

    Files are replaced atomically. Returns model -> number of versions.
    """
    publisher = Publisher(root)
    counts: dict[str, int] = {}
    for name in publisher.model_names():
        counts[name] = 0
        for version in publisher.versions(name):
            _atomic_write(
                root / name / str(version) / MANIFEST_NAME, publisher.manifest(name, version)
            )
            counts[name] += 1
    _atomic_write(root / INDEX_NAME, publisher.index())
    return counts


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
