"""When each target is probed next: the router's probe schedule, a heap of due times.

Each target has at most one plan: a due time, or ``running`` while its probe is out. A plan can
be brought forward (``sooner``: a host just ejected should be probed when its ejection ends, not
when a period planned while it was well says); the earlier entry stays in the heap and is
skipped when it comes up (stale). Plans are keyed by the target object, held here while
planned: keyed by ``id()`` alone, a removed target's leftover key could be taken by a new
target at the same address, which was then never probed (a host re-added under load stayed
ejected for good).
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.routing.router import TargetState

__all__ = ["ProbeSchedule"]

_RUNNING = -1.0  # the due time of a plan whose probe is out


class ProbeSchedule:
    """Plans of the targets' next probes; the router's probe loop takes the due ones."""

    __slots__ = ("_heap", "_plans", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TargetState]] = []
        # id(target) -> (its heap entry's sequence number, due time or _RUNNING, the target);
        # holding the target keeps its id from being reused while the key is here.
        self._plans: dict[int, tuple[int, float, TargetState]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._plans)

    def __contains__(self, target: TargetState) -> bool:
        plan = self._plans.get(id(target))
        return plan is not None and plan[2] is target

    def due_s(self, target: TargetState) -> float | None:
        """When ``target``'s probe is due; None while it runs or when it has no plan."""
        plan = self._plans.get(id(target))
        if plan is None or plan[2] is not target or plan[1] == _RUNNING:
            return None
        return plan[1]

    def running(self, target: TargetState) -> bool:
        plan = self._plans.get(id(target))
        return plan is not None and plan[2] is target and plan[1] == _RUNNING

    def plan(self, target: TargetState, at_s: float) -> None:
        """Probe ``target`` at ``at_s`` (replacing any plan it had)."""
        self._seq += 1
        self._plans[id(target)] = (self._seq, at_s, target)
        heapq.heappush(self._heap, (at_s, self._seq, target))

    def sooner(self, target: TargetState, at_s: float) -> bool:
        """Bring ``target``'s planned probe forward to ``at_s``; nothing when it is planned
        sooner already or its probe is out (that probe's end plans the next one). Whether the
        plan moved."""
        due = self.due_s(target)
        if due is None or due <= at_s:
            return False
        self.plan(target, at_s)
        return True

    def start(self, target: TargetState) -> None:
        """Its probe is out: no new plan until ``finish`` or ``plan``."""
        self._seq += 1
        self._plans[id(target)] = (self._seq, _RUNNING, target)

    def forget(self, target: TargetState) -> None:
        """No plan for ``target`` (removed or replaced); a heap entry left is skipped."""
        plan = self._plans.get(id(target))
        if plan is not None and plan[2] is target:
            del self._plans[id(target)]

    def next_at_s(self) -> float | None:
        """The due time at the top of the heap (maybe a stale entry's: a wake-up too early,
        never too late); None when nothing is planned."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> TargetState | None:
        """The target whose probe is due first, if one is due at ``now`` (its plan is taken:
        ``start`` it, ``plan`` it again or ``forget`` it); stale entries are dropped."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, target = heapq.heappop(heap)
            plan = self._plans.get(id(target))
            if plan is not None and plan[0] == seq and plan[2] is target:
                del self._plans[id(target)]
                return target
        return None
