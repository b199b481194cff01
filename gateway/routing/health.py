"""Host health: passive outlier ejection (Envoy's ``outlier_detection``) and active probe state.

Passive: ``consecutive_errors`` connection errors or 5xx in a row eject a host for
``base_ejection_s * times_ejected`` (capped at ``max_ejection_s``), so a host that keeps failing
stays out longer each time. No more than ``max_ejected_fraction`` of the hosts are ever ejected
at once (at least one may be), so a wide outage degrades to retries instead of an empty pool.
When the ejection time is over, the host comes back only once an active probe has succeeded
since then. A host that stays healthy for ``max_ejection_s`` has its multiplier forgiven.

Active (Envoy's health check thresholds): ``unhealthy_threshold`` failed probes in a row mark a
host down (no traffic), ``healthy_threshold`` successful ones in a row mark it up again; one
probe that times out on a busy network does not take a host out. Both are 1 here by default (a
probe decides at once); the gateway's settings ask for more (``host_unhealthy_threshold``,
``host_healthy_threshold``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from gateway.routing.estimators import Clock

__all__ = ["HostHealth", "OutlierDetector"]


@dataclass(slots=True)
class HostHealth:
    """Health facts of one host."""

    consecutive_errors: int = 0
    times_ejected: int = 0
    ejected_until_s: float | None = None  # set while ejected (and until re-admitted)
    last_ejected_s: float = float("-inf")
    probe_up: bool = True
    last_probe_ok_s: float = float("-inf")  # when the last successful probe was sent
    last_failure_s: float = float("-inf")  # when traffic there last failed
    probe_failures: int = 0  # failed probes in a row
    probe_successes: int = 0  # successful probes in a row


class OutlierDetector:
    def __init__(
        self,
        consecutive_errors: int = 3,
        base_ejection_s: float = 2.0,
        max_ejection_s: float = 30.0,
        max_ejected_fraction: float = 0.5,
        probes: bool = True,
        clock: Clock = time.monotonic,
        unhealthy_threshold: int = 1,
        healthy_threshold: int = 1,
    ) -> None:
        if unhealthy_threshold < 1 or healthy_threshold < 1:
            raise ValueError("probe thresholds must be >= 1")
        self.unhealthy_threshold = unhealthy_threshold
        self.healthy_threshold = healthy_threshold
        self.consecutive_errors = consecutive_errors
        self.base_ejection_s = base_ejection_s
        self.max_ejection_s = max_ejection_s
        self.max_ejected_fraction = max_ejected_fraction
        self.probes = probes  # without probes, an ejection simply expires
        self._clock = clock
        self.hosts: dict[str, HostHealth] = {}

    def add(self, name: str) -> None:
        self.hosts.setdefault(name, HostHealth())

    def remove(self, name: str) -> None:
        self.hosts.pop(name, None)

    def _ejected_count(self) -> int:
        return sum(1 for h in self.hosts.values() if h.ejected_until_s is not None)

    def record_success(self, name: str) -> None:
        health = self.hosts[name]
        health.consecutive_errors = 0
        now = self._clock()
        if health.times_ejected and now - health.last_ejected_s > self.max_ejection_s:
            health.times_ejected = 0

    def record_failure(self, name: str) -> bool:
        """Count a connection error or 5xx; returns True when this ejects the host."""
        health = self.hosts[name]
        health.consecutive_errors += 1
        health.last_failure_s = self._clock()
        if (
            health.ejected_until_s is not None
            or health.consecutive_errors < self.consecutive_errors
        ):
            return False
        allowed = max(1, int(self.max_ejected_fraction * len(self.hosts)))
        if self._ejected_count() >= allowed:
            return False
        now = health.last_failure_s
        health.times_ejected += 1
        duration_s = min(self.max_ejection_s, self.base_ejection_s * health.times_ejected)
        health.ejected_until_s = now + duration_s
        health.last_ejected_s = now
        health.consecutive_errors = 0
        return True

    def record_probe(self, name: str, ok: bool, sent_s: float | None = None) -> None:
        """A probe's answer, as of ``sent_s`` (when it was sent; default now). A success sent
        before a failure seen since is stale and ignored: the host answered before it went
        away (a probe out when it was killed must not mark it up, nor re-admit it). A failure
        always counts."""
        health = self.hosts.get(name)
        if health is None:
            return
        if sent_s is None:
            sent_s = self._clock()
        if ok:
            if sent_s < health.last_failure_s:
                return
            health.last_probe_ok_s = max(health.last_probe_ok_s, sent_s)
            health.probe_failures = 0
            health.probe_successes += 1
            if health.probe_successes >= self.healthy_threshold:
                health.probe_up = True
        else:
            health.probe_successes = 0
            health.probe_failures += 1
            if health.probe_failures >= self.unhealthy_threshold:
                health.probe_up = False

    def available(self, name: str) -> bool:
        """Whether traffic may go to the host now (re-admitting it if its time is up)."""
        health = self.hosts[name]
        if not health.probe_up:
            return False
        if health.ejected_until_s is None:
            return True
        if self._clock() < health.ejected_until_s:
            return False
        if self.probes and health.last_probe_ok_s < health.ejected_until_s:
            return False  # time served; waiting for a successful probe
        health.ejected_until_s = None
        return True

    def state(self, name: str) -> str:
        health = self.hosts[name]
        if not health.probe_up:
            return "down"
        if health.ejected_until_s is not None and not self.available(name):
            return "ejected"
        return "up"

    def to_dict(self, name: str) -> dict[str, Any]:
        health = self.hosts[name]
        now = self._clock()
        return {
            "state": self.state(name),
            "consecutive_errors": health.consecutive_errors,
            "times_ejected": health.times_ejected,
            "ejected_for_s": (
                round(max(0.0, health.ejected_until_s - now), 3)
                if health.ejected_until_s is not None
                else None
            ),
        }
