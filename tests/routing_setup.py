"""Set-up shared by the routing tests: a manual clock and a router over named targets."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from gateway.routing import Router, make_policy


class ManualClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def make_router(
    names: Iterable[str],
    policy: str = "latency",
    *,
    capacity: int = 4,
    ready: str | None = None,
    clock: ManualClock | None = None,
    **kw: Any,
) -> Router:
    """A router on a manual clock (``router.clock``) with seeded randomness, the targets
    ``names`` of ``capacity`` each, and model version ``ready`` ready on every one."""
    router = Router(
        make_policy(policy, random.Random(3)),
        clock=clock or ManualClock(),
        rng=random.Random(4),
        **kw,
    )
    for name in names:
        router.add_target(name, capacity=capacity)
        if ready is not None:
            router.set_ready(name, ready, True)
    return router


def fleet(n: int, policy: str = "latency", *, ready: bool = True, **kw: Any) -> Router:
    """``make_router`` over ``h0`` .. ``h{n-1}``, capacity 4, ``m/1`` ready everywhere."""
    return make_router((f"h{i}" for i in range(n)), policy, ready="m/1" if ready else None, **kw)
