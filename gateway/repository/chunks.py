"""The edge cache's chunk store: content-defined chunks kept alone, by their sha256.

Model files stay whole in the blob cache while a model may be loaded from them (ONNX Runtime
is pointed at a file; sub-file ranges cannot be hard-linked or reflinked, so a file assembled
from stored chunks on every load would be a second copy and a copy on the load path). A file
no model directory needs any more (an old version, or a model packed to make room) is *packed*:
its chunks that no whole file holds are written here and the file is deleted, so two versions
sharing 95% of their bytes take ~1.05x one version's room. A packed file is rebuilt locally
(no link traffic) when it is wanted again. Every byte on disk is counted once: whole files by
their size, stored chunks by theirs.

Chunks are written atomically and checked against their hash whenever read; this module knows
nothing of files or models (the blob cache decides what to keep: :mod:`gateway.repository.cache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path


class ChunkStore:
    """``chunks/sha256/<hash>``: one file per chunk; sizes known in memory."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "chunks" / "sha256"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sizes: dict[str, int] = {}
        for path in self.dir.iterdir():
            if len(path.name) == 64:
                self.sizes[path.name] = path.stat().st_size
            elif path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write interrupted by a crash

    @property
    def used_bytes(self) -> int:
        return sum(self.sizes.values())

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self.sizes

    def path(self, sha256: str) -> Path:
        return self.dir / sha256

    def write(self, sha256: str, data: bytes) -> None:
        """Write a chunk the caller has checked (safe in a thread; :meth:`add` counts it)."""
        target = self.path(sha256)
        tmp = target.with_name(f".{sha256}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def add(self, sha256: str, size: int) -> None:
        """Count a chunk :meth:`write` put in place (on the event loop)."""
        self.sizes[sha256] = size

    def read(self, sha256: str) -> bytes | None:
        """The chunk's bytes if present and right (safe in a thread; the caller drops a
        corrupt one with :meth:`remove`)."""
        try:
            data = self.path(sha256).read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == sha256 else None

    def remove(self, sha256: str) -> None:
        self.sizes.pop(sha256, None)
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()


__all__ = ["ChunkStore"]
