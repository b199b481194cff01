"""Batcher behaviour that mutation testing (``scripts/mutation.sh batcher``) found unpinned,
driven directly with an injected clock (no HTTP).

The held count: a request taken from the queue into the batch being formed still counts against
its level's ``max_queue_size`` until the batch is sent (Triton's queue holds it until then), so
a level admits exactly that many waiting requests, wherever they wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest
import pytest_asyncio

from gateway import context
from gateway.batching import Batcher, BatchPolicy, Executed, QueuePolicy
from gateway.batching.batcher import _LOOP_OUTSTANDING
from gateway.errors import ModelNotReady, QueueFull
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


# -- a queued request's end, and what the batcher leaves behind ----------------------------------


class Gated:
    """A backend whose runs wait for ``gate``, each moving the clock by ``run_s`` and saying it
    spent ``input_s`` / ``output_s`` of that handing over the inputs and reading the outputs."""

    def __init__(
        self, clock: Clock, run_s: float = 0.0, input_s: float = 0.0, output_s: float = 0.0
    ):
        self.clock, self.run_s, self.input_s, self.output_s = clock, run_s, input_s, output_s
        self.gate: asyncio.Event | None = None

    async def __call__(
        self, inputs: Tensors, outputs: Sequence[str], deadline_s: float | None = None
    ) -> Executed:
        if self.gate is not None:
            await self.gate.wait()
        self.clock.now_s += self.run_s
        return Executed({"Y": inputs["X"] * 2}, "", self.run_s, self.input_s, self.output_s)


@pytest_asyncio.fixture(loop_scope="function")
async def reported() -> AsyncIterator[list[dict[str, object]]]:
    """What reaches the running loop's exception handler during the test."""
    got: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    before = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: got.append(context))
    yield got
    loop.set_exception_handler(before)


async def test_a_queued_request_is_done_once_it_ends_and_cannot_be_cancelled_after() -> None:
    batcher = Batcher(Doubler(), ["Y"], BatchPolicy(), ModelStats("m", "1"), clock=Clock())
    item = batcher.enqueue(row(1))
    assert not item.done()
    result = await asyncio.wait_for(item.future, 1.0)
    assert item.done() and not item.cancelled()
    assert item.cancel() is False and item.future.cancel() is False
    assert result["Y"][0, 0] == 2
    await batcher.close()


async def test_a_request_awaited_and_called_back_gets_both_ends_and_one_with_neither_is_quiet(
    reported: list[dict[str, object]],
) -> None:
    got = reported
    batcher = Batcher(Doubler(), ["Y"], BatchPolicy(), ModelStats("m", "1"), clock=Clock())
    both = batcher.enqueue(row(1))
    called: list[object] = []
    both.on_done = called.append
    future = both.future  # made before the end: the end reaches it and the callback
    quiet = batcher.enqueue(row(2))  # neither a future nor a callback
    assert (await asyncio.wait_for(future, 1.0))["Y"][0, 0] == 2
    while not quiet.done():
        await asyncio.sleep(0)
    assert called == [both]
    assert quiet.result is not None and quiet.result["Y"][0, 0] == 4
    assert got == []  # nothing went wrong: nothing reported
    await batcher.close()


async def test_a_callback_that_raises_is_reported_to_the_loop_and_the_batch_goes_on(
    reported: list[dict[str, object]],
) -> None:
    got = reported
    backend = Gated(Clock())
    batcher = Batcher(backend, ["Y"], BatchPolicy(max_batch_size=4), ModelStats("m", "1"),
                      clock=backend.clock)  # fmt: skip
    boom = ValueError("the caller's bug")

    def raises(_item: object) -> None:
        raise boom

    backend.gate = asyncio.Event()
    first, second = batcher.enqueue(row(1)), batcher.enqueue(row(2))
    first.on_done = raises
    await ticks()
    backend.gate.set()
    assert (await asyncio.wait_for(second.future, 1.0))["Y"][0, 0] == 4
    assert first.result is not None and first.result["Y"][0, 0] == 2
    message = "exception in a queued request's callback"
    assert got == [{"message": message, "exception": boom}]
    failing = batcher.enqueue(row(3))
    failing.on_done = raises
    failing.set_exception(RuntimeError("ended another way"))  # the other end: reported alike
    assert got[1:] == [{"message": message, "exception": boom}]
    await batcher.close()


async def test_the_time_spent_handing_inputs_over_and_reading_outputs_is_counted_as_said() -> None:
    backend = Gated(Clock(), run_s=4.0, input_s=1.0, output_s=2.0)
    stats = ModelStats("m", "1")
    batcher = Batcher(backend, ["Y"], BatchPolicy(max_batch_size=4), stats, clock=backend.clock)
    await asyncio.wait_for(batcher.enqueue(row(1)).future, 1.0)
    assert (stats.compute_input.ns, stats.compute_output.ns) == (1_000_000_000, 2_000_000_000)
    assert stats.compute_infer.ns == 1_000_000_000
    await batcher.close()


async def test_batches_run_outside_the_context_of_the_request_that_loaded_the_model() -> None:
    """The scheduler runs in a context of its own: callbacks of the requests it answers log
    with their own request id, not with the id of whatever made the batcher."""
    seen: list[str | None] = []
    token = context.request_id.set("the-load-request")
    try:
        batcher = Batcher(Doubler(), ["Y"], BatchPolicy(), ModelStats("m", "1"), clock=Clock())
    finally:
        context.request_id.reset(token)
    item = batcher.enqueue(row(1))
    item.on_done = lambda _item: seen.append(context.request_id.get())
    await asyncio.wait_for(item.future, 1.0)
    assert seen == [None]
    await batcher.close()


async def test_a_loop_with_nothing_outstanding_is_not_held_by_the_batchers() -> None:
    """The process-wide count of outstanding requests per event loop drops a loop's entry when
    its last request ends: a dict keyed by loops would otherwise keep every loop alive."""
    batcher = Batcher(Doubler(), ["Y"], BatchPolicy(), ModelStats("m", "1"), clock=Clock())
    loop = asyncio.get_running_loop()
    item = batcher.enqueue(row(1))
    assert _LOOP_OUTSTANDING[loop] == 1
    await asyncio.wait_for(item.future, 1.0)
    await ticks()
    assert loop not in _LOOP_OUTSTANDING
    await batcher.close()


async def test_requests_dropped_when_a_drain_times_out_are_no_longer_pending() -> None:
    backend = Gated(Clock())
    backend.gate = asyncio.Event()  # the running batch never ends
    batcher = Batcher(backend, ["Y"], BatchPolicy(max_batch_size=1), ModelStats("m", "1"),
                      clock=backend.clock)  # fmt: skip
    running = batcher.enqueue(row(1))
    await ticks()
    queued = [batcher.enqueue(row(2)), batcher.enqueue(row(3))]
    assert batcher.pending == 3
    await batcher.close(drain_timeout_s=0.05)
    for item in queued:
        assert isinstance(item.error, ModelNotReady)
    assert batcher.pending == 1  # the one still running
    assert not running.done()
    backend.gate.set()
    await asyncio.wait_for(running.future, 1.0)
