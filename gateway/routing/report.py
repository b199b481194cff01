"""``/metrics`` families of the router's host table (``Router.table``)."""

from __future__ import annotations

from typing import Any

__all__ = ["host_metric_families"]


def host_metric_families(table: dict[str, Any]) -> list[Any]:
    """Per-host routing state: in flight, outcomes, ejection, estimates, retries."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    in_flight = GaugeMetricFamily(
        "gateway_host_in_flight", "Batches in flight on a host", labels=["host"]
    )
    outcomes = CounterMetricFamily(
        "gateway_host_batches", "Batches sent to a host, by outcome", labels=["host", "outcome"]
    )
    up = GaugeMetricFamily(
        "gateway_host_up", "1: the host takes traffic (not ejected or down)", labels=["host"]
    )
    ejections = CounterMetricFamily(
        "gateway_host_ejections", "Times a host was ejected", labels=["host"]
    )
    estimate = GaugeMetricFamily(
        "gateway_host_latency_estimate_seconds",
        "Peak-EWMA latency estimate per host and model version",
        labels=["host", "model"],
    )
    for row in table["hosts"]:
        host = row["name"]
        in_flight.add_metric([host], row["in_flight"])
        outcomes.add_metric([host, "success"], row["completed"])
        outcomes.add_metric([host, "failure"], row["failed"])
        up.add_metric([host], 1.0 if row["state"] == "up" else 0.0)
        ejections.add_metric([host], row["times_ejected"])
        for key, model in row["models"].items():
            estimate.add_metric([host, key], model["peak_ewma_s"])
    budget = table["retry_budget"]
    retries = CounterMetricFamily(
        "gateway_retries", "Retries on another host, by budget decision", labels=["decision"]
    )
    retries.add_metric(["granted"], budget["granted"])
    retries.add_metric(["denied"], budget["denied"])
    return [in_flight, outcomes, up, ejections, estimate, retries]
