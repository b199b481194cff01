"""The dynamic batcher's decisions, driven directly (no HTTP)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from gateway.batching import Batcher, BatchPolicy
from gateway.errors import DeadlineExceeded, QueueFull
from gateway.stats import ModelStats

Tensors = dict[str, np.ndarray]


class Recorder:
    """A backend that doubles its input and records each batch it was given."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay_s = delay_s
        self.gate: asyncio.Event | None = None

    async def __call__(
        self, inputs: Tensors, outputs: Sequence[str], deadline_s: float | None = None
    ) -> Tensors:
        self.batches.append(len(inputs["X"]))
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return {"Y": inputs["X"] * 2}


def make(policy: BatchPolicy, backend: Recorder) -> tuple[Batcher, ModelStats]:
    stats = ModelStats("m", "1")
    return Batcher(backend, ["Y"], policy, stats), stats


def row(value: float, width: int = 4) -> Tensors:
    return {"X": np.full((1, width), value, dtype=np.float32)}


async def test_requests_merge_and_split_back_in_order() -> None:
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, stats = make(BatchPolicy(max_batch_size=8, instance_count=1), backend)
    first = asyncio.ensure_future(batcher.submit(row(0), 1))
    await asyncio.sleep(0)  # the first batch takes the only slot and blocks on the gate
    rest = [asyncio.ensure_future(batcher.submit(row(i), 1)) for i in range(1, 11)]
    await asyncio.sleep(0)
    backend.gate.set()
    results = await asyncio.gather(first, *rest)
    assert [float(r["Y"][0, 0]) for r in results] == [2.0 * i for i in range(11)]
    assert backend.batches == [1, 8, 2]  # capped at max_batch_size, FIFO
    assert stats.execution_count == 3 and stats.inference_count == 11
    await batcher.close()


async def test_mismatched_shapes_never_merge() -> None:
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(BatchPolicy(max_batch_size=8), backend)
    blocker = asyncio.ensure_future(batcher.submit(row(0), 1))
    await asyncio.sleep(0)
    mixed = [asyncio.ensure_future(batcher.submit(row(1, width=4 + i % 2), 1)) for i in range(4)]
    await asyncio.sleep(0)
    backend.gate.set()
    results = await asyncio.gather(blocker, *mixed)
    assert [r["Y"].shape[1] for r in results[1:]] == [4, 5, 4, 5]
    assert backend.batches == [1, 1, 1, 1, 1]  # alternating widths: each is its own batch
    await batcher.close()


async def test_waits_up_to_the_queue_delay_for_a_fuller_batch() -> None:
    backend = Recorder()
    policy = BatchPolicy(max_batch_size=4, preferred_batch_sizes=(4,), max_queue_delay_s=5.0)
    batcher, _ = make(policy, backend)
    futures = []
    for i in range(4):
        futures.append(asyncio.ensure_future(batcher.submit(row(i), 1)))
        await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(*futures), 2.0)  # preferred size reached: no 5 s wait
    assert backend.batches == [4]
    await batcher.close()


async def test_a_request_that_cannot_join_sends_the_forming_batch() -> None:
    """The scheduler is not woken for every arrival while a batch forms, only for enough rows
    or for a request that cannot join: that one ends the batch at once, no queue delay."""
    backend = Recorder()
    policy = BatchPolicy(max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_delay_s=5.0)
    batcher, _ = make(policy, backend)
    first = [asyncio.ensure_future(batcher.submit(row(i), 1)) for i in range(2)]
    await asyncio.sleep(0.05)
    assert backend.batches == []  # 2 rows: waiting for a preferred size
    other = asyncio.ensure_future(batcher.submit(row(9, width=5), 1))
    await asyncio.wait_for(asyncio.gather(*first), 2.0)
    assert backend.batches == [2]
    more = [asyncio.ensure_future(batcher.submit(row(1, width=5), 1)) for _ in range(3)]
    results = await asyncio.wait_for(asyncio.gather(other, *more), 2.0)  # 4 rows: preferred
    assert backend.batches == [2, 4] and all(r["Y"].shape == (1, 5) for r in results)
    await batcher.close()


async def test_a_burst_is_cut_at_the_largest_preferred_size_it_fills() -> None:
    """Six requests queued at once with preferred sizes 4 and 8 make a batch of 4, then one of
    2, not one of 6 (as Triton forms preferred sizes). Closed-loop clients then settle into even
    halves that overlap, not a lopsided pair that leaves the backend idle."""
    backend = Recorder()
    backend.gate = asyncio.Event()
    policy = BatchPolicy(max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_delay_s=0.0)
    batcher, _ = make(policy, backend)
    blocker = asyncio.ensure_future(batcher.submit(row(0), 1))
    await asyncio.sleep(0)
    burst = [asyncio.ensure_future(batcher.submit(row(i), 1)) for i in range(1, 7)]
    await asyncio.sleep(0.01)
    backend.gate.set()
    results = await asyncio.wait_for(asyncio.gather(blocker, *burst), 2.0)
    assert [float(r["Y"][0, 0]) for r in results] == [2.0 * i for i in range(7)]
    assert backend.batches == [1, 4, 2]
    await batcher.close()


