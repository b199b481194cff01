"""A model version's request queue, one FIFO per priority level (Triton's ``PriorityQueue``).

Level 1 is the highest priority; a model without ``priority_levels`` has the one level 0. The
batcher takes from the front of the highest non-empty level, so higher priorities are batched
first and a batch left with room fills from the next level down. Each level keeps its own queue
policy (``QueuePolicy``): a bound (a full level refuses with ``QueueFull`` while the others still
take requests, so under overload the low priority is shed, not the high) and what happens to a
request still queued at its level's timeout: rejected (the batcher fails it, as a deadline), or
delayed: moved behind every request of its level that has not timed out, as Triton does.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.errors import QueueFull

if TYPE_CHECKING:
    from gateway.batching.batcher import Queued


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """Triton's ``ModelQueuePolicy`` for one priority level (or the default one)."""

    max_queue_size: int = 1024
    default_timeout_s: float | None = None
    # The request's own (shorter) timeout replaces ``default_timeout_s`` as its queue timeout.
    allow_timeout_override: bool = False
    # timeout_action DELAY: a timed-out request goes behind the others instead of failing.
    delay_on_timeout: bool = False


class _Level:
    """One priority level: its FIFO and, behind it, the requests delayed by a timeout."""

    __slots__ = ("delayed", "policy", "waiting")

    def __init__(self, policy: QueuePolicy) -> None:
        self.policy = policy
        self.waiting: collections.deque[Queued] = collections.deque()
        self.delayed: collections.deque[Queued] = collections.deque()

    def front(self, now: float) -> Queued | None:
        """The next request of this level, after moving timed-out ones from the front of the
        FIFO to the delayed queue."""
        waiting = self.waiting
        while waiting:
            item = waiting[0]
            if item.delay_at_s is None or now < item.delay_at_s:
                return item
            self.delayed.append(waiting.popleft())
        return self.delayed[0] if self.delayed else None

    def __len__(self) -> int:
        return len(self.waiting) + len(self.delayed)


class PriorityQueue:
    """The queue the batcher forms batches from: ``deque``-like (``append``, ``popleft``,
    iteration and ``len`` in priority order), plus ``head`` to peek."""

    def __init__(self, levels: dict[int, QueuePolicy], clock: Callable[[], float]) -> None:
        """``levels``: every level there is, with its policy (``{0: default}`` without
        priorities)."""
        self._levels = {level: _Level(levels[level]) for level in sorted(levels)}
        self._order = list(self._levels.values())
        self._clock = clock
        self._size = 0

    def policy(self, level: int) -> QueuePolicy:
        return self._levels[level].policy

    def append(self, item: Queued, held: int = 0) -> None:
        """Queue ``item`` at the back of its level; ``QueueFull`` when that level is full,
        counting ``held`` more of its requests (taken into a batch being formed)."""
        level = self._levels[item.level]
        # (``len(level)`` spelled out: a Python ``__len__`` is a call a request.)
        if len(level.waiting) + len(level.delayed) + held >= level.policy.max_queue_size:
            raise QueueFull("Exceeds maximum queue size", retry_after_s=1.0)
        level.waiting.append(item)
        self._size += 1

    def head(self) -> Queued | None:
        """The request ``popleft`` will take (None when empty); requests at the front of a
        level whose timeout delays them move behind it first. Only ``head`` looks at the time,
        so what it shows is what ``popleft`` takes next."""
        if not self._size:
            return None
        now = None
        for level in self._order:
            waiting = level.waiting
            if waiting and waiting[0].delay_at_s is None:
                return waiting[0]  # the usual case, with no call: no timeout can delay it
            if waiting or level.delayed:
                if now is None:
                    now = self._clock()
                item = level.front(now)
                if item is not None:
                    return item
        return None  # pragma: no cover - _size counts what the levels hold

    def popleft(self) -> Queued:
        """Take the next request: the front of the highest non-empty level (call ``head``
        first to have timed-out requests delayed)."""
        for level in self._order:
            if level.waiting:
                self._size -= 1
                return level.waiting.popleft()
            if level.delayed:
                self._size -= 1
                return level.delayed.popleft()
        raise IndexError("pop from an empty queue")

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[Queued]:
        """Every queued request in the order ``popleft`` would take them (as things stand)."""
        for level in self._order:
            yield from level.waiting
            yield from level.delayed

    def clear(self) -> None:
        for level in self._order:
            level.waiting.clear()
            level.delayed.clear()
        self._size = 0
