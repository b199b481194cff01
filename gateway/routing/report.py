"""``/metrics`` families of the router's hosts, read from its state at scrape time.

Up to ``per_host_max`` hosts (the ``metrics_host_series_max`` setting), every host has its own
series, and one per host and model version for its latency estimate. Above, the families are
aggregated over the hosts: how many are in each state, in flight and batches summed, and the
spread of the latency estimates per model version. A thousand hosts with ten models would
otherwise be some 15,000 series per scrape, more than a scraper wants from one process and more
than this one should spend building them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.routing.router import Router

__all__ = ["host_metric_families"]

STATES = ("up", "ejected", "down")


def host_metric_families(router: Router, per_host_max: int) -> list[Any]:
    """Per-host routing state (or its aggregate over the hosts) and the retry budget."""
    from prometheus_client.core import CounterMetricFamily

    families = _per_host(router) if len(router.targets) <= per_host_max else _aggregated(router)
    budget = router.budget
    retries = CounterMetricFamily(
        "gateway_retries", "Retries on another host, by budget decision", labels=["decision"]
    )
    retries.add_metric(["granted"], budget.granted)
    retries.add_metric(["denied"], budget.denied)
    return [*families, retries, *_aperture(router)]


def _aperture(router: Router) -> list[Any]:
    """The aperture's size and how often it changed; none on a pool without one."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    aperture = router.aperture
    if not aperture.active(len(router.targets)):
        return []
    size = GaugeMetricFamily(
        "gateway_hosts_aperture", "Hosts this front sends its traffic to (the aperture)"
    )
    size.add_metric([], len(aperture.members))
    resizes = CounterMetricFamily("gateway_hosts_aperture_resizes", "Times the aperture resized")
    resizes.add_metric([], aperture.resizes)
    return [size, resizes]


def _per_host(router: Router) -> list[Any]:
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
    outliers = router.outliers
    for target in list(router.targets.values()):
        host = target.name
        in_flight.add_metric([host], target.in_flight)
        outcomes.add_metric([host, "success"], target.completed)
        outcomes.add_metric([host, "failure"], target.failed)
        up.add_metric([host], 1.0 if outliers.state(host) == "up" else 0.0)
        ejections.add_metric([host], outliers.hosts[host].times_ejected)
        for key in sorted({*target.estimates, *target.ready, *target.tiers}):
            found = target.estimates.get(key)
            estimate.add_metric([host, key], round(found.peak.value_s, 6) if found else 0.0)
    return [in_flight, outcomes, up, ejections, estimate]


def _aggregated(router: Router) -> list[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    hosts = GaugeMetricFamily(
        "gateway_hosts", "Hosts by state (up, ejected, down)", labels=["state"]
    )
    in_flight = GaugeMetricFamily("gateway_hosts_in_flight", "Batches in flight on all hosts")
    outcomes = CounterMetricFamily(
        "gateway_hosts_batches",
        "Batches sent to the hosts now in the pool, by outcome",
        labels=["outcome"],
    )
    ejections = CounterMetricFamily(
        "gateway_hosts_ejections", "Ejections of the hosts now in the pool"
    )
    spread = GaugeMetricFamily(
        "gateway_hosts_latency_estimate_seconds",
        "Peak-EWMA latency estimates over the hosts measured for a model version",
        labels=["model", "stat"],
    )
    states = dict.fromkeys(STATES, 0)
    busy = completed = failed = ejected = 0
    estimates: dict[str, list[float]] = {}
    outliers = router.outliers
    now = router.clock()
    for target in list(router.targets.values()):
        states[outliers.state(target.name)] += 1
        busy += len(target.started)
        completed += target.completed
        failed += target.failed
        ejected += outliers.hosts[target.name].times_ejected
        for key, found in target.estimates.items():
            if found.peak.samples:
                estimates.setdefault(key, []).append(found.peak.decayed(now))
    for state, count in states.items():
        hosts.add_metric([state], count)
    in_flight.add_metric([], busy)
    outcomes.add_metric(["success"], completed)
    outcomes.add_metric(["failure"], failed)
    ejections.add_metric([], ejected)
    for key in sorted(estimates):
        values = sorted(estimates[key])
        n = len(values)
        for stat, value in (
            ("min", values[0]),
            ("p50", values[n // 2]),
            ("p90", values[min(n - 1, (9 * n) // 10)]),
            ("max", values[-1]),
        ):
            spread.add_metric([key, stat], round(value, 6))
        spread.add_metric([key, "hosts"], n)
    return [hosts, in_flight, outcomes, ejections, spread]