async def test_queue_bound_fails_fast() -> None:
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(BatchPolicy(max_batch_size=1, max_queue_size=2), backend)
    running = asyncio.ensure_future(batcher.submit(row(0), 1))
    await asyncio.sleep(0)
    queued = [asyncio.ensure_future(batcher.submit(row(1), 1)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await batcher.submit(row(2), 1)
    backend.gate.set()
    await asyncio.gather(running, *queued)
    await batcher.close()


async def test_deadline_expires_in_queue() -> None:
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(BatchPolicy(max_batch_size=1), backend)
    running = asyncio.ensure_future(batcher.submit(row(0), 1))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(row(1), 1, deadline_s=loop.time() + 0.05)
    backend.gate.set()
    await running
    assert backend.batches == [1]  # the expired request never ran
    await batcher.close()


async def test_abandoned_caller_loses_its_slot() -> None:
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(BatchPolicy(max_batch_size=8), backend)
    running = asyncio.ensure_future(batcher.submit(row(0), 1))
    await asyncio.sleep(0)
    gone = asyncio.ensure_future(batcher.submit(row(1), 1))
    kept = asyncio.ensure_future(batcher.submit(row(2), 1))
    await asyncio.sleep(0)
    gone.cancel()
    backend.gate.set()
    await asyncio.gather(running, kept)
    assert backend.batches == [1, 1]  # the cancelled request was dropped before batching
    await batcher.close()


async def test_enqueued_requests_are_answered_through_their_futures() -> None:
    """``enqueue`` (no waiting task): the same batches and rows as ``submit``; cancelling the
    future withdraws the request; ``execution`` tells how it ran."""
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, stats = make(BatchPolicy(max_batch_size=8), backend)
    running = batcher.enqueue(row(0), 1, request_id="r0")
    await asyncio.sleep(0)
    queued = [batcher.enqueue(row(i), 1, request_id=f"r{i}") for i in range(1, 4)]
    queued[1].future.cancel()
    backend.gate.set()
    done = await asyncio.gather(running.future, queued[0].future, queued[2].future)
    assert [float(r["Y"][0, 0]) for r in done] == [0.0, 2.0, 6.0]
    assert backend.batches == [1, 2]  # the withdrawn one never reached the backend
    assert queued[0].execution is not None and queued[0].execution.batch_size == 2
    assert stats.inference_count == 3
    await batcher.close()


async def test_close_drains_queued_work() -> None:
    backend = Recorder(delay_s=0.02)
    batcher, _ = make(BatchPolicy(max_batch_size=2), backend)
    futures = [asyncio.ensure_future(batcher.submit(row(i), 1)) for i in range(6)]
    await asyncio.sleep(0)
    await batcher.close()
    assert [float(f.result()["Y"][0, 0]) for f in futures] == [2.0 * i for i in range(6)]


class Concurrency(Recorder):
    """Counts how many batches run at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.running = self.peak = 0

    async def __call__(
        self, inputs: Tensors, outputs: Sequence[str], deadline_s: float | None = None
    ) -> Tensors:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            return await super().__call__(inputs, outputs, deadline_s)
        finally:
            self.running -= 1


async def test_capacity_is_asked_again_so_added_hosts_add_slots() -> None:
    backend = Concurrency()
    capacity = [1]
    policy = BatchPolicy(max_batch_size=0, instance_count=1, pipeline=1)
    batcher = Batcher(backend, ["Y"], policy, ModelStats("m", "1"), capacity=lambda: capacity[0])
    first = [asyncio.ensure_future(batcher.submit(row(i))) for i in range(6)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert backend.running == 2  # one instance + one formed ahead
    capacity[0] = 3  # e.g. two hosts joined: seen when the next batch forms
    backend.gate.set()
    await asyncio.gather(*first)
    backend.gate.clear()
    more = [asyncio.ensure_future(batcher.submit(row(i))) for i in range(6)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert backend.running == 4  # three instances + one ahead
    backend.gate.set()
    await asyncio.gather(*more)
    await batcher.close()


async def test_batch_formed_ahead_grows_until_an_instance_is_about_to_free() -> None:
    backend = Recorder(delay_s=0.08)
    policy = BatchPolicy(
        max_batch_size=16, preferred_batch_sizes=(2,), instance_count=1, pipeline=1
    )
    batcher, _ = make(policy, backend)
    await batcher.submit(row(0))  # learns that one execution takes ~80 ms
    running = asyncio.ensure_future(batcher.submit(row(1)))
    await asyncio.sleep(0.005)  # it runs; what comes now forms the next batch, ahead
    early = [asyncio.ensure_future(batcher.submit(row(i))) for i in range(2)]
    await asyncio.sleep(0.02)  # the preferred size was reached, but the instance is busy
    late = [asyncio.ensure_future(batcher.submit(row(i))) for i in range(3)]
    await asyncio.gather(running, *early, *late)
    assert backend.batches == [1, 1, 5]  # not [1, 1, 2, 3]
    await batcher.close()


def test_no_second_queue_delay_in_front_of_a_batching_host() -> None:
    """A backend that batches upstream (Triton, with the pushed dynamic_batching) gets the
    model's batch sizes but no queue delay from the gateway: the delay is paid once, there."""
    from gateway.dataplane import _policy
    from gateway.repository.config import DynamicBatching, ModelConfig
    from gateway.settings import Settings

    class Local:
        instance_count = 2

    class Upstream(Local):
        batches_upstream = True

    config = ModelConfig(
        name="m",
        max_batch_size=8,
        dynamic_batching=DynamicBatching(preferred_batch_sizes=(4,), max_queue_delay_us=2000),
    )
    here = _policy(config, Local(), Settings())  # type: ignore[arg-type]
    there = _policy(config, Upstream(), Settings())  # type: ignore[arg-type]
    assert here.max_queue_delay_s == 0.002 and there.max_queue_delay_s == 0.0
    assert there.max_batch_size == 8 and there.preferred_batch_sizes == (4,)
