"""Prometheus metrics and structured access logs from the real gateway."""

from __future__ import annotations

import asyncio
import io
import json
import time

import numpy as np
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families

from gateway.logs import AccessLog
from tests.helpers import GatewayProcess, raw, simple_inputs


def scrape(gw: GatewayProcess) -> dict[str, list[tuple[dict[str, str], float]]]:
    status, headers, body = raw(gw, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return sum(
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    )


def test_triton_compatible_metrics(gateway: GatewayProcess) -> None:
    client = httpclient.InferenceServerClient(gateway.address)
    before = scrape(gateway)
    ins, _, _ = simple_inputs(2)
    for _ in range(3):
        client.infer("simple", ins)
    bad = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 16), np.float32))
    try:
        client.infer("simple", [bad, simple_inputs()[0][1]])
    except Exception:
        pass
    after = scrape(gateway)
    m = {"model": "simple", "version": "1"}
    assert (
        value(after, "nv_inference_request_success_total", **m)
        - value(before, "nv_inference_request_success_total", **m)
        == 3
    )
    assert (
        value(after, "nv_inference_count_total", **m)
        - value(before, "nv_inference_count_total", **m)
        == 6
    )
    assert value(after, "nv_inference_request_failure_total", **m) >= 1
    for name in (
        "nv_inference_exec_count_total",
        "nv_inference_request_duration_us_total",
        "nv_inference_queue_duration_us_total",
        "nv_inference_compute_infer_duration_us_total",
        "gateway_batch_size_count",
        "gateway_request_duration_seconds_bucket",
    ):
        assert value(after, name, **m) > 0, name
    assert "nv_inference_pending_request_count" in after


def test_access_log_is_json_with_request_id(gateway: GatewayProcess) -> None:
    status, headers, _ = raw(
        gateway,
        "POST",
        "/v2/models/simple/infer",
        json.dumps(
            {
                "inputs": [
                    {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [0] * 16},
                    {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [0] * 16},
                ]
            }
        ).encode(),
        {"X-Request-ID": "trace-abc-123"},
    )
    assert status == 200 and headers["x-request-id"] == "trace-abc-123"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in gateway.log().splitlines() if "trace-abc-123" in line]
        if lines:
            break
        time.sleep(0.05)
    entry = lines[0]
    assert entry["logger"] == "gateway.access" and entry["model"] == "simple"
    assert entry["status"] == 200 and entry["batch_size"] >= 1
    assert {"queue_ms", "compute_ms", "duration_ms", "host"} <= set(entry)


def test_access_log_lines_are_written_in_batches() -> None:
    """Lines wait (at most ``interval_s``) and go out together, in order; a full buffer goes out
    at once; off an event loop each line is written straight away."""
    stream = io.StringIO()
    log = AccessLog(interval_s=0.05, max_lines=4)
    log.stream = stream

    async def burst() -> tuple[str, str]:
        for i in range(3):
            log.write({"request_id": f"r{i}", "status": 200})
        before = stream.getvalue()
        await asyncio.sleep(0.2)
        return before, stream.getvalue()

    before, after = asyncio.run(burst())
    assert before == ""
    lines = [json.loads(line) for line in after.splitlines()]
    assert [line["request_id"] for line in lines] == ["r0", "r1", "r2"]
    assert lines[0]["logger"] == "gateway.access" and lines[0]["msg"] == "infer"

    async def flood() -> int:
        for i in range(4):
            log.write({"request_id": f"f{i}"})
        return len(stream.getvalue().splitlines())

    assert asyncio.run(flood()) == 3 + 4  # max_lines reached: written without waiting
    log.text = True
    log.write({"model": "simple", "status": 404})  # no running loop
    assert (
        stream.getvalue()
        .splitlines()[-1]
        .endswith("INFO gateway.access: infer model=simple status=404")
    )
