"""Batcher behaviour that mutation testing (``scripts/mutation.sh batcher``) found unpinned,
driven directly with an injected clock (no HTTP).

The held count: a request taken from the queue into the batch being formed still counts against
its level's ``max_queue_size`` until the batch is sent (Triton's queue holds it until then), so
a level admits exactly that many waiting requests, wherever they wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from gateway.batching import Batcher, BatchPolicy, Executed, QueuePolicy
from gateway.errors import QueueFull
from gateway.stats import ModelStats

Tensors = dict[str, np.ndarray]

pytestmark = pytest.mark.timeout(5)


class Clock:
    """The batcher's injected clock: it moves only when the test moves it."""

    def __init__(self, now_s: float = 100.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


class Doubler:
    """A backend that doubles its input and records the size of each batch it was given."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def __call__(
        self, inputs: Tensors, outputs: Sequence[str], deadline_s: float | None = None
    ) -> Executed:
        self.batches.append(len(inputs["X"]))
        return Executed({"Y": inputs["X"] * 2})


def row(value: float, width: int = 4) -> Tensors:
    return {"X": np.full((1, width), value, dtype=np.float32)}


async def ticks(count: int = 5) -> None:
    """Let the scheduler take its next steps."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_requests_joining_the_batch_being_formed_count_against_their_own_level() -> None:
    """Level 1 holds 2 requests, level 2 holds 3. The batch being formed takes one request of
    level 1 and then two of level 2 (woken by a request it cannot take, which its caller has
    given up). With those held, level 2 admits one more request and level 1 one more: the
    held count is per level and counts every request that joined, not only the first."""
    policy = BatchPolicy(
        max_batch_size=8,
        max_queue_delay_s=60.0,  # the batch keeps forming for the whole test
        adaptive_delay=False,
        priority_levels=2,
        default_priority_level=1,
        queue_policies=((1, QueuePolicy(max_queue_size=2)), (2, QueuePolicy(max_queue_size=3))),
    )
    backend = Doubler()
    batcher = Batcher(backend, ["Y"], policy, ModelStats("m", "1"), clock=Clock())
    first = batcher.enqueue(row(1), priority=1)
    await ticks()  # taken into the batch being formed: level 1 holds 1
    joining = [batcher.enqueue(row(2), priority=2) for _ in range(2)]
    other = batcher.enqueue(row(9, width=3), priority=2)  # cannot join: wakes the scheduler
    other.future.cancel()
    await ticks()  # both of level 2 join the batch; ``other`` is dropped: level 2 holds 2
    assert batcher.pending == 3  # none queued, none running: all three wait in the forming batch
    admitted = [batcher.enqueue(row(3), priority=2)]  # 2 held + 1 queued: level 2 is full
    with pytest.raises(QueueFull):
        batcher.enqueue(row(3), priority=2)
    admitted.append(batcher.enqueue(row(4), priority=1))  # 1 held + 1 queued: full
    with pytest.raises(QueueFull):
        batcher.enqueue(row(4), priority=1)
    await batcher.close()  # sends the batch being formed, with what it can still take
    done = await asyncio.wait_for(
        asyncio.gather(*(i.future for i in [first, *joining, *admitted])), 1.0
    )
    assert [float(d["Y"][0, 0]) for d in done] == [2, 4, 4, 6, 8]
    assert backend.batches == [5]
