"""``gateway serve`` as an edge replica (real processes on loopback): pull on first use,
restart from the cache, origin down, a gateway node as origin, peer fill."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.repository.edge import EdgeRepository
from gateway.repository.manifest import write_manifests
from gateway.settings import Settings
from tests.edge_origins import SIMPLE_INPUTS, FakeOrigin, build_repo
from tests.helpers import GatewayProcess, start_gateway


@pytest.fixture(scope="module")
def origin_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repo(tmp_path_factory.mktemp("origin"))


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def _infer(gw: GatewayProcess, model: str = "simple") -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        f"{gw.url}/v2/models/{model}/infer", data=json.dumps(SIMPLE_INPUTS).encode()
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _edge(url: str, cache: Path, tmp: Path, *args: str) -> GatewayProcess:
    return start_gateway(url, tmp, "--cache-dir", str(cache), *args)  # type: ignore[arg-type]


async def _concurrent_infer(gw: GatewayProcess, n: int) -> list[int]:
    async with aiohttp.ClientSession() as session:

        async def one() -> int:
            async with session.post(
                f"{gw.url}/v2/models/simple/infer", json=SIMPLE_INPUTS
            ) as response:
                body = await response.json()
                assert response.status != 200 or body["outputs"][0]["data"][:2] == [1, 2]
                return response.status

        return await asyncio.gather(*(one() for _ in range(n)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def fake(origin_repo: Path) -> Iterator[FakeOrigin]:
    origin = FakeOrigin(origin_repo, chunk_delay_s=0.05).start()
    yield origin
    origin.stop()


async def test_cold_requests_share_one_download_then_restart_uses_cache(
    fake: FakeOrigin, cache: Path, tmp_path: Path
) -> None:
    gw = _edge(fake.url, cache, tmp_path)
    try:
        statuses = await _concurrent_infer(gw, 20)
        assert statuses == [200] * 20, gw.log()
        assert len(fake.paths("simple/1/model.onnx")) == 1
        status, body, _ = _get(f"{gw.url}/metrics")
        assert b"gateway_cache_misses_total" in body
    finally:
        gw.stop()

    fake.requests.clear()
    gw = _edge(fake.url, cache, tmp_path)  # a restarted replica: loads from the cache at start
    try:
        status, _, _ = _get(f"{gw.url}/v2/models/simple/ready")
        assert status == 200
        assert _infer(gw)[0] == 200
        deadline = time.monotonic() + 10  # the ETag check (a 304) runs in the background
        while not fake.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [p for p, _ in fake.requests] == ["models.json"]
    finally:
        gw.stop()


def test_origin_down_cached_serve_uncached_503(
    origin_repo: Path, cache: Path, tmp_path: Path
) -> None:
    down = FakeOrigin(origin_repo).start()
    url = down.url
    gw = _edge(url, cache / "down", tmp_path, "--prefetch", "simple")
    gw.stop()
    down.stop()  # nothing listens there any more

    gw = _edge(url, cache / "down", tmp_path)
    try:
        assert _infer(gw)[0] == 200
        status, body = _infer(gw, "dense")
        assert status == 503
        assert "not cached and cannot be fetched" in str(body["error"])
        status = _get(f"{gw.url}/v2/health/ready")[0]
        assert status == 200
    finally:
        gw.stop()


def test_warm_restart_revalidates_in_background_and_serves_with_origin_down(
    tmp_path: Path,
) -> None:
    root = build_repo(tmp_path / "origin")
    origin = FakeOrigin(root).start()
    cache = tmp_path / "cache"
    try:
        gw = _edge(origin.url, cache, tmp_path)
        try:
            assert _infer(gw)[0] == 200
        finally:
            gw.stop()
        shutil.copytree(root / "simple/1", root / "simple/2")  # a new version while down
        write_manifests(root)
        origin.requests.clear()

        gw = _edge(origin.url, cache, tmp_path)  # loads version 1 from the cache at once
        try:
            assert _infer(gw)[0] == 200  # the old version until the new one is loaded
            deadline = time.monotonic() + 30
            versions: list[str] = []
            while versions != ["2"] and time.monotonic() < deadline:
                status, body, _ = _get(f"{gw.url}/v2/models/simple")
                versions = json.loads(body).get("versions", []) if status == 200 else []
                time.sleep(0.05)
            assert versions == ["2"], gw.log()
            status, result = _infer(gw)
            assert status == 200 and result["model_version"] == "2"
            assert not origin.paths("model.onnx")  # same content: nothing downloaded again
        finally:
            gw.stop()
    finally:
        origin.stop()

    gw = _edge(origin.url, cache, tmp_path)  # the origin is down now: serve from the cache
    try:
        status, result = _infer(gw)
        assert status == 200 and result["model_version"] == "2", gw.log()
        assert _get(f"{gw.url}/v2/health/ready")[0] == 200
    finally:
        gw.stop()


async def test_gateway_node_as_origin_and_peer_fill(
    origin_repo: Path, tmp_path: Path, fake: FakeOrigin
) -> None:
    node = start_gateway(origin_repo, tmp_path)
    edge_cache = tmp_path / "edge-cache"
    try:
        # The node's repository endpoints: strict paths, ETag, Range.
        assert _get(f"{node.url}/v2/repository/tree/..%2Fetc%2Fpasswd")[0] in (400, 404)
        assert _get(f"{node.url}/v2/repository/tree/simple/../../x")[0] in (400, 404)
        assert _get(f"{node.url}/v2/repository/blobs/sha256/abc")[0] == 400
        status, index, headers = _get(f"{node.url}/v2/repository/tree/models.json")
        assert status == 200 and "simple" in json.loads(index)["models"]
        etag = {"If-None-Match": headers["etag"]}
        assert _get(f"{node.url}/v2/repository/tree/models.json", etag)[0] == 304
        sha = json.loads(index)["models"]["simple"]["files"][0]["sha256"]
        blob_url = f"{node.url}/v2/repository/blobs/sha256/{sha}"
        status, part, _ = _get(blob_url, {"Range": "bytes=10-"})
        assert status == 206
        assert part == (origin_repo / "simple/config.pbtxt").read_bytes()[10:]

        edge = _edge(node.url, edge_cache, tmp_path)  # the node's base URL is the origin
        try:
            assert _infer(edge)[0] == 200
            # Peer fill: a second edge asks the first for blobs before its own origin.
            fake.requests.clear()
            peer = EdgeRepository(
                Settings(model_repo=fake.url, cache_dir=str(tmp_path / "b"), peers=(edge.url,))
            )
            await peer.fetch("simple")
            assert peer.stats()["bytes_from_peers"] > 0
            assert not fake.paths("model.onnx") and not fake.paths("config.pbtxt")
            await peer.close()
        finally:
            edge.stop()
    finally:
        node.stop()
