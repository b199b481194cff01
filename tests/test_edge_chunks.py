"""Content-defined chunks: a new version of a model crosses the link as its change.

Origins are real servers on loopback (``FakeOrigin`` honours ``Range`` and injects faults,
``StaticOrigin`` is ``http.server`` without ``Range``); a peer sending wrong chunks is the one
fake upstream. "Old" edges are this code with ``edge_chunks = false`` (files fetched whole,
chunk lists ignored), "old" origins publish manifests without chunk lists
(``write_manifests(root, 0)``, i.e. ``gateway manifest --chunk-size 0``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ModelLoadError
from gateway.repository.edge import INDEX_TTL_S
from gateway.repository.manifest import (
    Publisher,
    chunk_bounds,
    hash_and_chunk,
    parse_manifest,
    sha256_file,
    write_manifests,
)
from tests import edge_origins
from tests.edge_origins import (
    AVG,
    SIZE,
    AppServer,
    FakeOrigin,
    StaticOrigin,
    edit,
    moto_s3,
    open_edge,
    publish,
    random_bytes,
    roll_out,
    two_layer,
)
from tests.helpers import start_gateway

# the shared set-up: model m v1 at an origin, a FakeOrigin on it (pytest finds them here)
repo = edge_origins.repo
fake = edge_origins.fake


def _ranges(origin: FakeOrigin, suffix: str) -> list[tuple[int, int]]:
    """The byte ranges asked of a file: [start, end)."""
    out = []
    for path, wanted in origin.requests:
        if path.endswith(suffix):
            assert wanted is not None, f"{path} fetched whole"
            for spec in wanted[6:].split(","):
                first, _, last = spec.partition("-")
                out.append((int(first), int(last) + 1))
    return out


# -- the chunker and the format -----------------------------------------------------------------


def test_an_edit_moves_no_other_boundary(tmp_path: Path) -> None:
    data = random_bytes(SIZE, 1)
    edited = edit(data, 400_000, 5000)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(edited)
    sha_a, a = hash_and_chunk(tmp_path / "a", AVG)
    sha_b, b = hash_and_chunk(tmp_path / "b", AVG)
    assert sha_a == sha256_file(tmp_path / "a") and sha_b == sha256_file(tmp_path / "b")
    low, _, high = chunk_bounds(AVG)
    assert all(low <= c.size <= high for c in a[:-1]) and sum(c.size for c in a) == SIZE
    changed = [c for c in b if c not in set(a)]
    assert changed and sum(c.size for c in changed) < 5000 + 2 * high
    # every boundary before and after the edited range is where it was
    assert {c.offset for c in a if c.end <= 400_000} <= {c.offset for c in b}
    assert {c.offset for c in a if c.offset > 405_000 + high} <= {c.offset for c in b}


def test_manifest_lists_chunks_old_readers_keep_working(repo: Path) -> None:
    raw = (repo / "m/1/manifest.json").read_bytes()
    data = json.loads(raw)
    assert data["format"] == 1 and data["chunking"]["avg"] == AVG
    entry = data["files"][0]
    # what an edge before chunk lists reads is all there, unchanged
    assert {"path", "size", "sha256"} <= set(entry) and entry["size"] == SIZE
    manifest = parse_manifest(raw, "m/1")
    chunks = manifest.files[0].chunks
    assert len(chunks) > 10 and chunks[0].offset == 0 and chunks[-1].end == SIZE
    # the publisher a gateway node serves gives the same bytes
    assert Publisher(repo, AVG).manifest("m", 1) == raw
    # an old manifest (no chunks) parses; a chunk list with a gap does not
    write_manifests(repo, 0)
    old = parse_manifest((repo / "m/1/manifest.json").read_bytes(), "m/1")
    assert old.files[0].chunks == () and "chunking" not in json.loads(
        (repo / "m/1/manifest.json").read_bytes()
    )
    del entry["chunks"][3]
    with pytest.raises(ModelLoadError, match="does not continue"):
        parse_manifest(json.dumps(data).encode(), "m/1")


# -- transfer -----------------------------------------------------------------------------------


async def test_new_version_fetches_only_changed_chunks(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    v1 = (repo / "m/1/model.onnx").read_bytes()
    v2 = edit(v1, 300_000, 40_000)
    fake.requests.clear()
    cache = tmp_path / "cache"
    first = open_edge(fake.url, cache)
    await first.fetch("m")
    before = first.stats()["bytes_from_origin"]
    await roll_out(first, repo, "m", 2, v2, origin=fake)
    assert first.source("m").version_paths[2].read_bytes() == v2
    stats = first.stats()
    moved = stats["bytes_from_origin"] - before
    manifest = (repo / "m/2/manifest.json.gz").stat().st_size  # what crossed the link
    _, high = chunk_bounds(AVG)[1:]
    assert 40_000 <= moved - manifest <= 40_000 + 2 * high
    ranges = _ranges(fake, "m/2/model.onnx")
    assert len(ranges) <= 2 and sum(e - s for s, e in ranges) == moved - manifest
    assert stats["bytes_cached"] >= SIZE - moved and stats["chunks_reused"] > 10
    assert "cached" in str(first.metric_families())
    await first.close()

    # a restarted edge keeps the chunk map: v3 also reuses chunks (of v2's file)
    v3 = edit(v2, 800_000, 10_000, seed=5)
    again = open_edge(fake.url, cache)
    await roll_out(again, repo, "m", 3, v3, origin=fake)
    assert again.source("m").version_paths[3].read_bytes() == v3
    assert sum(e - s for s, e in _ranges(fake, "m/3/model.onnx")) < 10_000 + 2 * high
    await again.close()


async def test_old_format_origin_new_edge(repo: Path, fake: FakeOrigin, tmp_path: Path) -> None:
    """An origin publishing manifests without chunk lists: the new edge fetches files whole."""
    write_manifests(repo, 0)
    v2 = edit((repo / "m/1/model.onnx").read_bytes(), 300_000, 40_000)
    repo_edge = open_edge(fake.url, tmp_path / "cache")
    await repo_edge.fetch("m")
    await roll_out(repo_edge, repo, "m", 2, v2, avg=0, origin=fake)
    assert repo_edge.source("m").version_paths[2].read_bytes() == v2
    assert fake.requests.count(("m/2/model.onnx", None)) == 1  # one plain GET, whole
    assert repo_edge.stats()["bytes_cached"] == 0
    await repo_edge.close()


async def test_origin_starting_to_publish_chunks(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    """v1 was cached from manifests without chunk lists; v2 comes with them: the edge cuts its
    cached v1 as the origin would and fetches only v2's change."""
    write_manifests(repo, 0)
    v2 = edit((repo / "m/1/model.onnx").read_bytes(), 300_000, 40_000)
    repo_edge = open_edge(fake.url, tmp_path / "cache")
    await repo_edge.fetch("m")
    await roll_out(repo_edge, repo, "m", 2, v2, origin=fake)  # chunk lists from now on
    assert repo_edge.source("m").version_paths[2].read_bytes() == v2
    _, _, high = chunk_bounds(AVG)
    assert sum(e - s for s, e in _ranges(fake, "m/2/model.onnx")) < 40_000 + 2 * high
    await repo_edge.close()


