"""Attacks on edge replicas and on the repository publisher (real servers on loopback).

A compromised origin (or a man in the middle on plain http) is played by aiohttp applications
that misbehave on purpose: an index or a manifest without end, redirects to another host. The
edge must keep its memory and its disk within their bounds, keep internal URLs to itself, and
not let made-up model names drive traffic to the origin or grow its state.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from gateway.errors import GatewayError, ModelNotFound, Unavailable
from gateway.repository.edge import EdgeRepository
from gateway.repository.manifest import Publisher, write_manifests
from gateway.settings import Settings
from tests import models
from tests.edge_origins import SIMPLE_INPUTS, AppServer, FakeOrigin, build_repo
from tests.helpers import free_port, start_gateway

CAP_BYTES = 64 * 1024  # max_index_bytes in these tests
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture(scope="module")
def origin_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repo(tmp_path_factory.mktemp("origin"))


def edge(url: str, cache: Path, **kwargs: object) -> EdgeRepository:
    return EdgeRepository(Settings(model_repo=url, cache_dir=str(cache), **kwargs))  # type: ignore[arg-type]


def origin_app(root: Path, routes: dict[str, Handler]) -> web.Application:
    """The repository's files, except the paths ``routes`` answers its own way."""

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        if path in routes:
            return await routes[path](request)
        file = root / path
        if ".." in path or not file.is_file():
            return web.Response(status=404)
        return web.FileResponse(file)

    app = web.Application()
    app.router.add_get("/{path:.*}", handle)
    return app


