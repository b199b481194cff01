"""The batcher's queue on its own (``gateway.batching.queue.PriorityQueue``): its size, bounds
and delayed requests, with real ``Queued`` items and an injected clock.

The batcher's tests reach the queue through the scheduler; these pin what the scheduler relies
on: ``len``/``bool`` follow every way in and out, a level's bound counts its delayed requests,
and a request delayed by its timeout is still served.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.batching.batcher import Queued
from gateway.batching.queue import PriorityQueue, QueuePolicy
from gateway.errors import QueueFull


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def item(level: int = 0, delay_at_s: float | None = None) -> Queued:
    inputs = {"x": np.zeros((1, 2), np.float32)}
    loop = asyncio.get_running_loop()
    return Queued(inputs, 1, (), loop, 0.0, None, level=level, delay_at_s=delay_at_s)


def queue(clock: Clock, *sizes: int) -> PriorityQueue:
    """One level per size (levels 1.. in order; a single size: level 0 alone)."""
    if len(sizes) == 1:
        return PriorityQueue({0: QueuePolicy(max_queue_size=sizes[0])}, clock)
    levels = {i + 1: QueuePolicy(max_queue_size=size) for i, size in enumerate(sizes)}
    return PriorityQueue(levels, clock)


async def test_len_and_bool_follow_appends_pops_and_clear() -> None:
    q = queue(Clock(), 8)
    assert len(q) == 0 and not q and q.head() is None
    first, second = item(), item()
    q.append(first)
    assert len(q) == 1 and q  # one request is enough to be true
    q.append(second)
    assert len(q) == 2 and list(q) == [first, second]
    q.clear()
    assert len(q) == 0 and not q and list(q) == [] and q.head() is None
    q.append(first)  # counting starts again from nothing
    assert len(q) == 1
    assert q.popleft() is first
    assert len(q) == 0 and not q
    with pytest.raises(IndexError, match=r"^pop from an empty queue$"):  # as a deque says it
        q.popleft()


async def test_a_delayed_request_is_still_served_and_counted_out() -> None:
    clock = Clock()
    q = queue(clock, 8)
    late, on_time = item(delay_at_s=1.0), item(delay_at_s=5.0)
    q.append(late)
    q.append(on_time)
    clock.now = 2.0
    assert q.head() is on_time  # ``late`` timed out: it goes behind ``on_time``
    assert list(q) == [on_time, late]
    assert q.popleft() is on_time and len(q) == 1
    assert q.head() is late  # only delayed requests left: the first of them is next
    assert q.popleft() is late
    assert len(q) == 0 and not q  # taking a delayed request counts it out too
    q.append(item())
    assert len(q) == 1


async def test_a_levels_bound_counts_its_delayed_requests_and_defaults_to_none_held() -> None:
    clock = Clock()
    q = queue(clock, 2)
    q.append(item(delay_at_s=1.0))
    q.append(item(delay_at_s=5.0))
    clock.now = 2.0
    q.head()  # one delayed, one waiting: the level still holds two
    with pytest.raises(QueueFull):
        q.append(item())
    q.popleft()
    q.append(item())  # with nothing held (the default), one free place takes one
    with pytest.raises(QueueFull):
        q.append(item(), held=0)
    q.popleft()
    with pytest.raises(QueueFull):
        q.append(item(), held=1)  # one queued + one in the forming batch: full


async def test_levels_are_bounded_and_served_highest_first() -> None:
    q = queue(Clock(), 1, 2)
    high, low = item(level=1), item(level=2)
    q.append(low)
    q.append(high)
    with pytest.raises(QueueFull):
        q.append(item(level=1))  # the full level refuses ...
    q.append(item(level=2))  # ... while another still takes requests
    assert q.head() is high and q.popleft() is high
    assert q.popleft() is low and len(q) == 1
