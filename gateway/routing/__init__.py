"""Multi-host routing: everything that decides where a batch runs, for every kind of host.

- ``hosts``: the one validator of host tables and the typed specs it parses into.
- ``pool``: which hosts are in the router now (add / replace / retire, drain).
- ``discovery``: DNS groups, re-resolved into pool members.
- ``probing``: the router's probe of a host, with cold-start tiers (``tiers``).
- ``router``: the mechanism (eligibility, in-flight caps, waiting, admission, health).
- ``aperture``: on a large pool, the load-sized subset of the hosts this front sends to;
  ``members``: the O(1) sets of targets that decisions draw from.
- ``policies``, ``estimators``, ``health``, ``budget``: what the mechanism decides with.

- ``report``: ``/metrics`` families of the host table.

What a host *is* (``V2Host``, ``TritonHost``: ``gateway.backends.hosts``), the execute path
(``gateway.backends.routed``) and the factory tying these together for loading and the admin
API (``gateway.backends.placement``) are in ``gateway.backends``.
"""

from gateway.routing.budget import RetryBudget
from gateway.routing.estimators import BatchCostFit, LatencyEstimate, PeakEwma
from gateway.routing.health import OutlierDetector
from gateway.routing.hosts import (
    DnsSpec,
    HostConflict,
    HostSpec,
    TritonSpec,
    UnknownHost,
    V2Spec,
    check_host_table,
    parse_host,
    parse_hosts,
)
from gateway.routing.policies import POLICIES, Candidate, Policy, make_policy
from gateway.routing.router import FAILURE, NEUTRAL, SUCCESS, Lease, Router, TargetState

__all__ = [
    "FAILURE",
    "NEUTRAL",
    "POLICIES",
    "SUCCESS",
    "BatchCostFit",
    "Candidate",
    "DnsSpec",
    "HostConflict",
    "HostSpec",
    "LatencyEstimate",
    "Lease",
    "OutlierDetector",
    "PeakEwma",
    "Policy",
    "RetryBudget",
    "Router",
    "TargetState",
    "TritonSpec",
    "UnknownHost",
    "V2Spec",
    "check_host_table",
    "make_policy",
    "parse_host",
    "parse_hosts",
]
