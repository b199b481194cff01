"""Model files pushed with a repository load request (``parameters["file:<version>/<path>"]``),
as Triton's repository extension takes them: checked before any file access, then written into a
fresh scratch directory laid out as a repository model, which the data plane loads and removes
with the model.
"""

from __future__ import annotations

import posixpath
import shutil
import tempfile
from pathlib import Path

from gateway.errors import InvalidInput
from gateway.repository.local import is_version

__all__ = ["check_file_key", "write_pushed_files"]


def check_file_key(key: str) -> str:
    """``file:<version>/<name>`` -> a safe relative path inside the model directory."""
    rel = key[len("file:") :]
    norm = posixpath.normpath(rel)
    parts = norm.split("/")
    if (
        not rel
        or "\\" in rel
        or "\x00" in rel
        or norm.startswith("/")
        or ".." in parts
        or len(parts) < 2
        or not is_version(parts[0])
    ):
        raise InvalidInput(f"invalid file path {rel[:128]!r}: expected '<version>/<file name>'")
    return norm


def write_pushed_files(name: str, files: dict[str, bytes]) -> Path:
    """Files pushed with a load request, in a fresh directory laid out as a repository model."""
    paths = {check_file_key(key): data for key, data in files.items()}
    for rel in paths:
        parent = posixpath.dirname(rel)
        while parent:
            if parent in paths:
                raise InvalidInput(f"file path '{parent}' is also a directory of '{rel}'")
            parent = posixpath.dirname(parent)
    scratch = Path(tempfile.mkdtemp(prefix=f"gateway-{name}-"))
    try:
        for rel, data in paths.items():
            target = scratch / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return scratch
