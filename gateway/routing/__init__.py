"""Multi-host routing: estimates, policies, health, retry budget, and the router mechanism."""

from gateway.routing.budget import RetryBudget
from gateway.routing.estimators import BatchCostFit, LatencyEstimate, PeakEwma
from gateway.routing.health import OutlierDetector
from gateway.routing.policies import POLICIES, Candidate, Policy, make_policy
from gateway.routing.router import FAILURE, NEUTRAL, SUCCESS, Lease, Router

__all__ = [
    "FAILURE",
    "NEUTRAL",
    "POLICIES",
    "SUCCESS",
    "BatchCostFit",
    "Candidate",
    "LatencyEstimate",
    "Lease",
    "OutlierDetector",
    "PeakEwma",
    "Policy",
    "RetryBudget",
    "Router",
    "make_policy",
]
