"""Cold-start forwarding (real processes on loopback): while an edge fetches a model over a slow
link from its origin (a gateway node), requests for it are answered by the origin; once the
model is loaded the edge serves it itself."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gateway.forwarding import Forwarder
from gateway.repository.edge import EdgeRepository
from gateway.repository.manifest import write_manifests
from gateway.settings import Settings, SettingsError
from gateway.testing.delay_proxy import DelayProxy
from tests import models
from tests.edge_origins import SIMPLE_INPUTS, FakeOrigin, build_repo
from tests.helpers import GatewayProcess, free_port, start_gateway

FEATURES, CLASSES = 1024, 1024  # a 4 MiB model: ~4 s through the 1 MB/s link below
RATE_BYTES_S = 1_000_000


def _call(url: str, body: object | None = None) -> tuple[int, dict[str, object]]:
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _infer(gw: GatewayProcess, x: np.ndarray) -> tuple[int, dict[str, object]]:
    body = {
        "inputs": [
            {"name": "X", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ]
    }
    return _call(f"{gw.url}/v2/models/big/infer", body)


def _origin_count(node: GatewayProcess) -> int:
    status, stats = _call(f"{node.url}/v2/models/big/stats")
    assert status == 200
    return int(stats["model_stats"][0]["inference_count"])  # type: ignore[index]


def test_requests_forwarded_to_origin_while_fetching(tmp_path: Path) -> None:
    repo = tmp_path / "origin"
    model_path = models.dense(repo, "big", features=FEATURES, classes=CLASSES)
    write_manifests(repo)
    x = np.random.default_rng(1).standard_normal((2, FEATURES)).astype(np.float32)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"X": x})[0]

    node = start_gateway(repo, tmp_path)
    link = DelayProxy(node.port, rate_bytes_s=RATE_BYTES_S).start()
    # The origin is reached through the slow link for the download and for forwarding alike:
    # a forwarded request is small, so the link's bandwidth costs it little.
    edge = start_gateway(
        link.url,  # type: ignore[arg-type]
        tmp_path,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--forward-while-fetching",
        "origin",
    )
    try:
        started = time.monotonic()
        status, body = _infer(edge, x)
        first_s = time.monotonic() - started
        assert status == 200, (body, edge.log())
        assert body["model_version"] == "1"
        out = body["outputs"][0]  # type: ignore[index]
        assert out["name"] == "Y" and out["shape"] == [2, CLASSES]
        np.testing.assert_allclose(np.array(out["data"]).reshape(2, CLASSES), expected, rtol=1e-5)
        assert _origin_count(node) == 2

        status, index = _call(f"{edge.url}/v2/repository/index", {})
        big = [m for m in index if m["name"] == "big"]  # type: ignore[attr-defined]
        assert big and big[0]["reason"].startswith("fetching"), index

        while _call(f"{edge.url}/v2/models/big/ready")[0] != 200:
            assert time.monotonic() - started < 30, edge.log()
            time.sleep(0.05)
        fetch_s = time.monotonic() - started
        print(f"first answer {first_s:.3f} s, fetched and loaded in {fetch_s:.2f} s")
        assert first_s < fetch_s / 4

        forwarded = _origin_count(node)
        for _ in range(3):
            status, body = _infer(edge, x)
            assert status == 200
            np.testing.assert_allclose(
                np.array(body["outputs"][0]["data"]).reshape(2, CLASSES),  # type: ignore[index]
                expected,
                rtol=1e-5,
            )
        assert _origin_count(node) == forwarded  # served locally now
        _, stats = _call(f"{edge.url}/v2/models/big/stats")
        assert stats["model_stats"][0]["inference_count"] == 6  # type: ignore[index]
        with urllib.request.urlopen(f"{edge.url}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'gateway_forwarded_requests_total{target="origin"} 1.0' in metrics
        deadline = time.monotonic() + 5  # access-log lines are written in batches
        while True:
            hosts = [
                line.get("host")
                for line in map(json.loads, (x for x in edge.log().splitlines() if x[:1] == "{"))
                if line.get("logger") == "gateway.access"
            ]
            if len(hosts) >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert hosts == ["origin", "local", "local", "local"], hosts
    finally:
        edge.stop()
        link.stop()
        node.stop()


def test_unreachable_target_falls_back_to_waiting(tmp_path: Path) -> None:
    root = build_repo(tmp_path / "origin")
    origin = FakeOrigin(root, chunk_delay_s=0.05).start()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    edge = start_gateway(
        origin.url,  # type: ignore[arg-type]
        tmp_path,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--forward-while-fetching",
        dead,
    )
    try:
        status, body = _call(f"{edge.url}/v2/models/simple/infer", SIMPLE_INPUTS)
        assert status == 200, (body, edge.log())
        assert body["outputs"][0]["data"][:2] == [1, 2]  # type: ignore[index]
        with urllib.request.urlopen(f"{edge.url}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert f'gateway_forward_failures_total{{target="{dead}"}} 1.0' in metrics
        assert not [
            x
            for x in metrics.splitlines()
            if x.startswith("gateway_forwarded_requests_total{") and not x.endswith(" 0.0")
        ]
    finally:
        edge.stop()
        origin.stop()


def test_origin_keyword_needs_a_gateway_node(tmp_path: Path) -> None:
    settings = Settings(
        model_repo="https://cdn.example/models",
        cache_dir=str(tmp_path),
        forward_while_fetching=("origin",),
    )
    with pytest.raises(SettingsError, match="gateway node"):
        Forwarder(settings, EdgeRepository(settings))
