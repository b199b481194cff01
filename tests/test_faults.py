"""Faults under load: every request gets an answer (success or a clear error); none is lost."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp

from tests import models
from tests.helpers import start_gateway

CONFIG = """
name: "m"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 2000 }
"""


async def test_model_replaced_and_unloaded_while_serving(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    models.add_sub(repo, "m", config=CONFIG)
    gw = start_gateway(repo, tmp_path, env={"GATEWAY_ACCESS_LOG": "false"})
    body = {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
        ]
    }
    counts = {"sent": 0, "ok": 0, "failed": 0, "lost": 0}
    failures: dict[int, int] = {}
    stop_at = time.monotonic() + 4.0
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

            async def client() -> None:
                while time.monotonic() < stop_at:
                    counts["sent"] += 1
                    try:
                        async with session.post(f"{gw.url}/v2/models/m/infer", json=body) as r:
                            payload = await r.json()
                            if r.status == 200:
                                out = payload["outputs"][0]["data"]
                                # Whatever version answered, the sum is right for it.
                                offset = int(payload["model_version"]) * 10 - 10
                                assert out == [i + 1 + offset for i in range(16)]
                                counts["ok"] += 1
                            else:
                                assert "error" in payload
                                counts["failed"] += 1
                                failures[r.status] = failures.get(r.status, 0) + 1
                    except (aiohttp.ClientError, TimeoutError):
                        counts["lost"] += 1

            async def operator() -> None:
                version = 1
                while time.monotonic() < stop_at - 0.5:
                    await asyncio.sleep(0.3)
                    version += 1
                    models.add_sub(
                        repo, "m", version=version, config=CONFIG, offset=version * 10 - 10
                    )
                    async with session.post(f"{gw.url}/v2/repository/models/m/load") as r:
                        assert r.status == 200, await r.text()
                    if version % 3 == 0:
                        async with session.post(f"{gw.url}/v2/repository/models/m/unload") as r:
                            assert r.status == 200
                        await asyncio.sleep(0.1)
                        async with session.post(f"{gw.url}/v2/repository/models/m/load") as r:
                            assert r.status == 200

            await asyncio.gather(operator(), *(client() for _ in range(8)))
            async with session.get(f"{gw.url}/v2/health/ready") as r:
                assert r.status == 200
    finally:
        gw.stop()
    print(json.dumps({**counts, "failed_by_status": failures}))
    assert counts["lost"] == 0
    assert counts["sent"] == counts["ok"] + counts["failed"]
    assert set(failures) <= {503}  # only "not ready" while unloaded
    assert counts["ok"] > counts["failed"]