def endless(tail: bytes, sent: list[int], total_bytes: int) -> Handler:
    """A chunked body of ``total_bytes`` spaces, then ``tail``: valid JSON if ``tail`` is, so
    only a reader that stops at its bound refuses it. ``sent`` counts what went out."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b" " * 65536
        try:
            while sent[0] < total_bytes:
                await response.write(chunk)
                sent[0] += len(chunk)
            await response.write(tail)
        except (ConnectionError, RuntimeError):
            pass  # the reader hung up: what it should do
        return response

    return handler


def redirect(location: Callable[[web.Request], str]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": location(request)})

    return handler


def disk_bytes(root: Path) -> int:
    """Bytes the cache directory holds on disk (each inode once: models/ are hard links)."""
    seen: dict[int, int] = {}
    for path in root.rglob("*"):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue  # removed while walking
        if path.is_file() and not path.is_symlink():
            seen[st.st_ino] = st.st_size
    return sum(seen.values())


def post(url: str, body: object) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# -- 5: a compromised origin -----------------------------------------------------------------


async def test_oversized_index_is_refused_without_reading_it_whole(
    origin_repo: Path, tmp_path: Path
) -> None:
    index = (origin_repo / "models.json").read_bytes()
    sent = [0]
    padded = b" " * (2 << 20) + index  # valid JSON, 2 MiB, with a Content-Length

    async def big(request: web.Request) -> web.StreamResponse:
        return web.Response(body=padded)

    servers = [
        AppServer(origin_app(origin_repo, {"models.json": big})).start(),
        AppServer(origin_app(origin_repo, {"models.json": endless(index, sent, 64 << 20)})).start(),
    ]
    try:
        for i, server in enumerate(servers):
            repo = edge(server.url, tmp_path / str(i), max_index_bytes=CAP_BYTES)
            with pytest.raises(Unavailable) as caught:
                await asyncio.wait_for(repo.refresh_index(), 30)
            assert str(server.port) not in caught.value.message  # no origin URL to clients
            assert repo.model_names() == []
            await repo.close()
        # The reader stopped near its bound (plus socket buffers), not at the end of 64 MiB.
        assert sent[0] < 32 << 20, sent[0]
    finally:
        for server in servers:
            server.stop()


async def test_endless_manifest_never_writes_past_the_cache_bound(
    origin_repo: Path, tmp_path: Path
) -> None:
    sent, sent_gz = [0], [0]
    routes = {
        "simple/1/manifest.json": endless(b"", sent, 16 << 20),
        "simple/1/manifest.json.gz": endless(b"", sent_gz, 16 << 20),  # tried first
    }
    server = AppServer(origin_app(origin_repo, routes)).start()
    capacity = 1 << 20
    cache = tmp_path / "cache"
    repo = edge(server.url, cache, cache_size_bytes=capacity, max_index_bytes=CAP_BYTES)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, disk_bytes(cache))  # blobs, tmp/*.part, state files, all of it
            await asyncio.sleep(0.002)

    watcher = asyncio.ensure_future(watch())
    try:
        with pytest.raises(GatewayError) as caught:
            await asyncio.wait_for(repo.fetch("simple"), 60)
    finally:
        watcher.cancel()
        await repo.close()
        server.stop()
    peak = max(peak, disk_bytes(cache))
    assert peak <= capacity, f"{peak} bytes on disk, bound {capacity}"
    assert not list((cache / "tmp").iterdir())
    assert sent[0] < 8 << 20, sent[0]  # the reader hung up near its bound
    assert 0 < sent_gz[0] < 8 << 20, sent_gz[0]
    assert str(server.port) not in caught.value.message


async def test_redirects_to_another_host_are_not_followed(
    origin_repo: Path, tmp_path: Path
) -> None:
    hits: list[str] = []

    async def internal(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)  # a host only the edge's network can reach
        return web.Response(status=500, text="internal service")

    inside_app = web.Application()
    inside_app.router.add_get("/{path:.*}", internal)
    inside = AppServer(inside_app, host="127.0.0.2").start()

    def to_inside(request: web.Request) -> str:
        return f"{inside.url}{request.path}"

    async def moved_config(request: web.Request) -> web.StreamResponse:
        if request.query.get("moved"):
            return web.FileResponse(origin_repo / "simple/config.pbtxt")
        return web.Response(status=302, headers={"Location": "/simple/config.pbtxt?moved=1"})

    files = AppServer(
        origin_app(
            origin_repo,
            {
                "simple/config.pbtxt": moved_config,  # same origin: followed
                "dense/1/model.onnx": redirect(to_inside),
            },
        )
    ).start()
    index = AppServer(origin_app(origin_repo, {"models.json": redirect(to_inside)})).start()
    gw = None
    try:
        repo = edge(files.url, tmp_path / "a")
        await repo.fetch("simple")
        assert repo.source("simple").config.max_batch_size == 8
        with pytest.raises(Unavailable) as caught:
            await repo.fetch("dense")
        assert hits == []
        for leak in (inside.url, "127.0.0.2", str(files.port)):
            assert leak not in caught.value.message, caught.value.message
        await repo.close()

        # A whole edge replica: its index redirects away; the client sees a 503 naming no URL.
        gw = start_gateway(index.url, tmp_path, "--cache-dir", str(tmp_path / "b"))  # type: ignore[arg-type]
        status, body = post(f"{gw.url}/v2/models/simple/infer", SIMPLE_INPUTS)
        assert hits == []
        assert status == 503, body
        for leak in (inside.url, "127.0.0.2", str(index.port), str(tmp_path)):
            assert leak.encode() not in body, body
        assert hits == []
    finally:
        if gw is not None:
            gw.stop()
        for server in (files, index, inside):
            server.stop()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeOrigin]:
    origin = FakeOrigin(build_repo(tmp_path / "origin")).start()
    yield origin
    origin.stop()


async def test_unknown_names_refresh_the_index_at_most_every_ten_seconds(
    fake: FakeOrigin, tmp_path: Path
) -> None:
    now = [0.0]
    settings = Settings(model_repo=fake.url, cache_dir=str(tmp_path / "cache"))
    repo = EdgeRepository(settings, clock=lambda: now[0])
    await repo.fetch("simple")
    fake.requests.clear()
    messages = []
    for i in range(40):  # a made-up name every second for 40 s
        now[0] += 1.0
        name = f"made-up-{i}"
        if repo.on_demand(name):
            with pytest.raises(ModelNotFound) as caught:
                await repo.fetch(name)
            messages.append(caught.value.message)
    asked = len(fake.paths("models.json"))
    assert asked <= 40 // 10 + 1, asked  # not every INDEX_TTL_S (2 s): 20 requests
    assert not any(str(fake.port) in m for m in messages), messages

    # A model published meanwhile is still found by name, within the interval.
    models.add_sub(fake.root, "late")
    write_manifests(fake.root)
    now[0] += 10.0
    assert repo.on_demand("late")
    await repo.fetch("late")
    assert repo.source("late").config.max_batch_size == 8
    await repo.close()


# -- 6: origin down, no saved index -----------------------------------------------------------


def test_origin_down_unknown_names_leave_no_state(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    gw = start_gateway(down, tmp_path, "--cache-dir", str(tmp_path / "cache"))  # type: ignore[arg-type]
    try:
        answers = [
            post(f"{gw.url}/v2/models/m{secrets.token_hex(6)}/infer", SIMPLE_INPUTS)
            for _ in range(300)
        ]
        status, index = post(f"{gw.url}/v2/repository/index", {})
        assert status == 200
        assert json.loads(index) == []  # no entry per name asked for
        for status, body in answers:
            assert status in (404, 503), body
            assert down.encode() not in body and str(tmp_path).encode() not in body, body
    finally:
        gw.stop()


# -- 9: the repository publisher --------------------------------------------------------------


def test_publisher_serves_nothing_through_symlinks_out_of_the_root(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    models.add_sub(root, "simple")
    outside = tmp_path / "outside"
    (outside / "1").mkdir(parents=True)
    secret = outside / "1" / "secret.txt"
    secret.write_bytes(b"not for edges\n")
    sha = hashlib.sha256(secret.read_bytes()).hexdigest()
    os.symlink(outside, root / "evil", target_is_directory=True)  # a model directory
    os.symlink(outside / "1", root / "simple" / "3", target_is_directory=True)  # a version

    publisher = Publisher(root)
    assert publisher.blob(sha) is None
    assert b"secret" not in publisher.manifest("simple", 3)
    assert publisher.file("evil/1/secret.txt") is None
    index = json.loads(publisher.index())
    assert "evil" not in index["models"]
    assert list(index["models"]["simple"]["versions"]) == ["1"]

    node = start_gateway(root, tmp_path)
    try:
        for path in (
            f"blobs/sha256/{sha}",
            "tree/evil/1/secret.txt",
            "tree/simple/3/secret.txt",
            "tree/evil/1/manifest.json",
            "tree/simple/3/manifest.json",
        ):
            try:
                with urllib.request.urlopen(f"{node.url}/v2/repository/{path}", timeout=10) as r:
                    status, body = r.status, r.read()
            except urllib.error.HTTPError as exc:
                status, body = exc.code, exc.read()
            assert status == 404, (path, status, body)
            assert str(tmp_path).encode() not in body
    finally:
        node.stop()
