"""Where an edge fetches a repository from: ``file://``, ``http(s)://`` and ``s3://`` origins.

Every origin offers the same calls over the published layout (see
:mod:`gateway.repository.manifest`): the index with a cheap "unchanged?" validator, read whole
but never more than ``limit_bytes`` of it, and files as a stream starting at a byte offset
(resume), optionally ending before ``end`` (a byte range: the chunks an edge lacks; an HTTP
server that ignores ``Range`` then is :class:`RangeUnsupported`, and the edge fetches whole).
An HTTP origin is asked for several ranges in one request (:meth:`HttpOrigin.ranges`:
``multipart/byteranges``); one that answers such a request with the whole file or one range is
asked one range at a time after that. Files go out with ``Accept-Encoding: identity`` (their
bytes are hashed); the index accepts gzip (a CDN's) and is unpacked here, within its bound.
Library exceptions are mapped here to :class:`OriginError` (retry may work: 503) and
:class:`OriginMissing` (the origin has no such file), so the cache never sees aiohttp or botocore.
Their messages name URLs: they are for the log; the edge tells clients less.

An origin may be compromised, or reached through a man in the middle on plain http: an HTTP
origin follows redirects only within its own origin (scheme, host and port), at most
``MAX_REDIRECTS`` of them; a redirect to any other host is an :class:`OriginError`.

A gateway node is an HTTP origin too: give its base URL; when ``<base>/models.json`` is not
there the client tries the node's ``<base>/v2/repository/tree/`` once and keeps that prefix.

Why one module of this size: the three origins are one protocol with one error mapping, and
each is short; the HTTP one is most of the file (redirect rule, multi-range, gzip index). What
could split next is :class:`HttpOrigin`'s multipart reader.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from gateway import tracing
from gateway.errors import ModelNotFound, Unavailable
from gateway.repository.manifest import INDEX_NAME, gunzip
from gateway.settings import SettingsError

CHUNK_BYTES = 1 << 20
TREE_PREFIX = "v2/repository/tree/"
BLOB_PREFIX = "v2/repository/blobs/sha256/"
CHUNK_PREFIX = "v2/repository/chunks/sha256/"
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


class OriginError(Unavailable):
    """The origin (or a peer) could not be reached or broke off; a retry may work."""


class OriginMissing(ModelNotFound):
    """The origin answered, and it has no such file."""


class RangeUnsupported(OriginError):
    """The origin answered a byte-range request with the whole file (no ``Range`` support)."""


class MultiRangeUnsupported(OriginError):
    """The origin answers a request for several byte ranges with the whole file: ask it for
    one range at a time (S3 and many CDNs never do several)."""


class OriginTooLarge(OriginError):
    """The origin sent more than the bound for a document read whole (an index, a manifest)."""


def too_large(where: str, limit_bytes: int) -> OriginTooLarge:
    return OriginTooLarge(f"{where}: more than {limit_bytes} bytes, refused (max_index_bytes)")


class Origin(Protocol):
    url: str

    async def index(
        self, validator: str | None, limit_bytes: int
    ) -> tuple[bytes | None, str | None]:
        """``models.json`` and its validator; ``None`` bytes when unchanged since ``validator``.
        :class:`OriginTooLarge` when it is longer than ``limit_bytes``."""
        ...

    def stream(
        self, relpath: str, offset: int, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The file's bytes from ``offset`` on (up to ``end``, exclusive, when given)."""
        ...

    async def close(self) -> None: ...


