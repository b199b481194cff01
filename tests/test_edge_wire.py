"""What crosses the link for a new version: several byte ranges in one request, manifests gzipped.

Origins are real servers on loopback: ``FakeOrigin`` answers several ranges the three ways
servers do (a ``multipart/byteranges`` answer, the whole file as S3 does, the first range only);
an aiohttp application plays a CDN that gzips what it is allowed to; a gateway node process
serves its tree. "Old" edges and origins are the requests and files from before: an edge that
never asks for ``manifest.json.gz``, an index without ``manifests_gzip``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import urllib.request
from pathlib import Path

import pytest

from gateway.repository.manifest import chunk_bounds, gunzip
from tests import edge_origins
from tests.edge_origins import (
    AVG,
    SIZE,
    AppServer,
    FakeOrigin,
    edit,
    open_edge,
    publish,
    roll_out,
    two_layer,
)
from tests.helpers import start_gateway

# the shared set-up: model m v1 at an origin, a FakeOrigin on it (pytest finds them here)
repo = edge_origins.repo
fake = edge_origins.fake

EDITS = (100_000, 400_000, 700_000, 950_000)  # four changes apart: four runs of new chunks


def _spread(data: bytes, seed: int = 99) -> bytes:
    for i, at in enumerate(EDITS):
        data = edit(data, at, 3000, seed=seed + i)
    return data


def _asked(origin: FakeOrigin, suffix: str) -> list[list[tuple[int, int]]]:
    """The ranges ``[start, end)`` of each request for a file."""
    out = []
    for path, wanted in origin.requests:
        if path.endswith(suffix):
            assert wanted is not None, f"{path} fetched whole"
            spans = []
            for spec in wanted[6:].split(","):
                first, _, last = spec.partition("-")
                spans.append((int(first), int(last) + 1))
            out.append(spans)
    return out


# -- several ranges per request -----------------------------------------------------------------


async def test_several_ranges_in_one_request(repo: Path, fake: FakeOrigin, tmp_path: Path) -> None:
    edge = open_edge(fake.url, tmp_path / "cache")
    await edge.fetch("m")
    v2 = _spread((repo / "m/1/model.onnx").read_bytes())
    before = edge.stats()["bytes_from_origin"]
    await roll_out(edge, repo, "m", 2, v2, origin=fake)
    assert edge.source("m").version_paths[2].read_bytes() == v2
    asked = _asked(fake, "m/2/model.onnx")
    assert len(asked) == 1 and len(asked[0]) == len(EDITS)  # one request, a range per edit
    moved = edge.stats()["bytes_from_origin"] - before
    manifest = (repo / "m/2/manifest.json.gz").stat().st_size
    assert moved - manifest == sum(end - start for start, end in asked[0])
    _, _, high = chunk_bounds(AVG)
    assert moved - manifest < len(EDITS) * (3000 + 2 * high)
    await edge.close()


@pytest.mark.parametrize("answer", ["whole", "first"])
async def test_origin_without_several_ranges_gets_one_at_a_time(
    answer: str, repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    """An origin that answers several ranges with the whole file (200, as S3) or with the first
    range only: the edge hangs up on the whole file at once, asks for the ranges it lacks one
    at a time, and never asks that origin for several again."""
    fake.multi_range = answer
    edge = open_edge(fake.url, tmp_path / "cache")
    await edge.fetch("m")
    v1 = (repo / "m/1/model.onnx").read_bytes()
    v2 = _spread(v1)
    before = edge.stats()["bytes_from_origin"]
    await roll_out(edge, repo, "m", 2, v2, origin=fake)
    assert edge.source("m").version_paths[2].read_bytes() == v2
    asked = _asked(fake, "m/2/model.onnx")
    assert len(asked[0]) == len(EDITS)  # tried once
    assert [len(spans) for spans in asked[1:]] == [1] * (len(asked) - 1)
    assert len(asked) == 1 + len(EDITS) - (answer == "first")  # the first range was answered
    moved = edge.stats()["bytes_from_origin"] - before
    assert moved < SIZE // 4  # the whole file was not read
    await edge.close()

    # remembered per origin: the next version is asked for one range at a time from the start
    edge = open_edge(fake.url, tmp_path / "cache")
    await edge.fetch("m")
    await edge.revalidated()  # the restarted edge's index check, before v3 is published
    await roll_out(edge, repo, "m", 3, _spread(v2, seed=7), origin=fake)
    asked = _asked(fake, "m/3/model.onnx")
    assert len(asked[0]) == len(EDITS)  # a new process asks once again
    await roll_out(edge, repo, "m", 4, _spread(v2, seed=17), origin=fake)
    assert all(len(spans) == 1 for spans in _asked(fake, "m/4/model.onnx"))
    await edge.close()


async def test_corrupt_range_in_a_multipart_answer_is_fetched_again(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    edge = open_edge(fake.url, tmp_path / "cache")
    await edge.fetch("m")
    v2 = _spread((repo / "m/1/model.onnx").read_bytes())
    publish(repo, "m", 2, v2)
    await edge.refresh_index(force=True)
    # a byte of the third edit's range goes wrong once, inside the multipart body
    fake.corrupt_at["m/2/model.onnx"] = EDITS[2] + 10
    fake.requests.clear()
    await edge.fetch("m")
    assert edge.source("m").version_paths[2].read_bytes() == v2
    assert edge.stats()["corrupt"] == 1
    asked = _asked(fake, "m/2/model.onnx")
    assert len(asked) == 2 and len(asked[1]) == 1  # the bad chunk alone, again
    await edge.close()


# -- manifests gzipped --------------------------------------------------------------------------


async def test_new_edge_fetches_the_gzipped_manifest(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    raw = (repo / "m/1/manifest.json").read_bytes()
    packed = (repo / "m/1/manifest.json.gz").read_bytes()
    assert gunzip(packed, len(raw)) == raw and len(packed) * 2 < len(raw)
    assert json.loads((repo / "models.json").read_bytes())["manifests_gzip"] is True
    edge = open_edge(fake.url, tmp_path / "cache")
    await edge.fetch("m")
    assert fake.paths("m/1/manifest.json.gz") and not fake.paths("m/1/manifest.json")
    assert edge.stats()["bytes_from_origin"] == SIZE + len(packed)
    # files and ranges are asked for as stored (a CDN must not gzip what is hashed)
    files = [h for (p, _), h in zip(fake.requests, fake.headers, strict=True) if "onnx" in p]
    assert files and all(h.get("accept-encoding") == "identity" for h in files)
    await edge.close()


@pytest.mark.parametrize("fault", ["missing", "corrupt", "bomb"])
async def test_gzipped_manifest_missing_or_bad_falls_back_to_plain(
    fault: str, repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    """An origin whose index says ``manifests_gzip`` and whose ``.gz`` is gone, wrong, or
    unpacks past ``max_index_bytes``: the plain manifest is used (the bad one never is)."""
    gz = repo / "m/1/manifest.json.gz"
    if fault == "missing":
        gz.unlink()
    elif fault == "corrupt":
        gz.write_bytes(gzip.compress(b'{"format": 1}'))
    else:
        gz.write_bytes(gzip.compress(b" " * (64 << 20)))  # 64 MiB of spaces, 64 KiB packed
        with pytest.raises(ValueError, match="more than"):  # unpacked only up to the bound
            gunzip(gz.read_bytes(), 1 << 20)
    edge = open_edge(fake.url, tmp_path / "cache", max_index_bytes=1 << 20)
    await edge.fetch("m")
    assert edge.source("m").version_paths[1].read_bytes() == (repo / "m/1/model.onnx").read_bytes()
    assert fake.paths("m/1/manifest.json.gz") and fake.paths("m/1/manifest.json")
    assert edge.stats()["corrupt"] == (fault != "missing")
    await edge.close()


async def test_new_edge_and_an_origin_from_before_gzipped_manifests(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    """An index without ``manifests_gzip`` (and no ``.gz`` files): the plain manifest, and no
    request for a ``.gz`` the origin does not have."""
    index = json.loads((repo / "models.json").read_bytes())
    del index["manifests_gzip"]
    (repo / "models.json").write_text(json.dumps(index))
    (repo / "m/1/manifest.json.gz").unlink()
    edge = open_edge(fake.url, tmp_path / "cache")
    await edge.fetch("m")
    assert fake.paths("m/1/manifest.json") and not fake.paths(".gz")
    await edge.close()


async def test_index_gzipped_by_a_cdn_is_unpacked(repo: Path, tmp_path: Path) -> None:
    """A CDN gzips JSON for clients that accept it: the index is unpacked (an edge that left
    it packed would refuse it as not JSON); files are asked for and come as stored."""
    from aiohttp import web

    seen: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        seen.append(f"{path} {request.headers.get('Accept-Encoding')}")
        data = (repo / path).read_bytes()
        if path.endswith(".json") and "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=gzip.compress(data), headers={"Content-Encoding": "gzip"})
        return web.Response(body=data)

    app = web.Application()
    app.router.add_get("/{path:.*}", handle)
    server = AppServer(app).start()
    try:
        edge = open_edge(server.url, tmp_path / "cache")
        await edge.fetch("m")
        assert (
            edge.source("m").version_paths[1].read_bytes() == (repo / "m/1/model.onnx").read_bytes()
        )
        assert "models.json gzip" in seen and "m/1/model.onnx identity" in seen
        await edge.close()
    finally:
        server.stop()


async def test_gateway_node_answers_several_ranges_at_once(tmp_path: Path) -> None:
    """A gateway node's tree (starlette's ``FileResponse``) answers ``multipart/byteranges``:
    one request gives every range, byte for byte."""
    from gateway.repository.origin import HttpOrigin

    root = tmp_path / "origin"
    data = two_layer(root, "two", 1, head_seed=1)
    node = start_gateway(root, tmp_path)
    origin = HttpOrigin(node.url)
    try:
        spans = [(0, 1000), (50_000, 70_000), (len(data) - 5000, len(data))]
        got: dict[int, bytearray] = {}
        async for at, piece in origin.ranges("two/1/model.onnx", spans):
            start = next(s for s, e in spans if s <= at < e)
            got.setdefault(start, bytearray()).extend(piece)
        assert origin.multi_range is True
        assert {s: bytes(b) for s, b in got.items()} == {s: data[s:e] for s, e in spans}
    finally:
        await origin.close()
        node.stop()


def test_gateway_node_serves_gzipped_manifests_old_edges_get_plain(tmp_path: Path) -> None:
    """A node publishes ``manifest.json.gz`` (the same bytes gzipped, named in the index) and
    answers an edge from before it, which asks for ``manifest.json`` with aiohttp's default
    ``Accept-Encoding: gzip, deflate`` and hashes the body as it comes, with the plain bytes:
    never a ``Content-Encoding``."""
    root = tmp_path / "origin"
    two_layer(root, "two", 1, head_seed=1)
    node = start_gateway(root, tmp_path)
    try:

        def get(path: str) -> tuple[bytes, str | None]:
            request = urllib.request.Request(
                f"{node.url}/v2/repository/tree/{path}",
                headers={"Accept-Encoding": "gzip, deflate"},
            )
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.read(), r.headers.get("Content-Encoding")

        index, encoding = get("models.json")
        assert encoding is None and json.loads(index)["manifests_gzip"] is True
        want = json.loads(index)["models"]["two"]["versions"]["1"]
        raw, encoding = get("two/1/manifest.json")
        assert encoding is None and hashlib.sha256(raw).hexdigest() == want
        packed, encoding = get("two/1/manifest.json.gz")
        assert encoding is None and gunzip(packed, 1 << 20) == raw
        assert len(packed) * 2 < len(raw)
    finally:
        node.stop()
