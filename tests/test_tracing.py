"""Distributed tracing (``gateway.tracing``): one trace per request across gateways, Triton hosts
and edge fetches, read from the OpenTelemetry SDK's in-memory exporter.

Every gateway here runs in this process (uvicorn in a thread), so all of them hand their spans
to the one exporter; which gateway made a span is told by its place in the trace.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway import trace_settings, tracing
from gateway.settings import Settings
from gateway.testing.delay_proxy import DelayProxy
from gateway.testing.tritonserver import TritonServer, tritonserver_unavailable_reason
from tests import models
from tests.edge_origins import SIMPLE_INPUTS, FakeOrigin, build_repo
from tests.helpers import InProcessGateway, free_port, get

# A long queue delay: requests sent together meet in one batch, deterministically.
DENSE_CONFIG = (
    'name: "dense"\nmax_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 500000 }'
)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.install(exporter, ratio=1.0)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def _caller() -> tuple[str, str]:
    """A client's own trace id and span id (hex), as its tracer would make them."""
    return os.urandom(16).hex(), os.urandom(8).hex()


def _post(url: str, body: object, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **headers}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())


def _dense_body(seed: int) -> dict[str, Any]:
    x = np.random.default_rng(seed).standard_normal((1, 4)).astype(np.float32)
    return {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 4], "data": x[0].tolist()}]}


