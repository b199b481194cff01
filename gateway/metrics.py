"""Prometheus metrics, read from the core's own counters at scrape time.

Nothing here sits on the request path: the collector walks the data plane's per-version
statistics when ``/metrics`` is scraped. Names follow Triton's (``nv_inference_*``) so existing
dashboards work; the gateway's own start with ``gateway_``. Other parts (routing, cache) add
their families as ``source`` callables given when the data plane is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from gateway.stats import LATENCY_BUCKETS_S

if TYPE_CHECKING:
    from gateway.dataplane import DataPlane

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Source = Callable[[], Iterable[Any]]


def _cumulative(counts: list[int], bounds: Iterable[float]) -> list[tuple[str, float]]:
    buckets, total = [], 0
    for bound, count in zip(bounds, counts, strict=False):
        total += count
        buckets.append((repr(float(bound)), float(total)))
    buckets.append(("+Inf", float(sum(counts))))
    return buckets


def _placement(
    facts: dict[str, Any],
    values: list[str],
    providers: GaugeMetricFamily,
    fallback: GaugeMetricFamily,
) -> None:
    """Where a version runs, from the facts its backend describes (in-process ONNX Runtime
    reports ``instance_providers`` and ``cpu_fallback``; other backends nothing)."""
    counts = facts.get("instance_providers")
    if isinstance(counts, dict):
        for provider, count in sorted(counts.items()):
            providers.add_metric([*values, str(provider)], float(count))
    if isinstance(facts.get("cpu_fallback"), bool):
        fallback.add_metric(values, 1.0 if facts["cpu_fallback"] else 0.0)


class DataPlaneCollector(Collector):
    """Triton-compatible per model/version families plus the gateway's histograms."""

    def __init__(self, dataplane: DataPlane, sources: Sequence[Source] = ()) -> None:
        self._dataplane = dataplane
        self.sources: tuple[Source, ...] = tuple(sources)

    def collect(self) -> Iterator[Any]:
        labels = ["model", "version"]
        success = CounterMetricFamily(
            "nv_inference_request_success", "Successful inference requests", labels=labels
        )
        failure = CounterMetricFamily(
            "nv_inference_request_failure",
            "Failed inference requests",
            labels=[*labels, "reason"],
        )
        count = CounterMetricFamily(
            "nv_inference_count", "Inferences performed (batch items)", labels=labels
        )
        execs = CounterMetricFamily(
            "nv_inference_exec_count", "Model executions (batches)", labels=labels
        )
        request_us = CounterMetricFamily(
            "nv_inference_request_duration_us", "Cumulative request duration", labels=labels
        )
        queue_us = CounterMetricFamily(
            "nv_inference_queue_duration_us", "Cumulative time requests spent queued", labels=labels
        )
        compute_us = CounterMetricFamily(
            "nv_inference_compute_infer_duration_us",
            "Cumulative model execution time",
            labels=labels,
        )
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count",
            "Requests queued or executing",
            labels=labels,
        )
        batch = HistogramMetricFamily(
            "gateway_batch_size", "Items per model execution", labels=labels
        )
        latency = HistogramMetricFamily(
            "gateway_request_duration_seconds",
            "Request latency inside the gateway (decode excluded)",
            labels=labels,
        )
        providers = GaugeMetricFamily(
            "gateway_model_execution_provider",
            "Sessions (instances) of a model version per execution provider they really run on",
            labels=[*labels, "provider"],
        )
        fallback = GaugeMetricFamily(
            "gateway_model_cpu_fallback",
            "1: a GPU was asked for (execution_provider cuda, KIND_GPU) and the CPU runs it",
            labels=labels,
        )
        cache_counts = (
            CounterMetricFamily(
                "nv_cache_num_hits_per_model", "Response cache hits per model", labels=labels
            ),
            CounterMetricFamily(
                "nv_cache_num_misses_per_model", "Response cache misses per model", labels=labels
            ),
        )
        cache_us = (
            CounterMetricFamily(
                "nv_cache_hit_duration_per_model",
                "Cumulative time looking up cached responses on hits (us)",
                labels=labels,
            ),
            CounterMetricFamily(
                "nv_cache_miss_duration_per_model",
                "Cumulative time looking up and inserting responses on misses (us)",
                labels=labels,
            ),
        )
        for entry in list(self._dataplane.models.values()):
            for lv in list(entry.versions.values()):
                st = lv.stats
                values = [st.name, st.version]
                _placement(lv.backend.describe(), values, providers, fallback)
                success.add_metric(values, st.success.count)
                for reason, n in st.fail_reasons.items():
                    failure.add_metric([*values, reason], n)
                count.add_metric(values, st.inference_count)
                execs.add_metric(values, st.execution_count)
                request_us.add_metric(values, (st.success.ns + st.fail.ns) / 1000)
                queue_us.add_metric(values, st.queue.ns / 1000)
                compute_us.add_metric(values, st.compute_infer.ns / 1000)
                pending.add_metric(values, lv.batcher.pending)
                if lv.config.response_cache:
                    kept = (st.cache_hit, st.cache_miss)
                    for family, duration in zip(cache_counts, kept, strict=True):
                        family.add_metric(values, duration.count)
                    for family, duration in zip(cache_us, kept, strict=True):
                        family.add_metric(values, duration.ns / 1000)
                sizes = [0] * (len(BATCH_BUCKETS) + 1)
                total_items = 0
                for size, stat in st.batches.items():
                    n = stat.compute_infer.count
                    idx = next((i for i, b in enumerate(BATCH_BUCKETS) if size <= b), -1)
                    sizes[idx] += n
                    total_items += size * n
                batch.add_metric(values, _cumulative(sizes, BATCH_BUCKETS), float(total_items))
                latency.add_metric(
                    values,
                    _cumulative(st.latency_counts, LATENCY_BUCKETS_S),
                    (st.success.ns + st.fail.ns) / 1e9,
                )
        yield from (success, failure, count, execs, request_us, queue_us, compute_us, pending)
        yield from (batch, latency, providers, fallback, *cache_counts, *cache_us)
        for source in self.sources:
            yield from source()


class Metrics:
    """A registry of our own (never the process-global one), so tests and apps do not share."""

    def __init__(self, dataplane: DataPlane, sources: Sequence[Source] = ()) -> None:
        """``sources``: other parts' families (routing, cache, forwarding), each asked at
        scrape time; fixed when the data plane is built."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = DataPlaneCollector(dataplane, sources)
        self.registry.register(self.collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)