async def test_new_origin_old_edge(repo: Path, fake: FakeOrigin, tmp_path: Path) -> None:
    """An edge that ignores chunk lists (``edge_chunks = false``) reads a chunked origin."""
    v2 = edit((repo / "m/1/model.onnx").read_bytes(), 300_000, 40_000)
    old = open_edge(fake.url, tmp_path / "cache", edge_chunks=False)
    await old.fetch("m")
    await roll_out(old, repo, "m", 2, v2, origin=fake)
    assert old.source("m").version_paths[2].read_bytes() == v2
    assert fake.requests.count(("m/2/model.onnx", None)) == 1
    assert old.stats()["bytes_from_origin"] >= SIZE
    await old.close()


async def test_origin_without_range_support_gets_whole_files(repo: Path, tmp_path: Path) -> None:
    static = StaticOrigin(repo).start()
    try:
        repo_edge = open_edge(static.url, tmp_path / "cache")
        await repo_edge.fetch("m")
        v2 = edit((repo / "m/1/model.onnx").read_bytes(), 300_000, 40_000)
        publish(repo, "m", 2, v2)
        later = (repo / "models.json").stat().st_mtime + 2  # Last-Modified has 1 s resolution
        os.utime(repo / "models.json", (later, later))
        static.requests.clear()
        await repo_edge.refresh_index(force=True)
        await repo_edge.fetch("m")
        assert repo_edge.source("m").version_paths[2].read_bytes() == v2
        assert "/m/2/model.onnx" in static.requests  # asked for a range, got it whole
        await repo_edge.close()
    finally:
        static.stop()


