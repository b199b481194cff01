"""Multi-host routing: estimates, policies, health, retry budget, host tables, and the router
mechanism."""

from gateway.routing.budget import RetryBudget
from gateway.routing.estimators import BatchCostFit, LatencyEstimate, PeakEwma
from gateway.routing.health import OutlierDetector
from gateway.routing.hosts import HostConflict, UnknownHost, check_host_table
from gateway.routing.policies import POLICIES, Candidate, Policy, make_policy
from gateway.routing.router import FAILURE, NEUTRAL, SUCCESS, Lease, Router, TargetState

__all__ = [
    "FAILURE",
    "NEUTRAL",
    "POLICIES",
    "SUCCESS",
    "BatchCostFit",
    "Candidate",
    "HostConflict",
    "LatencyEstimate",
    "Lease",
    "OutlierDetector",
    "PeakEwma",
    "Policy",
    "RetryBudget",
    "Router",
    "TargetState",
    "UnknownHost",
    "check_host_table",
    "make_policy",
]
