"""Distributed tracing with OpenTelemetry: one trace per request across edges, gateways and hosts.

What it owns: turning tracing on and off (``setup``, ``install``, ``shutdown``), the span helpers
and W3C propagation the core calls, and the sampler. It is the one place that imports
OpenTelemetry. The run-time settings of Triton's trace extension, which the sampler reads, are
``gateway.trace_settings``'s.

Off by default, and then free: every hook in the core is guarded by one read of ``enabled``
(a module global, ``tracing.enabled``), and this module builds no span, context or header until
``setup`` (a ``trace_endpoint`` is set) or ``install`` (tests, benches) turns it on.

On, a request gets these spans (names are the constants below):

- ``gateway.request`` (SERVER): from ``DataPlane.submit`` to the front end's answer, a child of
  the caller's W3C ``traceparent`` (HTTP header or gRPC metadata) when it sent one. Attributes:
  model, version, protocol, request id (the access log's), status, request and response bytes,
  the batch size it ran in and the host.
- ``gateway.queue``: its wait in the batcher's queue (timed from the batcher's own figures).
- ``gateway.batch``: one per batch, a child of its first sampled member and linked to every
  sampled member's request span, with the batch size; the execution below is its child, so
  outbound calls carry the batch's context.
- ``gateway.execute`` (one per attempt: host name, retry or not), ``onnxruntime.run``, and
  ``gateway.forward`` (a request forwarded while its model is fetched).
- ``edge.fetch``: one per download attempt of a blob (source peer or origin, bytes, resumed
  or not), in the trace of the request whose first use started the fetch.

Outbound calls (v2 hosts, Triton hosts over HTTP or gRPC, origin and peer fetches, cold-start
forwarding) carry ``traceparent`` / ``tracestate`` from the current context (``inject``).

Sampling follows Triton's trace extension (``GET/POST /v2[/models/{m}]/trace/setting``, served
by ``gateway.server.trace_setting``, and gRPC ``TraceSetting``), global and per model, mapped
onto OpenTelemetry as ``TraceSampler`` and ``trace_settings.update_trace_setting`` say.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.trace_settings import CONFIG, TraceConfig, started, stopped

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from gateway.batching import Queued
    from gateway.pending import Pending
    from gateway.settings import Settings

log = logging.getLogger(__name__)

REQUEST, QUEUE, BATCH, EXECUTE, ORT_RUN, EDGE_FETCH, FORWARD = (
    "gateway.request",
    "gateway.queue",
    "gateway.batch",
    "gateway.execute",
    "onnxruntime.run",
    "edge.fetch",
    "gateway.forward",
)
MODEL = "gateway.model"  # the request span's attribute the sampler reads
REQUEST_ID = "gateway.request_id"

enabled = False  # THE cheap check: read by every hook before it does anything

_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None
_propagator = TraceContextTextMapPropagator()
NULL: AbstractContextManager[None] = nullcontext()  # the no-op ``with`` of a hook when off


# -- sampling: OpenTelemetry's sampler over Triton's trace settings ---------------------------

_MAX_ID = 1 << 64


def _ratio_bound(ratio: float) -> int:
    return round(max(0.0, min(1.0, ratio)) * _MAX_ID)


class TraceSampler(Sampler):
    """OpenTelemetry's sampler for the gateway's spans.

    - A request (``gateway.request``) is dropped when its model's ``trace_level`` is OFF, or
      its ``trace_count`` is spent. Otherwise a request whose caller sent a ``traceparent``
      follows the caller's sampled flag (so a trace is whole or absent across hops), and one
      without is sampled with probability ``1 / trace_rate`` by its trace id (OpenTelemetry's
      ``TraceIdRatioBased`` rule: the same trace id gives the same answer in every process;
      Triton instead takes every N-th request).
    - Every other span follows its parent; one with none (an edge fetch at start-up) is
      sampled by the global ratio unless the global level is OFF.
    """

    def __init__(self, config: TraceConfig) -> None:
        self.config = config

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        model = attributes.get(MODEL) if attributes and name == REQUEST else None
        setting = self.config.effective(model if isinstance(model, str) else None)
        if name == REQUEST:
            if setting.level is None or "OFF" in setting.level:
                sampled = False
            elif parent.is_valid:
                sampled = parent.trace_flags.sampled
            else:
                sampled = (trace_id & (_MAX_ID - 1)) < _ratio_bound(setting.ratio or 0.0)
            if sampled:
                sampled = self.config.take(model if isinstance(model, str) else None)
        elif parent.is_valid:
            sampled = parent.trace_flags.sampled
        else:
            off = setting.level is None or "OFF" in setting.level
            sampled = not off and (trace_id & (_MAX_ID - 1)) < _ratio_bound(setting.ratio or 0.0)
        state = parent.trace_state if parent.is_valid else None
        if not sampled:
            return SamplingResult(Decision.DROP, None, state)
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, state)

    def get_description(self) -> str:
        return "GatewayTraceSampler"


# -- turning it on and off ----------------------------------------------------------------------


def _exporter(endpoint: str) -> SpanExporter:
    """OTLP over HTTP when the URL has a path (``http://collector:4318/v1/traces``), else OTLP
    over gRPC (``http://collector:4317``; ``grpc://`` is read as ``http://``)."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("http", "https") and parts.path.strip("/"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )

    target = endpoint.replace("grpc://", "http://", 1)
    return GrpcExporter(endpoint=target, insecure=not target.startswith("https://"))


def setup(settings: Settings) -> None:
    """Tracing as ``settings`` say: off without a ``trace_endpoint``, else spans batched to it
    over OTLP, sampled at ``trace_sample_ratio``."""
    if not settings.trace_endpoint:
        shutdown()
        return
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    processor = BatchSpanProcessor(_exporter(settings.trace_endpoint))
    _install(processor, settings.trace_sample_ratio, settings.trace_service_name)
    log.info("tracing to %s, sample ratio %g", settings.trace_endpoint, settings.trace_sample_ratio)


def install(exporter: SpanExporter, ratio: float = 1.0, service_name: str = "gateway") -> None:
    """Tracing on, each span handed to ``exporter`` as it ends (tests: the SDK's in-memory
    exporter; benches)."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    _install(SimpleSpanProcessor(exporter), ratio, service_name)


def _install(processor: Any, ratio: float, service_name: str) -> None:
    global _tracer, _provider, enabled
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    shutdown()
    started(ratio)
    provider = TracerProvider(
        sampler=TraceSampler(CONFIG),
        resource=Resource.create({"service.name": service_name}),
    )
    provider.add_span_processor(processor)
    _provider, _tracer = provider, provider.get_tracer("gateway")
    enabled = True


def shutdown() -> None:
    """Tracing off; spans still buffered are exported first."""
    global _tracer, _provider, enabled
    enabled = False
    provider, _provider, _tracer = _provider, None, None
    stopped()
    if provider is not None:
        provider.shutdown()


# -- incoming context -----------------------------------------------------------------------


class Incoming(NamedTuple):
    """What a front end read of a request for its span: the caller's W3C context (if any), the
    protocol and the request's size."""

    protocol: str
    traceparent: str | None = None
    tracestate: str | None = None
    request_bytes: int = 0


def from_headers(
    headers: Iterable[tuple[bytes, bytes]], protocol: str, request_bytes: int
) -> Incoming:
    """``traceparent`` / ``tracestate`` from raw HTTP headers (names in lower case)."""
    parent = state = None
    for key, value in headers:
        if key == b"traceparent":
            parent = value.decode("latin-1")
        elif key == b"tracestate":
            state = value.decode("latin-1")
    return Incoming(protocol, parent, state, request_bytes)


def from_metadata(metadata: Iterable[tuple[str, Any]] | None, request_bytes: int) -> Incoming:
    """``traceparent`` / ``tracestate`` from gRPC invocation metadata."""
    parent = state = None
    for key, value in metadata or ():
        if key == "traceparent":
            parent = value if isinstance(value, str) else bytes(value).decode("latin-1")
        elif key == "tracestate":
            state = value if isinstance(value, str) else bytes(value).decode("latin-1")
    return Incoming("grpc", parent, state, request_bytes)


def _parent(incoming: Incoming | None) -> otel_context.Context | None:
    if incoming is None or not incoming.traceparent:
        return None
    carrier = {"traceparent": incoming.traceparent}
    if incoming.tracestate:
        carrier["tracestate"] = incoming.tracestate
    return _propagator.extract(carrier)


# -- spans ----------------------------------------------------------------------------------


def start_request(
    model: str, version: str | None, request_id: str | None, incoming: Incoming | None
) -> trace.Span | None:
    """The request's span (``DataPlane.submit``), ended by ``end_request``."""
    tracer = _tracer
    if tracer is None:
        return None
    attributes: dict[str, Any] = {MODEL: model, "gateway.model_version": version or ""}
    if request_id:
        attributes[REQUEST_ID] = request_id
    if incoming is not None:
        attributes["gateway.protocol"] = incoming.protocol
        attributes["gateway.request.bytes"] = incoming.request_bytes
    return tracer.start_span(
        REQUEST, context=_parent(incoming), kind=SpanKind.SERVER, attributes=attributes
    )


def end_request(span: trace.Span, pending: Pending, status: int | str, response_bytes: int) -> None:
    """End a request's span with how the front end answered (``Pending.answered``)."""
    if span.is_recording():
        attributes: dict[str, Any] = {
            "gateway.status": status,
            "gateway.response.bytes": response_bytes,
        }
        run = pending.execution  # queue and compute time are spans of their own
        if run is not None:
            attributes["gateway.batch.size"] = run.batch_size
            if run.host:
                attributes["gateway.host"] = run.host
        span.set_attributes(attributes)
        error = pending.error
        if pending.cancelled():
            span.set_status(Status(StatusCode.ERROR, "client went away"))
        elif error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(Status(StatusCode.ERROR, str(getattr(error, "message", error))))
    span.end()


def use(span: trace.Span | None) -> None:
    """Make ``span`` current in the running task (its own context: nothing to undo), so what the
    task starts (a first-use load, a forwarded call) is in the request's trace."""
    if span is not None:
        otel_context.attach(trace.set_span_in_context(span))


def batch_begins(batch: Sequence[Queued], rows: int) -> trace.Span | None:
    """At a batch's start (the batcher's task): each traced member's queue wait as a span, and
    the batch's span, made current for its execution; None when no member is sampled (the first
    member's context is made current anyway, so hosts learn it was not sampled; with no member
    traced at all, no context)."""
    tracer = _tracer
    if tracer is None:
        return None
    now = time.time_ns()
    members: list[trace.Span] = []
    first: trace.Span | None = None
    for item in batch:
        span: trace.Span | None = item.trace
        if span is None:
            continue
        first = first or span
        if span.is_recording():
            members.append(span)
            waited = tracer.start_span(
                QUEUE, trace.set_span_in_context(span), start_time=now - item.queue_ns
            )
            waited.end(now)
    if not members:
        # Current, whatever this task inherited (a batcher made during a traced first-use load
        # has that request's span): the first member's context (unsampled), or none at all.
        otel_context.attach(
            trace.set_span_in_context(first) if first is not None else otel_context.Context()
        )
        return None
    attributes = {"gateway.batch.size": rows, "gateway.batch.requests": len(batch)}
    batch_span = tracer.start_span(
        BATCH,
        trace.set_span_in_context(members[0]),
        links=[Link(m.get_span_context()) for m in members],
        attributes=attributes,
        start_time=now,
    )
    use(batch_span)
    return batch_span


def span(
    name: str, attributes: Mapping[str, Any] | None = None
) -> AbstractContextManager[trace.Span | None]:
    """A child of the current span for the ``with`` block (current inside it; an exception
    leaving it is recorded); a shared no-op when tracing is off."""
    tracer = _tracer
    if tracer is None:
        return NULL
    return tracer.start_as_current_span(name, attributes=attributes)


class _Sized(Protocol):
    length: int


@contextmanager
def _fetch_span(
    tracer: trace.Tracer, kind: str, where: str, sha256: str, progress: _Sized
) -> Iterator[None]:
    offset = progress.length
    attributes: dict[str, Any] = {
        "edge.source": kind,
        "edge.url": where,
        "edge.blob": sha256,
        "edge.offset": offset,
        "edge.resumed": offset > 0,
    }
    with tracer.start_as_current_span(EDGE_FETCH, attributes=attributes) as fetch:
        try:
            yield
        finally:
            fetch.set_attribute("edge.bytes", progress.length - offset)


def fetching(kind: str, where: str, sha256: str, progress: _Sized) -> AbstractContextManager[None]:
    """An edge's download attempt of one blob from a peer or the origin, as a span (bytes from
    ``progress.length`` at the start to its end; resumed when it started past 0)."""
    tracer = _tracer
    if tracer is None:
        return NULL
    return _fetch_span(tracer, kind, where, sha256, progress)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current context's ``traceparent`` (and ``tracestate``) to outbound ``headers``
    (HTTP headers, or gRPC metadata for tritonclient); returns them."""
    if enabled:
        _propagator.inject(headers)
    return headers


def outbound(headers: dict[str, str] | None) -> dict[str, str] | None:
    """``inject`` for headers that may be None (none to send): untouched when tracing is off."""
    if not enabled:
        return headers
    return inject({} if headers is None else headers)


__all__ = [
    "NULL",
    "Incoming",
    "TraceSampler",
    "batch_begins",
    "enabled",
    "end_request",
    "fetching",
    "from_headers",
    "from_metadata",
    "inject",
    "install",
    "outbound",
    "setup",
    "shutdown",
    "span",
    "start_request",
    "use",
]
