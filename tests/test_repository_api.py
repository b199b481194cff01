"""Loading, reloading and unloading at run time, through the repository extension."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

from tests import models
from tests.helpers import GatewayProcess, raw, simple_inputs, start_gateway

SLOW_BATCH = """
name: "slow"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
        { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]
dynamic_batching { max_queue_delay_microseconds: 300000 preferred_batch_size: [ 8 ] }
version_policy { latest { num_versions: 1 } }
"""


@pytest.fixture
def own_gateway(tmp_path: Path) -> Iterator[tuple[GatewayProcess, Path]]:
    repo = tmp_path / "repo"
    models.add_sub(repo, "simple")
    models.add_sub(repo, "slow", config=SLOW_BATCH)
    models.add_sub(repo, "pinned", version=2, offset=100)
    models.add_sub(
        repo,
        "pinned",
        version=1,
        config=SLOW_BATCH.replace("slow", "pinned").replace(
            "latest { num_versions: 1 }", "specific { versions: [ 1 ] }"
        ),
    )
    gw = start_gateway(repo, tmp_path)
    try:
        yield gw, repo
    finally:
        gw.stop()


def test_version_policy_specific(own_gateway: tuple[GatewayProcess, Path]) -> None:
    gw, _ = own_gateway
    client = httpclient.InferenceServerClient(gw.address)
    assert client.get_model_metadata("pinned")["versions"] == ["1"]
    assert not client.is_model_ready("pinned", "2")


async def test_reload_new_version_keeps_in_flight(own_gateway: tuple[GatewayProcess, Path]) -> None:
    gw, repo = own_gateway
    client = aiohttpclient.InferenceServerClient(gw.address)
    try:
        ins, a, b = simple_inputs()
        # Queued behind a 300 ms batching window when the reload happens.
        queued = [asyncio.ensure_future(client.infer("slow", ins)) for _ in range(5)]
        await asyncio.sleep(0.05)
        models.add_sub(repo, "slow", version=2, config=SLOW_BATCH, offset=100)
        await client.load_model("slow")
        done = await asyncio.gather(*queued)
        for result in done:
            assert result.get_response()["model_version"] == "1"
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        after = await client.infer("slow", ins)
        assert after.get_response()["model_version"] == "2"
        np.testing.assert_array_equal(after.as_numpy("OUTPUT0"), a + b + 100)
        assert (await client.get_model_metadata("slow"))["versions"] == ["2"]
    finally:
        await client.close()


async def test_unload_drains_then_refuses(own_gateway: tuple[GatewayProcess, Path]) -> None:
    gw, _ = own_gateway
    client = aiohttpclient.InferenceServerClient(gw.address)
    try:
        ins, a, b = simple_inputs()
        queued = [asyncio.ensure_future(client.infer("slow", ins)) for _ in range(3)]
        await asyncio.sleep(0.05)
        await client.unload_model("slow")
        for result in await asyncio.gather(*queued):
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        assert not await client.is_model_ready("slow")
        with pytest.raises(InferenceServerException, match="not ready"):
            await client.infer("slow", ins)
        index = {m["name"]: m for m in await client.get_model_repository_index()}
        assert index["slow"]["state"] == "UNAVAILABLE" and index["slow"]["reason"] == "unloaded"
        await client.load_model("slow")
        assert await client.is_model_ready("slow")
    finally:
        await client.close()


def test_load_with_pushed_config_and_files(
    own_gateway: tuple[GatewayProcess, Path], tmp_path: Path
) -> None:
    gw, _ = own_gateway
    scratch = tmp_path / "scratch"
    onnx_path = models.add_sub(scratch, "pushed", offset=7)
    config = json.dumps(
        {
            "name": "pushed",
            "max_batch_size": 4,
            "input": [
                {"name": "INPUT0", "data_type": "TYPE_INT32", "dims": [16]},
                {"name": "INPUT1", "data_type": "TYPE_INT32", "dims": [16]},
            ],
        }
    )
    client = httpclient.InferenceServerClient(gw.address)
    client.load_model("pushed", config=config, files={"file:1/model.onnx": onnx_path.read_bytes()})
    ins, a, b = simple_inputs()
    np.testing.assert_array_equal(client.infer("pushed", ins).as_numpy("OUTPUT0"), a + b + 7)
    assert client.get_model_config("pushed")["max_batch_size"] == 4
    # A config that contradicts the model is refused with a reason naming the field.
    bad = json.loads(config)
    bad["input"][0]["data_type"] = "TYPE_FP32"
    body = {
        "parameters": {
            "config": json.dumps(bad),
            "file:1/model.onnx": base64.b64encode(onnx_path.read_bytes()).decode(),
        }
    }
    status, _, data = raw(
        gw, "POST", "/v2/repository/models/pushed/load", json.dumps(body).encode()
    )
    assert status == 400 and "INPUT0" in json.loads(data)["error"]
    # ... and the previously loaded version keeps serving.
    np.testing.assert_array_equal(client.infer("pushed", ins).as_numpy("OUTPUT0"), a + b + 7)


def test_invalid_config_names_file_and_field(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    models.add_sub(repo, "good")
    models.add_sub(repo, "typo", config='name: "typo"\nmax_batch_sise: 8\n')
    models.add_sub(repo, "negative", config='name: "negative"\nmax_batch_size: -3\n')
    gw = start_gateway(repo, tmp_path)
    try:
        index = {
            m["name"]: m
            for m in httpclient.InferenceServerClient(gw.address).get_model_repository_index()
        }
    finally:
        gw.stop()
    assert index["good"]["state"] == "READY"
    assert "config.pbtxt" in index["typo"]["reason"] and "max_batch_sise" in index["typo"]["reason"]
    assert "max_batch_size" in index["negative"]["reason"]