def _named(finished: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


def _sid(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def _tid(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def _parent_sid(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_off_by_default_and_no_spans() -> None:
    assert not tracing.enabled
    assert tracing.span(tracing.EXECUTE) is tracing.NULL
    assert tracing.outbound(None) is None
    assert tracing.inject({"a": "b"}) == {"a": "b"}
    assert Settings().trace_endpoint == ""


def test_one_trace_client_gateway_gateway_onnxruntime(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    """Three clients' requests meet in one batch at the front gateway (the raw HTTP path); the
    batch goes on to a second gateway (the ASGI path), which runs it in ONNX Runtime. Each
    client's request span continues its caller's trace; the batch span is linked to all three
    and carries the first one's trace through the second gateway down to ONNX Runtime."""
    repo = tmp_path / "repo"
    models.dense(repo, "dense", features=4, classes=2, config=DENSE_CONFIG)
    back = InProcessGateway(Settings(model_repo=str(repo), port=free_port())).start()
    front_settings = Settings(
        model_repo=str(repo),
        port=free_port(),
        batching_delay="triton",  # the three wait for each other, whatever their arrival gaps
        local_execution=False,
        hosts=({"name": "back", "kind": "v2", "url": back.url.removeprefix("http://")},),
    )
    front = InProcessGateway(front_settings, raw=True).start()
    callers = [_caller() for _ in range(3)]

    def call(i: int) -> int:
        trace_id, span_id = callers[i]
        headers = {"traceparent": f"00-{trace_id}-{span_id}-01", "X-Request-ID": f"client-{i}"}
        return _post(f"{front.url}/v2/models/dense/infer", _dense_body(i), headers)[0]

    try:
        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(call, range(3))) == [200, 200, 200]
    finally:
        front.stop()
        back.stop()
    finished = spans.get_finished_spans()
    requests = _named(finished, tracing.REQUEST)
    by_caller = {int(span_id, 16): int(trace_id, 16) for trace_id, span_id in callers}
    front_requests = [s for s in requests if _parent_sid(s) in by_caller]
    assert len(front_requests) == 3
    for span in front_requests:
        assert span.parent is not None and span.parent.is_remote
        assert _tid(span) == by_caller[span.parent.span_id]  # the caller's trace continues
        assert span.attributes is not None
        assert span.attributes[tracing.REQUEST_ID].startswith("client-")  # type: ignore[union-attr]
        assert span.attributes["gateway.protocol"] == "http"
        assert span.attributes["gateway.status"] == 200
        assert span.attributes["gateway.host"] == "back"
        queue = [q for q in _named(finished, tracing.QUEUE) if _parent_sid(q) == _sid(span)]
        assert len(queue) == 1 and _tid(queue[0]) == _tid(span)
    # One batch at the front, linked to every member's request span.
    front_ids = {_sid(s) for s in front_requests}
    batches = [b for b in _named(finished, tracing.BATCH) if _parent_sid(b) in front_ids]
    assert len(batches) == 1, [b.attributes for b in _named(finished, tracing.BATCH)]
    batch = batches[0]
    assert {link.context.span_id for link in batch.links} == front_ids
    assert batch.attributes is not None and batch.attributes["gateway.batch.size"] == 3
    trace_id = _tid(batch)
    assert trace_id in by_caller.values()
    # The batch's call to the second gateway, and that gateway's own spans, in the same trace.
    [execute] = [e for e in _named(finished, tracing.EXECUTE) if _parent_sid(e) == _sid(batch)]
    assert execute.attributes is not None and execute.attributes["gateway.host"] == "back"
    [back_request] = [r for r in requests if _parent_sid(r) == _sid(execute)]
    assert _tid(back_request) == trace_id
    [back_batch] = [
        b for b in _named(finished, tracing.BATCH) if _parent_sid(b) == _sid(back_request)
    ]
    [ort] = _named(finished, tracing.ORT_RUN)
    assert _parent_sid(ort) == _sid(back_batch) and _tid(ort) == trace_id


def test_grpc_metadata_continues_the_callers_trace(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    repo = tmp_path / "repo"
    models.dense(repo, "dense", features=4, classes=2)
    grpc_port = free_port()
    gw = InProcessGateway(
        Settings(model_repo=str(repo), port=free_port(), grpc_port=grpc_port)
    ).start()
    trace_id, span_id = _caller()
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        x = grpcclient.InferInput("X", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        client.infer("dense", [x], headers={"traceparent": f"00-{trace_id}-{span_id}-01"})
        # A stream's metadata is the context of each of its requests.
        answers: list[object] = []
        stream_trace, stream_span = _caller()
        client.start_stream(
            lambda result, error: answers.append(error or result),
            headers={"traceparent": f"00-{stream_trace}-{stream_span}-01"},
        )
        for _ in range(2):
            client.async_stream_infer("dense", [x])
        client.stop_stream()
        assert len(answers) == 2 and not any(isinstance(a, Exception) for a in answers)
        # Triton's trace extension over gRPC too.
        got = client.get_trace_settings(as_json=True)["settings"]
        assert got["trace_level"]["value"] == ["TIMESTAMPS"] and got["trace_rate"]["value"] == ["1"]
        changed = client.update_trace_settings("dense", {"trace_rate": "10"}, as_json=True)
        assert changed["settings"]["trace_rate"]["value"] == ["10"]
        assert client.get_trace_settings(as_json=True)["settings"]["trace_rate"]["value"] == ["1"]
        cleared = client.update_trace_settings("dense", {"trace_rate": None}, as_json=True)
        assert cleared["settings"]["trace_rate"]["value"] == ["1"]
        with pytest.raises(InferenceServerException, match="does not apply"):
            client.update_trace_settings(settings={"trace_file": "x"})
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.get_trace_settings("nope")
        client.close()
    finally:
        gw.stop()
    requests = _named(spans.get_finished_spans(), tracing.REQUEST)
    [request] = [r for r in requests if format(_tid(r), "032x") == trace_id]
    streamed = [r for r in requests if format(_tid(r), "032x") == stream_trace]
    assert len(streamed) == 2 and {_parent_sid(r) for r in streamed} == {int(stream_span, 16)}
    assert _parent_sid(request) == int(span_id, 16)
    assert request.attributes is not None
    assert request.attributes["gateway.protocol"] == "grpc"
    assert request.attributes["gateway.status"] == "OK"


@pytest.mark.triton
def test_traceparent_reaches_tritonserver(tmp_path: Path, spans: InMemorySpanExporter) -> None:
    """gateway -> real tritonserver over HTTP, through a proxy that keeps what the gateway
    sent: the inference call carries the request's trace, with the gateway's execution span as
    the parent Triton sees."""
    reason = tritonserver_unavailable_reason()
    if reason is not None:
        pytest.skip(f"tritonserver unavailable: {reason}")
    repo = tmp_path / "repo"
    models.add_sub(repo, "simple")
    trace_id, span_id = _caller()
    with TritonServer() as server:
        assert server.http_port is not None
        proxy = DelayProxy(server.http_port, capture=True).start()
        host = {
            "kind": "triton",
            "name": "t1",
            "device": "cpu",
            "url": proxy.address,
            "models": ["simple"],
        }
        settings = Settings(
            model_repo=str(repo),
            port=free_port(),
            local_execution=False,
            host_probe_interval_s=0.5,
            hosts=(host,),
        )
        gw = InProcessGateway(settings).start()
        try:
            headers = {"traceparent": f"00-{trace_id}-{span_id}-01"}
            status, _ = _post(f"{gw.url}/v2/models/simple/infer", SIMPLE_INPUTS, headers)
            assert status == 200
        finally:
            gw.stop()
            proxy.stop()
    finished = spans.get_finished_spans()
    [execute] = [
        e for e in _named(finished, tracing.EXECUTE) if format(_tid(e), "032x") == trace_id
    ]
    assert execute.attributes is not None and execute.attributes["gateway.host"] == "t1"
    sent = b"".join(proxy.sent)
    infer_calls = [
        m.start() for m in re.finditer(rb"POST /v2/models/simple/versions/1/infer", sent)
    ]
    assert infer_calls, sent[:2000]
    seen = re.findall(rb"(?i)traceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-01", sent)
    assert (trace_id.encode(), format(_sid(execute), "016x").encode()) in seen


def test_edge_fetch_in_the_trace_of_the_request_that_caused_it(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    origin = FakeOrigin(build_repo(tmp_path / "origin")).start()
    settings = Settings(model_repo=origin.url, cache_dir=str(tmp_path / "cache"), port=free_port())
    edge = InProcessGateway(settings).start()
    trace_id, span_id = _caller()
    try:
        assert get(f"{edge.url}/v2/health/ready")[0] == 200
        headers = {"traceparent": f"00-{trace_id}-{span_id}-01"}
        status, _ = _post(f"{edge.url}/v2/models/simple/infer", SIMPLE_INPUTS, headers)
        assert status == 200
    finally:
        edge.stop()
        origin.stop()
    finished = spans.get_finished_spans()
    [request] = [r for r in _named(finished, tracing.REQUEST) if _parent_sid(r) == int(span_id, 16)]
    fetches = _named(finished, tracing.EDGE_FETCH)
    assert fetches, [s.name for s in finished]
    for fetch in fetches:
        assert format(_tid(fetch), "032x") == trace_id
        assert fetch.attributes is not None
        assert fetch.attributes["edge.source"] == "origin"
        assert fetch.attributes["edge.resumed"] is False
        assert int(fetch.attributes["edge.bytes"]) > 0  # type: ignore[arg-type]
    assert _tid(request) == int(trace_id, 16)
    # The origin was asked in the same trace.
    blob_gets = [h for h in origin.headers if "traceparent" in h]
    assert blob_gets and all(h["traceparent"].split("-")[1] == trace_id for h in blob_gets)


def _setting(url: str, body: object | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def dense_gateway(tmp_path: Path) -> Iterator[InProcessGateway]:
    repo = tmp_path / "repo"
    models.dense(repo, "dense", features=4, classes=2)
    gw = InProcessGateway(Settings(model_repo=str(repo), port=free_port()), raw=True).start()
    try:
        yield gw
    finally:
        gw.stop()


def _requests_traced(gw: InProcessGateway, spans: InMemorySpanExporter, count: int) -> int:
    spans.clear()
    for i in range(count):
        assert _post(f"{gw.url}/v2/models/dense/infer", _dense_body(i), {})[0] == 200
    return len(_named(spans.get_finished_spans(), tracing.REQUEST))


def test_trace_setting_extension(
    dense_gateway: InProcessGateway, spans: InMemorySpanExporter
) -> None:
    """Triton's trace extension changes sampling at run time, globally and per model."""
    url = dense_gateway.url
    assert "trace" in json.loads(get(f"{url}/v2")[1])["extensions"]
    status, setting = _setting(f"{url}/v2/trace/setting")
    assert status == 200
    assert setting["trace_level"] == ["TIMESTAMPS"] and setting["trace_rate"] == "1"
    assert setting["trace_count"] == "-1" and setting["trace_mode"] == "opentelemetry"
    assert _requests_traced(dense_gateway, spans, 2) == 2
    # The model's own level OFF: none of its requests is traced, even with a sampled caller.
    status, setting = _setting(f"{url}/v2/models/dense/trace/setting", {"trace_level": ["OFF"]})
    assert (status, setting["trace_level"]) == (200, ["OFF"])
    assert _setting(f"{url}/v2/trace/setting")[1]["trace_level"] == ["TIMESTAMPS"]
    assert _requests_traced(dense_gateway, spans, 2) == 0
    trace_id, span_id = _caller()
    headers = {"traceparent": f"00-{trace_id}-{span_id}-01"}
    assert _post(f"{url}/v2/models/dense/infer", _dense_body(0), headers)[0] == 200
    assert not _named(spans.get_finished_spans(), tracing.REQUEST)
    # null clears the model's setting: the global one applies again.
    status, setting = _setting(f"{url}/v2/models/dense/trace/setting", {"trace_level": None})
    assert (status, setting["trace_level"]) == (200, ["TIMESTAMPS"])
    # trace_count: that many more traces, then none; counted down in the GET.
    status, setting = _setting(f"{url}/v2/trace/setting", {"trace_count": "1"})
    assert (status, setting["trace_count"]) == (200, "1")
    assert _requests_traced(dense_gateway, spans, 3) == 1
    assert _setting(f"{url}/v2/trace/setting")[1]["trace_count"] == "0"
    status, setting = _setting(f"{url}/v2/trace/setting", {"trace_count": "-1", "trace_rate": "4"})
    assert (setting["trace_rate"], setting["trace_sample_ratio"]) == ("4", "0.25")
    # What does not apply or is not valid is refused, and the settings stay as they were.
    for body in (
        {"trace_file": "/tmp/t.json"},
        {"log_frequency": "10"},
        {"trace_rate": "0"},
        {"trace_rate": "many"},
        {"trace_level": ["LOUD"]},
        {"trace_count": "-2"},
        {"something": "1"},
        ["trace_rate"],
    ):
        status, answer = _setting(f"{url}/v2/trace/setting", body)
        assert status == 400 and answer["error"], body
    assert _setting(f"{url}/v2/trace/setting")[1]["trace_rate"] == "4"
    assert _setting(f"{url}/v2/models/nope/trace/setting")[0] == 404
    assert _setting(f"{url}/v2/models/nope/trace/setting", {"trace_rate": "2"})[0] == 404


def test_trace_setting_when_tracing_is_off(dense_gateway: InProcessGateway) -> None:
    status, setting = _setting(f"{dense_gateway.url}/v2/trace/setting")
    assert (status, setting["trace_level"]) == (200, ["OFF"])
    status, answer = _setting(f"{dense_gateway.url}/v2/trace/setting", {"trace_rate": "1"})
    assert status == 400 and "trace_endpoint" in answer["error"]


def test_sampling_ratio_and_the_callers_flag(
    dense_gateway: InProcessGateway, spans: InMemorySpanExporter
) -> None:
    """At ratio 0 only requests whose caller sampled them are traced; a caller's "not sampled"
    flag is followed too."""
    assert _setting(f"{dense_gateway.url}/v2/trace/setting", {"trace_sample_ratio": 0})[0] == 200
    assert _requests_traced(dense_gateway, spans, 3) == 0
    for flags, traced in (("01", 1), ("00", 0)):
        trace_id, span_id = _caller()
        headers = {"traceparent": f"00-{trace_id}-{span_id}-{flags}"}
        spans.clear()
        assert (
            _post(f"{dense_gateway.url}/v2/models/dense/infer", _dense_body(0), headers)[0] == 200
        )
        assert len(_named(spans.get_finished_spans(), tracing.REQUEST)) == traced


def test_compose_gateways_trace_to_jaeger_and_dashboard_links_by_request_id() -> None:
    import yaml

    from gateway.settings import load_settings

    root = Path(__file__).resolve().parent.parent
    compose = yaml.safe_load((root / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "jaeger" in services and "16686:16686" in services["jaeger"]["ports"]
    for name in ("front", "worker-1", "worker-2", "origin"):
        settings = load_settings(env=services[name]["environment"])
        assert settings.trace_endpoint.startswith("http://jaeger:")
        assert settings.trace_service_name == name
    assert "--trace-config=mode=opentelemetry" in services["triton"]["command"]
    dashboard = json.loads((root / "deploy" / "grafana" / "gateway-dashboard.json").read_text())
    [link] = dashboard["links"]
    assert "${request_id}" in link["url"] and "gateway.request_id" in link["url"].replace("%22", "")
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"request_id", "trace_ui", "trace_service"} <= names


def test_trace_settings_are_checked() -> None:
    from gateway.settings import SettingsError, load_settings

    settings = load_settings(
        env={
            "GATEWAY_TRACE_ENDPOINT": "http://collector:4318/v1/traces",
            "GATEWAY_TRACE_SAMPLE_RATIO": "0.25",
            "GATEWAY_TRACE_SERVICE_NAME": "edge-3",
        }
    )
    assert (settings.trace_sample_ratio, settings.trace_service_name) == (0.25, "edge-3")
    for bad in ({"trace_sample_ratio": 1.5}, {"trace_endpoint": "collector:4317"}):
        with pytest.raises(SettingsError):
            load_settings(env={}, overrides=bad)


def test_spans_reach_an_otlp_http_collector(tmp_path: Path) -> None:
    """``trace_endpoint`` with a path: spans are exported over OTLP/HTTP (protobuf POSTs to it),
    flushed at the latest when tracing shuts down."""
    import http.server
    import threading

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    received: list[tuple[str, bytes]] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    repo = tmp_path / "repo"
    models.dense(repo, "dense", features=4, classes=2)
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}/v1/traces"
    settings = Settings(
        model_repo=str(repo), port=free_port(), trace_endpoint=endpoint, trace_service_name="gw-a"
    )
    tracing.setup(settings)
    try:
        gw = InProcessGateway(settings).start()
        try:
            assert _post(f"{gw.url}/v2/models/dense/infer", _dense_body(0), {})[0] == 200
        finally:
            gw.stop()
    finally:
        tracing.shutdown()
        collector.shutdown()
    assert received and all(path == "/v1/traces" for path, _ in received)
    names = set()
    for _, body in received:
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert service["service.name"] == "gw-a"
            names |= {s.name for scope in resource_spans.scope_spans for s in scope.spans}
    assert {tracing.REQUEST, tracing.QUEUE, tracing.BATCH, tracing.ORT_RUN} <= names


@pytest.fixture(scope="module")
def traced_once() -> Iterator[None]:
    """Tracing on for a property test's many examples (one tracer, not one per example)."""
    tracing.install(InMemorySpanExporter(), ratio=1.0)
    try:
        yield
    finally:
        tracing.shutdown()


@given(
    st.dictionaries(
        st.sampled_from(
            ["trace_level", "trace_rate", "trace_count", "trace_sample_ratio", "trace_mode", "x"]
        ),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner),
            max_leaves=4,
        ),
    ),
    st.sampled_from([None, "dense"]),
)
@hypothesis_settings(max_examples=300, deadline=None)
def test_any_trace_setting_body_is_applied_whole_or_refused(
    traced_once: None, body: dict[str, Any], model: str | None
) -> None:
    """Whatever JSON a POST holds, the settings change as a whole or not at all (a 400)."""
    from gateway.errors import InvalidInput

    before = trace_settings.trace_setting(model)
    try:
        after = trace_settings.update_trace_setting(model, body)
    except InvalidInput:
        assert trace_settings.trace_setting(model) == before
        return
    assert after == trace_settings.trace_setting(model)
    assert float(after["trace_sample_ratio"]) <= 1 and int(after["trace_count"]) >= -1


def test_a_sample_ratio_too_small_to_invert_is_reported(traced_once: None) -> None:
    """A subnormal ratio (found by the property test above): its inverse is not finite, so
    the GET reports the largest trace_rate instead of failing."""
    try:
        after = trace_settings.update_trace_setting("dense", {"trace_sample_ratio": "1e-320"})
        assert after["trace_rate"] == str(trace_settings.MAX_RATE)
        assert trace_settings.trace_setting("dense") == after
        half = trace_settings.update_trace_setting("dense", {"trace_sample_ratio": "0.5"})
        assert half["trace_rate"] == "2"
    finally:
        trace_settings.update_trace_setting("dense", {"trace_sample_ratio": None})


def test_cold_start_forwarding_in_the_requests_trace(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    """An edge fetching a model over a slow link forwards the request to its origin (a gateway
    node): the origin's request span is a child of the edge's forward span, in the client's
    trace, and the fetch the request started is in that trace too."""
    from gateway.repository.manifest import write_manifests

    repo = tmp_path / "origin"
    models.dense(repo, "big", features=256, classes=256)  # 256 KiB: ~2.5 s over the link
    write_manifests(repo)
    node = InProcessGateway(Settings(model_repo=str(repo), port=free_port())).start()
    link = DelayProxy(int(node.url.rsplit(":", 1)[1]), rate_bytes_s=100_000).start()
    edge = InProcessGateway(
        Settings(
            model_repo=link.url,
            cache_dir=str(tmp_path / "cache"),
            forward_while_fetching=("origin",),
            port=free_port(),
        )
    ).start()
    trace_id, span_id = _caller()
    x = np.ones((1, 256), np.float32)
    body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 256], "data": x[0].tolist()}]}
    try:
        headers = {"traceparent": f"00-{trace_id}-{span_id}-01"}
        assert _post(f"{edge.url}/v2/models/big/infer", body, headers)[0] == 200
    finally:
        edge.stop()
        link.stop()
        node.stop()
    finished = spans.get_finished_spans()
    [request] = [r for r in _named(finished, tracing.REQUEST) if _parent_sid(r) == int(span_id, 16)]
    assert request.attributes is not None and request.attributes["gateway.host"] == "origin"
    [forward] = _named(finished, tracing.FORWARD)
    assert _parent_sid(forward) == _sid(request)
    [served] = [r for r in _named(finished, tracing.REQUEST) if _parent_sid(r) == _sid(forward)]
    assert _tid(served) == _tid(request) == int(trace_id, 16)
    assert all(_tid(f) == _tid(request) for f in _named(finished, tracing.EDGE_FETCH))


def test_trace_settings_need_the_admin_key(tmp_path: Path, spans: InMemorySpanExporter) -> None:
    """The trace extension changes what the whole server traces: the repository / admin API's
    rule (admin key; not served with ``admin_api`` off), over HTTP and gRPC."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    repo = tmp_path / "repo"
    models.dense(repo, "dense", features=4, classes=2)
    grpc_port = free_port()
    settings = Settings(
        model_repo=str(repo),
        port=free_port(),
        grpc_port=grpc_port,
        api_keys=("user-key",),
        admin_keys=("admin-key",),
    )
    gw = InProcessGateway(settings).start()
    try:
        for path in ("/v2/trace/setting", "/v2/models/dense/trace/setting"):
            for key, status in (("user-key", 403), ("admin-key", 200), (None, 401)):
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                for data in (None, b'{"trace_rate": "2"}'):
                    request = urllib.request.Request(f"{gw.url}{path}", data=data, headers=headers)
                    try:
                        with urllib.request.urlopen(request, timeout=10) as response:
                            got = response.status
                    except urllib.error.HTTPError as exc:
                        got = exc.code
                    assert got == status, (path, key, data)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        with pytest.raises(InferenceServerException, match="admin"):
            client.get_trace_settings(headers={"authorization": "Bearer user-key"})
        got = client.get_trace_settings(headers={"authorization": "Bearer admin-key"}, as_json=True)
        assert got["settings"]["trace_rate"]["value"] == ["2"]
        client.close()
    finally:
        gw.stop()
    closed = Settings(model_repo=str(repo), port=free_port(), admin_api=False)
    gw = InProcessGateway(closed).start()
    try:
        assert get(f"{gw.url}/v2/trace/setting")[0] == 404
    finally:
        gw.stop()


async def test_untraced_batches_carry_no_stale_context(spans: InMemorySpanExporter) -> None:
    """A batcher made while a request's span was current (a first-use load runs in the
    request's trace) must not hand that span to later batches: a batch with no traced member
    sends no ``traceparent`` upstream, one with a traced member sends that member's trace."""
    from gateway.batching import Batcher, BatchPolicy, Executed
    from gateway.stats import ModelStats

    sent: list[dict[str, str]] = []

    async def execute(inputs: Any, outputs: Any, deadline_s: float | None) -> Executed:
        sent.append(tracing.inject({}))
        return Executed({"Y": inputs["X"]})

    loader = tracing.start_request("m", None, "loader", None)
    assert loader is not None
    tracing.use(loader)  # as in DataPlane._serve_cold: the load (and the batcher) in its trace
    batcher = Batcher(execute, ["Y"], BatchPolicy(max_batch_size=4), ModelStats("m", "1"))
    x = {"X": np.ones((1, 2), np.float32)}
    await batcher.enqueue(x).future  # an untraced request
    caller_trace, caller_span = _caller()  # another client's request, in its own trace
    incoming = tracing.Incoming("http", f"00-{caller_trace}-{caller_span}-01")
    traced = tracing.start_request("m", None, "later", incoming)
    assert traced is not None
    item = batcher.enqueue(x)
    item.trace = traced
    await item.future
    await batcher.close(1.0)
    loader_trace = format(loader.get_span_context().trace_id, "032x")
    assert "traceparent" not in sent[0], sent[0]
    assert loader_trace not in sent[1]["traceparent"]
    assert caller_trace in sent[1]["traceparent"]
