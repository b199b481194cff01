"""Serving a repository to edges: the published layout and blobs by hash, with Range support.

``GET /v2/repository/tree/{path}`` serves ``models.json``, ``<model>/<v>/manifest.json`` and
``manifest.json.gz`` (computed from the repository directory, with an ETag; the gzip as a file,
never as a ``Content-Encoding``) and the repository's files (several ranges in one request:
``multipart/byteranges``), so a gateway
node's base URL works as an edge's origin. ``GET /v2/repository/blobs/sha256/{hash}`` serves a
file by content: from the repository on a node with a local directory, from the cache on an
edge (peer fill). ``GET /v2/repository/chunks/sha256/{hash}`` serves one content-defined chunk
of such a file (what manifests list) by its hash, checked before it goes out; an edge asked for
a chunk it is fetching answers once it has it (``?rank=``: the asking edge's rank, see
:meth:`EdgeRepository.peer_chunk`). Paths and hashes
are validated strictly; files go out with starlette's
``FileResponse`` (streamed, ``Range`` honoured).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from gateway.dataplane import DataPlane
from gateway.errors import ModelNotFound
from gateway.repository.edge import EdgeRepository
from gateway.repository.local import is_version
from gateway.repository.manifest import (
    INDEX_NAME,
    MANIFEST_GZ_NAME,
    MANIFEST_NAME,
    Publisher,
    check_relpath,
    check_sha256,
)


def _bytes(request: Request, data: bytes, media_type: str = "application/json") -> Response:
    etag = f'"{hashlib.sha256(data).hexdigest()}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return Response(data, media_type=media_type, headers={"ETag": etag})


def _file(path: Path, sha256: str | None = None) -> Response:
    headers = {"ETag": f'"{sha256}"'} if sha256 else None
    return FileResponse(path, media_type="application/octet-stream", headers=headers)


def distribution_routes(dataplane: DataPlane) -> list[Route]:
    repository = dataplane.repository
    # An edge serves the blobs it holds (peers ask it); any other node publishes its repository.
    edge_blob = repository.peer_blob if isinstance(repository, EdgeRepository) else None
    edge_chunk = repository.peer_chunk if isinstance(repository, EdgeRepository) else None
    publisher = None if edge_blob is not None else Publisher(repository.root)

    async def tree(request: Request) -> Response:
        if publisher is None:
            raise ModelNotFound("this node is an edge: it serves blobs by hash, not a tree")
        path = check_relpath(request.path_params["path"])
        parts = path.split("/")
        if path == INDEX_NAME:
            return _bytes(request, await asyncio.to_thread(publisher.index))
        if len(parts) == 3 and parts[2] in (MANIFEST_NAME, MANIFEST_GZ_NAME):
            if not is_version(parts[1]) or int(parts[1]) not in await asyncio.to_thread(
                publisher.versions, parts[0]
            ):
                raise ModelNotFound(f"no version {parts[1]} of model '{parts[0]}'")
            if parts[2] == MANIFEST_GZ_NAME:  # gzip as a file, not a Content-Encoding
                data = await asyncio.to_thread(publisher.manifest_gz, parts[0], int(parts[1]))
                return _bytes(request, data, "application/gzip")
            data = await asyncio.to_thread(publisher.manifest, parts[0], int(parts[1]))
            return _bytes(request, data)
        found = await asyncio.to_thread(publisher.file, path)
        if found is None:
            raise ModelNotFound(f"no file {path!r} in the repository")
        return _file(found)

    async def blob(request: Request) -> Response:
        sha = check_sha256(request.path_params["sha256"])
        if edge_blob is not None:
            found = await edge_blob(sha)
        else:
            assert publisher is not None
            found = await asyncio.to_thread(publisher.blob, sha)
        if found is None:
            raise ModelNotFound(f"no blob {sha}")
        return _file(found, sha)

    async def chunk(request: Request) -> Response:
        sha = check_sha256(request.path_params["sha256"])
        if edge_chunk is not None:
            rank = request.query_params.get("rank", "")
            data = await edge_chunk(sha, int(rank) if rank.isdigit() and len(rank) < 20 else None)
        else:
            assert publisher is not None
            data = await asyncio.to_thread(publisher.chunk, sha)
        if data is None:
            raise ModelNotFound(f"no chunk {sha}")
        return Response(data, media_type="application/octet-stream", headers={"ETag": f'"{sha}"'})

    return [
        Route("/v2/repository/tree/{path:path}", tree, methods=["GET", "HEAD"]),
        Route("/v2/repository/blobs/sha256/{sha256}", blob, methods=["GET", "HEAD"]),
        Route("/v2/repository/chunks/sha256/{sha256}", chunk, methods=["GET", "HEAD"]),
    ]


__all__ = ["distribution_routes"]