async def test_s3_origin_serves_chunks_by_range(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with moto_s3() as endpoint:
        import boto3

        for key, value in {
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="models")

        def upload() -> None:
            for path in repo.rglob("*"):
                if path.is_file():
                    s3.upload_file(str(path), "models", path.relative_to(repo).as_posix())

        upload()
        repo_edge = open_edge("s3://models", tmp_path / "cache")
        await repo_edge.fetch("m")
        before = repo_edge.stats()["bytes_from_origin"]
        v2 = edit((repo / "m/1/model.onnx").read_bytes(), 300_000, 40_000)
        publish(repo, "m", 2, v2)
        upload()
        await repo_edge.refresh_index(force=True)
        await repo_edge.fetch("m")
        assert repo_edge.source("m").version_paths[2].read_bytes() == v2
        stats = repo_edge.stats()
        manifest = (repo / "m/2/manifest.json").stat().st_size
        _, _, high = chunk_bounds(AVG)
        assert stats["bytes_from_origin"] - before - manifest < 40_000 + 2 * high
        assert stats["bytes_cached"] > SIZE // 2
        await repo_edge.close()


async def test_corrupt_chunk_from_origin_is_fetched_again(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    v2 = edit((repo / "m/1/model.onnx").read_bytes(), 300_000, 40_000)
    repo_edge = open_edge(fake.url, tmp_path / "cache")
    await repo_edge.fetch("m")
    fake.corrupt_at["m/2/model.onnx"] = 320_000  # one byte wrong, once
    await roll_out(repo_edge, repo, "m", 2, v2, origin=fake)
    assert repo_edge.source("m").version_paths[2].read_bytes() == v2
    assert repo_edge.stats()["corrupt"] == 1
    ranges = _ranges(fake, "m/2/model.onnx")
    assert len(ranges) == 2 and ranges[1][1] - ranges[1][0] < ranges[0][1] - ranges[0][0]
    assert ranges[1][0] <= 320_000 < ranges[1][1]  # only the bad chunk again
    await repo_edge.close()


async def test_corrupt_chunk_from_peer_is_dropped(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    from aiohttp import web

    asked: list[str] = []

    async def lying_chunk(request: web.Request) -> web.Response:
        asked.append(request.match_info["sha"])
        return web.Response(body=b"\0" * 100)

    app = web.Application()
    app.router.add_get("/v2/repository/chunks/sha256/{sha}", lying_chunk)
    peer = AppServer(app).start()
    try:
        v2 = edit((repo / "m/1/model.onnx").read_bytes(), 300_000, 40_000)
        repo_edge = open_edge(fake.url, tmp_path / "cache", peers=(peer.url,))
        await repo_edge.fetch("m")
        await roll_out(repo_edge, repo, "m", 2, v2, origin=fake)
        assert repo_edge.source("m").version_paths[2].read_bytes() == v2
        stats = repo_edge.stats()
        assert asked and stats["corrupt"] == len(asked)
        assert stats["bytes_from_peers"] == 100 * len(asked)  # transferred, all dropped
        assert _ranges(fake, "m/2/model.onnx")  # the chunks came from the origin instead
        await repo_edge.close()
    finally:
        peer.stop()


async def test_two_models_sharing_chunks_fetch_each_chunk_once(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    """Chunks are shared between models, and single-flight per chunk: two models with most
    bytes in common get new versions with the same new layer, fetched together; its chunks
    cross the link once."""
    base = random_bytes(SIZE, 7)
    publish(repo, "a", 1, base)
    publish(repo, "b", 1, edit(base, 500_000, 20_000))
    repo_edge = open_edge(fake.url, tmp_path / "cache")
    await repo_edge.fetch("a")
    origin = repo_edge.stats()["bytes_from_origin"]
    await repo_edge.fetch("b")  # a's chunks serve b: only its own edit is fetched
    _, _, high = chunk_bounds(AVG)
    manifest = (repo / "b/1/manifest.json").stat().st_size
    assert repo_edge.stats()["bytes_from_origin"] - origin - manifest < 20_000 + 2 * high

    publish(repo, "a", 2, edit(base, 200_000, 30_000, seed=3))
    publish(repo, "b", 2, edit(edit(base, 500_000, 20_000), 200_000, 30_000, seed=3))
    await repo_edge.refresh_index(force=True)
    fake.chunk_delay_s = 0.05  # the two builds overlap
    fake.requests.clear()
    await asyncio.gather(repo_edge.fetch("a"), repo_edge.fetch("b"))
    assert (
        repo_edge.source("b").version_paths[2].read_bytes()
        == (repo / "b/2/model.onnx").read_bytes()
    )
    ranges = _ranges(fake, "a/2/model.onnx") + _ranges(fake, "b/2/model.onnx")
    assert len(ranges) == 1 and 30_000 <= ranges[0][1] - ranges[0][0] < 30_000 + 2 * high
    await repo_edge.close()


async def test_interrupted_assembly_resumes(repo: Path, fake: FakeOrigin, tmp_path: Path) -> None:
    v2 = edit((repo / "m/1/model.onnx").read_bytes(), 100_000, 600_000)
    repo_edge = open_edge(fake.url, tmp_path / "cache")
    await repo_edge.fetch("m")
    fake.cut_after["m/2/model.onnx"] = 300_000  # the first range request breaks off
    await roll_out(repo_edge, repo, "m", 2, v2, origin=fake)
    assert repo_edge.source("m").version_paths[2].read_bytes() == v2
    ranges = _ranges(fake, "m/2/model.onnx")
    assert len(ranges) == 2 and ranges[1][0] >= ranges[0][0] + 250_000  # went on, not over
    await repo_edge.close()


# -- gateway processes: a node publishing chunks, an edge serving them to a peer ----------------


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post(url: str, body: object) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _metric(url: str, key: str) -> float:
    text = _get(f"{url}/metrics")[1].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(key))


async def test_gateway_node_and_edge_processes(tmp_path: Path) -> None:
    root = tmp_path / "origin"
    v1 = two_layer(root, "two", 1, head_seed=1)
    node = start_gateway(root, tmp_path)
    try:
        status, raw = _get(f"{node.url}/v2/repository/tree/two/1/manifest.json")
        chunks = parse_manifest(raw, "two/1").files[0].chunks
        assert status == 200 and len(chunks) > 4  # cut by the node, default chunk size
        status, data = _get(f"{node.url}/v2/repository/chunks/sha256/{chunks[2].sha256}")
        assert status == 200 and data == v1[chunks[2].offset : chunks[2].end]
        assert _get(f"{node.url}/v2/repository/chunks/sha256/{'0' * 64}")[0] == 404
        assert _get(f"{node.url}/v2/repository/chunks/sha256/nothex")[0] == 400

        infer = {
            "inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 1024], "data": [1.0] * 1024}]
        }
        gw = start_gateway(node.url, tmp_path, "--cache-dir", str(tmp_path / "edge"))  # type: ignore[arg-type]
        peer = open_edge(node.url, tmp_path / "peer", peers=(gw.url,))
        try:
            assert _post(f"{gw.url}/v2/models/two/infer", infer)[0] == 200
            await peer.fetch("two")  # v1, as the edge has it
            origin_before = _metric(gw.url, 'gateway_cache_fetched_bytes_total{source="origin"}')
            two_layer(root, "two", 2, head_seed=2)  # a new head: 64 KiB of 4 MiB changed
            time.sleep(INDEX_TTL_S)  # the edge asks the origin for its index again after that
            assert _post(f"{gw.url}/v2/repository/models/two/load", {})[0] == 200
            status, body = _post(f"{gw.url}/v2/models/two/versions/2/infer", infer)
            assert status == 200, body
            moved = _metric(gw.url, 'gateway_cache_fetched_bytes_total{source="origin"}')
            moved -= origin_before
            reused = _metric(gw.url, 'gateway_cache_fetched_bytes_total{source="cached"}')
            assert reused > 3_000_000 and moved < 1_500_000

            head = chunks[-1]  # the edge serves chunks of the files it holds by hash
            assert (
                _get(f"{gw.url}/v2/repository/chunks/sha256/{head.sha256}")[1] == v1[head.offset :]
            )

            # a peer edge on v1 gets v2's new chunks from this edge by hash, not the origin
            before = peer.stats()
            await peer.refresh_index(force=True)
            await peer.fetch("two")
            stats = peer.stats()
            assert 60_000 < stats["bytes_from_peers"] - before["bytes_from_peers"] < 1_500_000
            assert stats["bytes_from_origin"] - before["bytes_from_origin"] < 100_000  # manifest
            assert stats["bytes_cached"] > 3_000_000
        finally:
            await peer.close()
            gw.stop()
    finally:
        node.stop()


async def test_corrupt_cached_file_is_not_a_source_of_chunks(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    """A cached file changed on disk is caught (hashed before its chunks are copied), dropped,
    and the chunks it held come from the origin."""
    v1 = (repo / "m/1/model.onnx").read_bytes()
    v2 = edit(v1, 300_000, 40_000)
    repo_edge = open_edge(fake.url, tmp_path / "cache")
    await repo_edge.fetch("m")
    blob = repo_edge.cache.blob_path(hashlib.sha256(v1).hexdigest())
    with blob.open("r+b") as f:  # bit rot, same size
        f.seek(700_000)
        f.write(b"\xff" * 16)
    await roll_out(repo_edge, repo, "m", 2, v2, origin=fake)
    assert repo_edge.source("m").version_paths[2].read_bytes() == v2
    stats = repo_edge.stats()
    assert stats["corrupt"] == 1 and stats["bytes_cached"] == 0
    assert sum(e - s for s, e in _ranges(fake, "m/2/model.onnx")) == SIZE
    await repo_edge.close()


async def test_progress_note_splits_bytes_by_source(
    repo: Path, fake: FakeOrigin, tmp_path: Path
) -> None:
    v2 = edit((repo / "m/1/model.onnx").read_bytes(), 300_000, 40_000)
    repo_edge = open_edge(fake.url, tmp_path / "cache")
    await repo_edge.fetch("m")
    publish(repo, "m", 2, v2)
    await repo_edge.refresh_index(force=True)
    notes: list[str] = []
    await repo_edge.pull("m", lambda delta: notes.append(repo_edge.note("m")))
    seen = [[int(x) for x in re.findall(r"\d+", n)] for n in notes if n.startswith("fetching:")]
    assert len(seen) == len(notes) > 10
    for done, total, origin, peer, cached in seen:
        assert total == SIZE and peer == 0 and done == origin + cached
    done, _, origin, _, cached = seen[-1]
    assert done == SIZE and 40_000 <= origin < SIZE // 2 and cached > SIZE // 2
    await repo_edge.close()


def test_manifest_cli_chunk_size(repo: Path) -> None:
    def run(*args: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "manifest", "--model-repo", str(repo), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return json.loads((repo / "m/1/manifest.json").read_bytes())

    plain = run("--chunk-size", "0")
    assert "chunking" not in plain and "chunks" not in plain["files"][0]
    cut = run("--chunk-size", "16KiB")
    assert cut["chunking"]["avg"] == 16384 and len(cut["files"][0]["chunks"]) > 10
    assert run()["chunking"]["avg"] == 65536
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "manifest",
            "--model-repo",
            str(repo),
            "--chunk-size",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "chunk-size" in bad.stderr
