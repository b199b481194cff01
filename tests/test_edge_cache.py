"""EdgeRepository against real origins on loopback: fetch, verify, resume, evict, restart."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import ModelNotFound, Unavailable
from gateway.repository.cache import parse_size
from gateway.repository.edge import EdgeRepository
from gateway.repository.manifest import parse_manifest, write_manifests
from gateway.settings import Settings
from tests import models
from tests.edge_origins import FakeOrigin, StaticOrigin, build_repo, moto_s3


@pytest.fixture(scope="module")
def origin_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repo(tmp_path_factory.mktemp("origin"))


@pytest.fixture
def fake(origin_repo: Path) -> Iterator[FakeOrigin]:
    origin = FakeOrigin(origin_repo).start()
    yield origin
    origin.stop()


def edge(url: str, cache: Path, **kwargs: object) -> EdgeRepository:
    return EdgeRepository(Settings(model_repo=url, cache_dir=str(cache), **kwargs))  # type: ignore[arg-type]


def test_parse_size() -> None:
    assert parse_size("10GiB") == 10 * 1024**3
    assert parse_size("500M") == 500 * 1024**2
    assert parse_size("1234") == 1234
    with pytest.raises(ValueError):
        parse_size("lots")


async def test_static_origin_first_fetch_then_restart_only_checks_index(
    origin_repo: Path, tmp_path: Path
) -> None:
    static = StaticOrigin(origin_repo).start()
    try:
        repo = edge(static.url, tmp_path)
        await repo.fetch("simple")
        source = repo.source("simple")
        assert (
            source.version_paths[1].read_bytes()
            == (origin_repo / "simple/1/model.onnx").read_bytes()
        )
        assert source.config.max_batch_size == 8
        assert any(p.endswith("model.onnx") for p in static.requests)
        await repo.close()

        static.requests.clear()
        again = edge(static.url, tmp_path)  # a restarted replica on the same cache
        assert await again.startup_names() == ["simple"]
        await again.fetch("simple")
        await again.revalidated()  # in the background: the load did not wait for it
        assert static.requests == ["/models.json"]  # If-Modified-Since: 304, nothing else
        assert again.stats()["misses"] == 0 and again.stats()["hits"] >= 2
        await again.close()
    finally:
        static.stop()


async def test_concurrent_fetches_download_once(fake: FakeOrigin, tmp_path: Path) -> None:
    fake.chunk_delay_s = 0.01
    repo = edge(fake.url, tmp_path)
    await asyncio.gather(*(repo.fetch("dense") for _ in range(20)))
    assert len(fake.paths("dense/1/model.onnx")) == 1
    await repo.close()


async def test_corrupt_cached_file_is_detected_and_refetched(
    fake: FakeOrigin, tmp_path: Path
) -> None:
    repo = edge(fake.url, tmp_path)
    await repo.fetch("dense")
    manifest = parse_manifest((fake.root / "dense/1/manifest.json").read_bytes(), "m")
    blob = tmp_path / "blobs/sha256" / manifest.files[0].sha256
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))  # same size, different content (a flipped bit on disk)
    await repo.close()

    fake.requests.clear()
    again = edge(fake.url, tmp_path)
    await again.fetch("dense")
    assert again.stats()["corrupt"] == 1
    assert fake.paths("dense/1/model.onnx") == ["dense/1/model.onnx"]
    served = again.source("dense").version_paths[1].read_bytes()
    assert served == (fake.root / "dense/1/model.onnx").read_bytes()
    await again.close()


async def test_interrupted_download_resumes_with_range(fake: FakeOrigin, tmp_path: Path) -> None:
    path = "dense/1/model.onnx"
    size = (fake.root / path).stat().st_size
    fake.cut_after[path] = 32768
    repo = edge(fake.url, tmp_path)
    await repo.fetch("dense")
    ranges = [r for p, r in fake.requests if p == path]
    assert len(ranges) == 2 and ranges[0] is None
    assert ranges[1] is not None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    resumed_at = int(ranges[1][6:-1])
    assert 0 < resumed_at < size
    assert repo.stats()["resumes"] == 1
    assert repo.stats()["bytes_from_origin"] < size + 4096  # nothing fetched twice
    assert repo.source("dense").version_paths[1].read_bytes() == (fake.root / path).read_bytes()
    assert not list((tmp_path / "tmp").iterdir())  # the partial file was moved into place
    await repo.close()


async def test_eviction_respects_pinned_loaded_and_byte_bound(
    fake: FakeOrigin, tmp_path: Path
) -> None:
    sizes = {n: (fake.root / n / "1/model.onnx").stat().st_size for n in ("dense", "other")}
    capacity = sizes["dense"] + sizes["other"] + 4096  # room for two of the three
    repo = edge(fake.url, tmp_path, cache_size_bytes=capacity, prefetch=("simple",))
    loaded: set[str] = set()
    repo.in_use = loaded.__contains__
    await repo.fetch("simple")  # pinned
    await repo.fetch("dense")
    await repo.fetch("other")  # fits: simple is tiny
    assert repo.cache.used_bytes <= capacity
    assert {"simple", "dense", "other"} <= set(repo.cache.models)

    await repo.fetch("dense")  # used again: "other" is now the least recently used
    models.dense(fake.root, "big", features=256, classes=56)
    write_manifests(fake.root)
    await repo.refresh_index(force=True)
    await repo.fetch("big")
    assert "other" not in repo.cache.models and "simple" in repo.cache.models
    assert repo.stats()["evictions"] == 1 and repo.cache.used_bytes <= capacity
    assert not (tmp_path / "models/other").exists()

    loaded.update({"dense", "big"})  # loaded models are never evicted, pinned neither
    with pytest.raises(Unavailable, match="cache is full"):
        await repo.fetch("other")
    assert repo.cache.used_bytes <= capacity
    shutil.rmtree(fake.root / "big")
    write_manifests(fake.root)
    await repo.close()


async def test_origin_down_serves_cached_and_refuses_uncached(
    origin_repo: Path, tmp_path: Path
) -> None:
    origin = FakeOrigin(origin_repo).start()
    repo = edge(origin.url, tmp_path)
    await repo.fetch("simple")
    await repo.close()
    origin.stop()

    offline = edge(origin.url, tmp_path)
    await offline.fetch("simple")  # index and manifests come from the cache
    assert offline.source("simple").version_paths[1].is_file()
    await offline.revalidated()
    assert offline.reachable is False
    started = time.monotonic()
    with pytest.raises(Unavailable, match="not cached and cannot be fetched"):
        await offline.fetch("dense")
    assert time.monotonic() - started < 5
    with pytest.raises(ModelNotFound):
        await offline.fetch("nope")
    await offline.close()


async def test_new_version_fetches_only_changed_files(fake: FakeOrigin, tmp_path: Path) -> None:
    root = fake.root
    repo = edge(fake.url, tmp_path)
    await repo.fetch("simple")
    shutil.copytree(root / "simple/1", root / "simple/2")  # same model.onnx content
    (root / "simple/2/labels.txt").write_text("a\nb\n")
    write_manifests(root)
    fake.requests.clear()
    await repo.refresh_index(force=True)
    await repo.fetch("simple")
    fetched = [p for p, _ in fake.requests]
    assert "simple/2/labels.txt" in fetched
    assert not any(p.endswith("model.onnx") for p in fetched)  # unchanged hash: not fetched
    assert sorted(repo.source("simple").version_paths) == [2]
    assert (tmp_path / "models/simple/2/labels.txt").read_text() == "a\nb\n"
    assert not (tmp_path / "models/simple/1").exists()
    shutil.rmtree(root / "simple/2")
    write_manifests(root)
    await repo.close()


async def test_restart_loads_saved_index_then_revalidates_in_background(
    fake: FakeOrigin, tmp_path: Path
) -> None:
    root = fake.root
    repo = edge(fake.url, tmp_path)
    await repo.fetch("simple")
    await repo.close()
    shutil.copytree(root / "simple/1", root / "simple/2")  # published while the edge was down
    write_manifests(root)
    try:
        # An origin that never answers: a restart still loads what it has cached at once.
        with socket.socket() as hanging:
            hanging.bind(("127.0.0.1", 0))
            hanging.listen(8)
            stuck = edge(f"http://127.0.0.1:{hanging.getsockname()[1]}", tmp_path)
            started = time.monotonic()
            assert await stuck.startup_names() == ["simple"]
            await stuck.fetch("simple")  # from the saved index: verified, nothing downloaded
            assert time.monotonic() - started < 2
            assert stuck.reachable is None  # the revalidation is still waiting
            assert sorted(stuck.source("simple").version_paths) == [1]
            assert stuck.stats()["misses"] == 0
            await stuck.close()

        fake.requests.clear()
        again = edge(fake.url, tmp_path)
        changed: list[str] = []
        again.on_change = changed.append
        assert await again.startup_names() == ["simple"]
        await again.fetch("simple")
        await again.revalidated()
        assert changed == ["simple"]  # the data plane's reload_soon
        assert [p for p, _ in fake.requests] == ["models.json"]
        await again.fetch("simple")  # the reload: the fresh index, only new files fetched
        assert sorted(again.source("simple").version_paths) == [2]
        assert not fake.paths("model.onnx")
        await again.close()

        # Unchanged at the origin: revalidated (a 304), nothing to reload.
        third = edge(fake.url, tmp_path)
        third.on_change = changed.append
        await third.fetch("simple")
        await third.revalidated()
        assert changed == ["simple"] and third.reachable is True
        assert sorted(third.source("simple").version_paths) == [2]
        await third.close()
    finally:
        shutil.rmtree(root / "simple/2")
        write_manifests(root)


async def test_file_origin(origin_repo: Path, tmp_path: Path) -> None:
    repo = edge(origin_repo.as_uri(), tmp_path)
    await repo.fetch("dense")
    assert (
        repo.source("dense").version_paths[1].read_bytes()
        == (origin_repo / "dense/1/model.onnx").read_bytes()
    )
    await repo.close()


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


async def test_s3_origin(
    moto_server: str, origin_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    for key, value in {
        "AWS_ENDPOINT_URL_S3": moto_server,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="models")
    for path in origin_repo.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "models", f"prod/{path.relative_to(origin_repo).as_posix()}")
    repo = edge("s3://models/prod", tmp_path)
    await repo.fetch("simple")
    assert repo.source("simple").config.max_batch_size == 8
    await repo.close()
    again = edge("s3://models/prod", tmp_path)
    await again.fetch("simple")  # IfNoneMatch on models.json: unchanged
    assert again.stats()["misses"] == 0
    await again.close()
