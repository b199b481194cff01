"""SIGTERM: readiness goes false, queued work completes, new work is refused, the process exits."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import numpy as np

from tests import models
from tests.helpers import start_gateway

SLOW = """
name: "slow"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 1500000 preferred_batch_size: [ 8 ] }
"""


async def test_graceful_shutdown(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    models.add_sub(repo, "slow", config=SLOW)
    gw = start_gateway(repo, tmp_path, env={"GATEWAY_SHUTDOWN_DELAY_S": "1.0"})
    body = {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
        ]
    }
    try:
        async with aiohttp.ClientSession() as session:

            async def infer() -> tuple[int, dict]:
                async with session.post(f"{gw.url}/v2/models/slow/infer", json=body) as r:
                    return r.status, await r.json()

            # Three requests sit in a 1.5 s batching window when SIGTERM arrives.
            queued = [asyncio.ensure_future(infer()) for _ in range(3)]
            await asyncio.sleep(0.3)
            started = time.monotonic()
            gw.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            async with session.get(f"{gw.url}/v2/health/ready") as r:
                assert r.status == 503
            status, payload = await infer()
            assert status == 503 and "shutting down" in payload["error"]
            for status, payload in await asyncio.gather(*queued):
                assert status == 200
                assert payload["outputs"][0]["data"] == list(np.arange(16) + 1)
        code = await asyncio.to_thread(gw.process.wait, 30)
        # uvicorn re-raises the captured SIGTERM once shutdown is complete.
        assert code in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in gw.log()
        assert time.monotonic() - started < 15
    finally:
        gw.stop()