class FileOrigin:
    """A repository directory reached through the file system (NFS, a mounted volume)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.root = Path(unquote(urlsplit(url).path))

    def _path(self, relpath: str) -> Path:
        return self.root / relpath

    async def index(
        self, validator: str | None, limit_bytes: int
    ) -> tuple[bytes | None, str | None]:
        path = self._path(INDEX_NAME)
        try:
            st = await asyncio.to_thread(path.stat)
            tag = f"{st.st_mtime_ns}-{st.st_size}"
            if tag == validator:
                return None, tag
            data = await asyncio.to_thread(_read_at_most, path, limit_bytes + 1)
        except FileNotFoundError:
            raise OriginMissing(f"{self.url}: no {INDEX_NAME} (run `gateway manifest`)") from None
        except OSError as exc:
            raise OriginError(f"{self.url}: {exc}") from None
        if len(data) > limit_bytes:
            raise too_large(f"{self.url}/{INDEX_NAME}", limit_bytes)
        return data, tag

    async def stream(
        self, relpath: str, offset: int, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        try:
            f = await asyncio.to_thread(self._path(relpath).open, "rb")
        except FileNotFoundError:
            raise OriginMissing(f"{self.url}: no {relpath}") from None
        except OSError as exc:
            raise OriginError(f"{self.url}/{relpath}: {exc}") from None
        try:
            f.seek(offset)
            left = end - offset if end is not None else None
            while left is None or left > 0:
                step = CHUNK_BYTES if left is None else min(CHUNK_BYTES, left)
                chunk = await asyncio.to_thread(f.read, step)
                if not chunk:
                    break
                if left is not None:
                    left -= len(chunk)
                yield chunk
        except OSError as exc:
            raise OriginError(f"{self.url}/{relpath}: {exc}") from None
        finally:
            f.close()

    async def close(self) -> None:
        pass


class HttpOrigin:
    """A static server, a CDN, or another gateway node (or a peer edge's blob endpoint)."""

    def __init__(self, url: str, connect_timeout_s: float = 5.0, read_timeout_s: float = 30.0):
        self.url = url.rstrip("/")
        self._prefix: str | None = None  # "" or TREE_PREFIX once known
        self.multi_range: bool | None = None  # answers several ranges at once; None: not asked
        self._timeouts = (connect_timeout_s, read_timeout_s)
        self._session: Any = None

    def _client(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            connect_s, read_s = self._timeouts
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=connect_s, sock_read=read_s),
                auto_decompress=False,
            )
        return self._session

    def _url(self, relpath: str) -> str:
        return f"{self.url}/{self._prefix or ''}{relpath}"

    async def _get(self, url: str, headers: dict[str, str]) -> Any:
        """The response to a GET, following redirects only within this origin."""
        import aiohttp
        from yarl import URL

        target = URL(url)
        if tracing.enabled:  # peers and gateway origins continue the trace
            tracing.inject(headers)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                # aiohttp sends a GET once more on a new connection when the server closed
                # the pooled one as it went out (its idle limit racing the request)
                response = await self._client().get(target, headers=headers, allow_redirects=False)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise OriginError(f"{target}: {type(exc).__name__}: {exc}") from None
            if response.status in _REDIRECTS:
                location = response.headers.get("Location", "")
                response.release()
                try:
                    moved = target.join(URL(location))
                except ValueError:
                    raise OriginError(f"{target}: bad redirect {location[:200]!r}") from None
                if _origin_of(moved) != _origin_of(target):
                    raise OriginError(
                        f"{target}: redirect to {moved} not followed (another origin)"
                    )
                target = moved
                continue
            if response.status == 404:
                response.release()
                raise OriginMissing(f"{target}: 404 not found")
            if response.status not in (200, 206, 304):
                response.release()
                raise OriginError(f"{target}: HTTP {response.status}")
            return response
        raise OriginError(f"{url}: more than {MAX_REDIRECTS} redirects")

    async def index(
        self, validator: str | None, limit_bytes: int
    ) -> tuple[bytes | None, str | None]:
        headers = {"Accept-Encoding": "gzip"}  # unpacked here (see ``_body``)
        if validator:
            kind, _, value = validator.partition(":")
            headers["If-None-Match" if kind == "etag" else "If-Modified-Since"] = value
        if self._prefix is None:
            try:
                response = await self._get(self._url(INDEX_NAME), headers)
                self._prefix = ""
            except OriginMissing:
                self._prefix = TREE_PREFIX
                response = await self._get(self._url(INDEX_NAME), headers)
        else:
            response = await self._get(self._url(INDEX_NAME), headers)
        async with response:
            if response.status == 304:
                return None, validator
            body = await self._body(response, limit_bytes)
            encoding = response.headers.get("Content-Encoding", "identity").lower()
            if encoding == "gzip":
                try:
                    body = gunzip(body, limit_bytes)
                except ValueError as exc:
                    raise OriginError(f"{response.url}: {exc}") from None
            elif encoding != "identity":
                raise OriginError(f"{response.url}: Content-Encoding {encoding[:40]} not asked")
            etag = response.headers.get("ETag")
            modified = response.headers.get("Last-Modified")
            tag = f"etag:{etag}" if etag else (f"date:{modified}" if modified else None)
            return body, tag

    async def _body(self, response: Any, limit_bytes: int) -> bytes:
        """The whole body, refused (and the connection closed) past ``limit_bytes``."""
        import aiohttp

        declared = response.content_length
        if declared is not None and declared > limit_bytes:
            response.close()
            raise too_large(str(response.url), limit_bytes)
        body = bytearray()
        try:
            async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                body += chunk
                if len(body) > limit_bytes:
                    response.close()
                    raise too_large(str(response.url), limit_bytes)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise OriginError(f"{response.url}: {type(exc).__name__}: {exc}") from None
        return bytes(body)

    async def stream(
        self, relpath: str, offset: int, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        import aiohttp

        by_hash = relpath.startswith((BLOB_PREFIX, CHUNK_PREFIX))
        if self._prefix is None and not by_hash:
            await self._find_prefix()
        url = f"{self.url}/{relpath}" if by_hash else self._url(relpath)
        # bytes as stored: they are hashed (a CDN must not gzip them on the way)
        headers = {"Accept-Encoding": "identity"}
        if offset or end is not None:
            headers["Range"] = _range(offset, end)
        response = await self._get(url, headers)
        async with response:
            if end is not None and response.status == 200:
                response.close()
                raise RangeUnsupported(f"{url}: no Range support (HTTP 200 to a range request)")
            skip = offset if offset and response.status == 200 else 0  # no Range support
            try:
                async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                    if skip:
                        if len(chunk) <= skip:
                            skip -= len(chunk)
                            continue
                        chunk, skip = chunk[skip:], 0
                    yield chunk
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise OriginError(f"{url}: {type(exc).__name__}: {exc}") from None

    async def ranges(
        self, relpath: str, spans: list[tuple[int, int]]
    ) -> AsyncGenerator[tuple[int, bytes], None]:
        """Several byte ranges ``[start, end)`` of a file (ascending, apart) in one request:
        ``(file offset, bytes)`` pieces, each range's in order. A ``multipart/byteranges``
        answer gives them all; one range (a server that merged them or answers only the first)
        gives what it covers, and the caller asks for the rest one range at a time; a whole
        file (200) is :class:`MultiRangeUnsupported`, closed at once, and this origin is then
        never asked for several ranges again."""
        import aiohttp

        if self.multi_range is False:
            raise MultiRangeUnsupported(f"{self.url}: one range per request")
        if self._prefix is None:
            await self._find_prefix()
        url = self._url(relpath)
        wanted = ",".join(f"{start}-{end - 1}" for start, end in spans)
        headers = {"Accept-Encoding": "identity", "Range": f"bytes={wanted}"}
        response = await self._get(url, headers)
        bound = spans[-1][1] - spans[0][0]  # no answer is longer than what the ranges span
        async with response:
            if response.status != 206:
                response.close()
                self.multi_range = False
                raise MultiRangeUnsupported(f"{url}: HTTP {response.status} to several ranges")
            try:
                kind = response.headers.get("Content-Type", "")
                if not kind.lower().startswith("multipart/byteranges"):
                    start, end = _content_range(response.headers.get("Content-Range"), url)
                    if not any(start <= a and b <= end for a, b in spans[1:]):
                        self.multi_range = False  # answers the first range only
                    async for piece in _part(response.content.read, start, end, bound, url):
                        yield piece
                    return
                self.multi_range = True
                reader = aiohttp.MultipartReader(response.headers, response.content)
                while (part := await reader.next()) is not None:
                    if not isinstance(part, aiohttp.BodyPartReader):
                        raise OriginError(f"{url}: a nested multipart answer")
                    start, end = _content_range(part.headers.get("Content-Range"), url)
                    bound -= end - start
                    if bound < 0:
                        raise OriginError(f"{url}: more bytes than the ranges asked for")
                    async for piece in _part(part.read_chunk, start, end, end - start, url):
                        yield piece
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                raise OriginError(f"{url}: {type(exc).__name__}: {exc}") from None

    async def _find_prefix(self) -> None:
        """Whether files are at ``<base>/`` or (a gateway node) ``<base>/v2/repository/tree/``."""
        for prefix in ("", TREE_PREFIX):
            self._prefix = prefix
            try:
                response = await self._get(self._url(INDEX_NAME), {})
            except OriginMissing:
                continue
            response.close()  # the body is not needed
            return

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class S3Origin:
    """``s3://bucket/prefix``: the S3 API through boto3 (run in threads).

    Credentials, region and endpoint come from boto3's usual sources (``AWS_*`` variables,
    ``AWS_ENDPOINT_URL_S3`` for S3-compatible stores such as MinIO).
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self._client: Any = None

    def _s3(self) -> Any:
        if self._client is None:
            try:
                import boto3  # type: ignore[import-untyped,unused-ignore]
            except ImportError:
                raise SettingsError("s3:// origins need boto3: pip install 'gateway[s3]'") from None
            self._client = boto3.client("s3")
        return self._client

    def _key(self, relpath: str) -> str:
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def _map(self, exc: Exception, relpath: str) -> Exception:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NoSuchBucket"):
            return OriginMissing(f"{self.url}: no {relpath}")
        return OriginError(f"{self.url}/{relpath}: {type(exc).__name__}: {exc}")

    async def _get(self, relpath: str, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(
                self._s3().get_object, Bucket=self.bucket, Key=self._key(relpath), **kwargs
            )
        except SettingsError:
            raise
        except Exception as exc:  # botocore's tree is wide; map them all at this edge
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code == "304":
                return None
            raise self._map(exc, relpath) from None

    async def index(
        self, validator: str | None, limit_bytes: int
    ) -> tuple[bytes | None, str | None]:
        kwargs = {"IfNoneMatch": validator} if validator else {}
        response = await self._get(INDEX_NAME, **kwargs)
        if response is None:
            return None, validator
        body = response["Body"]
        try:
            if int(response.get("ContentLength") or 0) > limit_bytes:
                raise too_large(f"{self.url}/{INDEX_NAME}", limit_bytes)
            data = bytes(await asyncio.to_thread(body.read, limit_bytes + 1))
        except OriginError:
            raise
        except Exception as exc:
            raise self._map(exc, INDEX_NAME) from None
        finally:
            body.close()
        if len(data) > limit_bytes:
            raise too_large(f"{self.url}/{INDEX_NAME}", limit_bytes)
        return data, response.get("ETag")

    async def stream(
        self, relpath: str, offset: int, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        kwargs = {"Range": _range(offset, end)} if offset or end is not None else {}
        response = await self._get(relpath, **kwargs)
        body = response["Body"]
        try:
            while chunk := await asyncio.to_thread(body.read, CHUNK_BYTES):
                yield chunk
        except Exception as exc:
            raise self._map(exc, relpath) from None
        finally:
            body.close()

    async def close(self) -> None:
        pass


def open_origin(url: str) -> Origin:
    """The origin client for a ``file://``, ``http(s)://`` or ``s3://`` URL."""
    scheme = urlsplit(url).scheme
    if scheme == "file":
        return FileOrigin(url)
    if scheme in ("http", "https"):
        return HttpOrigin(url)
    if scheme == "s3":
        if not urlsplit(url).netloc:
            raise SettingsError(f"model_repo {url!r}: s3:// needs a bucket")
        return S3Origin(url)
    raise SettingsError(f"model_repo {url!r}: scheme must be file, http, https or s3")


def is_url(model_repo: str) -> bool:
    return "://" in model_repo


def _range(offset: int, end: int | None) -> str:
    """The ``Range`` header value for bytes ``[offset, end)`` (``end`` None: to the end)."""
    return f"bytes={offset}-" if end is None else f"bytes={offset}-{end - 1}"


def _content_range(value: str | None, url: str) -> tuple[int, int]:
    """``bytes a-b/size`` -> ``(a, b + 1)``."""
    unit, _, rest = (value or "").strip().partition(" ")
    first, _, last = rest.partition("/")[0].partition("-")
    if unit.lower() != "bytes" or not first.isdigit() or not last.isdigit():
        raise OriginError(f"{url}: bad Content-Range {str(value)[:80]!r}")
    start, end = int(first), int(last) + 1
    if end <= start:
        raise OriginError(f"{url}: bad Content-Range {str(value)[:80]!r}")
    return start, end


async def _part(
    read: Callable[[int], Awaitable[bytes]], start: int, end: int, bound: int, url: str
) -> AsyncGenerator[tuple[int, bytes], None]:
    """A range's bytes as ``(offset, bytes)`` pieces, read from a response's body or a
    multipart part; an error when it runs past its ``Content-Range``."""
    at = start
    while chunk := await read(CHUNK_BYTES):
        if at + len(chunk) > end or at + len(chunk) - start > bound:
            raise OriginError(f"{url}: a range longer than its Content-Range")
        yield at, chunk
        at += len(chunk)


def _origin_of(url: Any) -> tuple[str, str | None, int | None]:
    return (url.scheme, url.host, url.port)


def _read_at_most(path: Path, size_bytes: int) -> bytes:
    with path.open("rb") as f:
        return f.read(size_bytes)


__all__ = [
    "FileOrigin",
    "HttpOrigin",
    "MultiRangeUnsupported",
    "Origin",
    "OriginError",
    "OriginMissing",
    "OriginTooLarge",
    "RangeUnsupported",
    "S3Origin",
    "is_url",
    "open_origin",
]
