"""The dynamic batcher's decisions, driven directly (no HTTP)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest

from gateway import context
from gateway.batching import Batcher, BatchPolicy, Executed, clients
from gateway.errors import DeadlineExceeded, GatewayError, ModelNotReady, QueueFull, Unavailable
from gateway.stats import ModelStats

Tensors = dict[str, np.ndarray]

# The batcher decides in milliseconds: a scheduler that stops answering (a bug that would hang
# every caller) fails its test in seconds, not at the suite's default timeout.
pytestmark = pytest.mark.timeout(5)

# A queue delay short enough to wait for in real time and exact in binary, so that the clock
# can be set to the very instant it expires.
DELAY_S = 1 / 64


class Clock:
    """The batcher's injected clock: it moves only when the test moves it."""

    def __init__(self, now_s: float = 100.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


class Recorder:
    """A backend that doubles its input and records each batch it was given."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[int] = []
        self.deadlines: list[float | None] = []
        self.request_ids: list[tuple[str, ...]] = []
        self.delay_s = delay_s
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None
        # Moves the test's clock by ``run_s`` while a batch runs (its compute time); a backend
        # that knows its own compute time reports ``compute_s`` as in-process runtimes do.
        self.clock: Clock | None = None
        self.run_s = 0.0
        self.compute_s: float | None = None
        self.input_s = self.output_s = 0.0
        self.host = ""

    async def __call__(
        self, inputs: Tensors, outputs: Sequence[str], deadline_s: float | None = None
    ) -> Executed:
        self.batches.append(len(inputs["X"]))
        self.deadlines.append(deadline_s)
        self.request_ids.append(context.batch_request_ids.get())
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.clock is not None:
            self.clock.now_s += self.run_s
        if self.error is not None:
            raise self.error
        return Executed(
            {"Y": inputs["X"] * 2}, self.host, self.compute_s, self.input_s, self.output_s
        )


def make(
    policy: BatchPolicy, backend: Recorder, clock: Callable[[], float] = time.monotonic
) -> tuple[Batcher, ModelStats]:
    stats = ModelStats("m", "1")
    return Batcher(backend, ["Y"], policy, stats, clock=clock), stats


def row(value: float, width: int = 4) -> Tensors:
    return {"X": np.full((1, width), value, dtype=np.float32)}


def rows(value: float, count: int, width: int = 4) -> Tensors:
    return {"X": np.full((count, width), value, dtype=np.float32)}


async def ticks(count: int = 5) -> None:
    """Let the scheduler and the batch tasks take their next steps."""
    for _ in range(count):
        await asyncio.sleep(0)


async def wait_for_batches(backend: Recorder, count: int) -> None:
    """Give the batcher's own timers (a few ms) the time to hand ``count`` batches over."""
    for _ in range(200):
        if len(backend.batches) >= count:
            return
        await asyncio.sleep(0.001)


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
    policy = BatchPolicy(
        max_batch_size=4, preferred_batch_sizes=(4,), max_queue_delay_s=5.0, adaptive_delay=False
    )
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
    # Triton's fixed delay: no re-decision timer that would end the wait anyway.
    policy = BatchPolicy(
        max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_delay_s=5.0, adaptive_delay=False
    )
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
    ) -> Executed:
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
    from gateway.lifecycle import _policy
    from gateway.repository.config import DynamicBatching, ModelConfig
    from gateway.settings import Settings, SettingsError

    class Local:
        instance_count = 2
        batches_upstream = False

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
    assert here.adaptive_delay  # the default
    triton = _policy(config, Local(), Settings(batching_delay="triton"))  # type: ignore[arg-type]
    assert not triton.adaptive_delay and triton.max_queue_delay_s == 0.002
    with pytest.raises(SettingsError, match="batching_delay must be adaptive or triton"):
        Settings(batching_delay="never")


# Behaviour pinned for the one-request-path redesign (issue 27): each test below fails when the
# decision it names changes. Time is the injected clock's; the only real waits are the
# batcher's own timers, a few milliseconds long.


async def test_the_queue_delay_expiring_sends_a_partial_batch() -> None:
    clock = Clock(100.0)
    backend = Recorder()
    batcher, _ = make(BatchPolicy(max_batch_size=8, max_queue_delay_s=DELAY_S), backend, clock)
    items = [batcher.enqueue(row(i)) for i in range(3)]
    clock.now_s = 100.0 + DELAY_S / 2
    await asyncio.sleep(2 * DELAY_S)  # the batcher's timer fired, but the delay has not passed
    assert backend.batches == []
    clock.now_s = 100.0 + DELAY_S  # the very instant it passes
    done = await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 1.0)
    assert backend.batches == [3]
    assert [float(d["Y"][0, 0]) for d in done] == [0.0, 2.0, 4.0]
    await batcher.close()


async def test_a_full_batch_goes_at_once_without_preferred_sizes() -> None:
    backend = Recorder()
    batcher, _ = make(BatchPolicy(max_batch_size=4, max_queue_delay_s=10.0), backend, Clock())
    items = [batcher.enqueue(row(i)) for i in range(4)]
    await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 1.0)  # no 10 s wait
    assert backend.batches == [4]
    await batcher.close()


async def test_a_request_that_would_overfill_the_batch_starts_the_next() -> None:
    """Multi-row requests: 3 + 1 rows fill a batch of 4 exactly; 2 + 3 would overfill it."""
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, stats = make(BatchPolicy(max_batch_size=4), backend, Clock())
    blocker = batcher.enqueue(row(0))
    await ticks()
    items = [batcher.enqueue(rows(n, n), n) for n in (3, 1, 2, 3)]
    backend.gate.set()
    done = await asyncio.wait_for(asyncio.gather(blocker.future, *(i.future for i in items)), 1.0)
    assert backend.batches == [1, 4, 2, 3]
    assert [d["Y"].shape[0] for d in done] == [1, 3, 1, 2, 3]  # each caller gets its own rows
    assert [float(d["Y"][0, 0]) for d in done[1:]] == [6.0, 2.0, 4.0, 6.0]
    assert stats.inference_count == 10 and stats.execution_count == 4
    await batcher.close()


async def test_the_default_timeout_sets_a_deadline_that_expires_in_the_queue() -> None:
    """``enqueue`` callers: the policy's default timeout gives a deadline, the earlier of it and
    the request's own (Triton rejects at the queue's timeout whatever the request asks; the
    request's timeout bounds the whole request here); a request still queued at its deadline
    (to the instant) fails and never reaches the backend, and the one behind it is served."""
    clock = Clock(100.0)
    backend = Recorder()
    backend.gate = asyncio.Event()
    policy = BatchPolicy(max_batch_size=1, default_timeout_s=2.0)
    batcher, _ = make(policy, backend, clock)
    blocker = batcher.enqueue(row(0), deadline_s=1000.0)
    await ticks()
    expiring = batcher.enqueue(row(1))
    late = batcher.enqueue(row(2), deadline_s=150.0)
    early = batcher.enqueue(row(3), deadline_s=101.5)
    clock.now_s = 101.0
    served = batcher.enqueue(row(4))
    assert expiring.enqueued_s == 100.0
    assert [i.deadline_s for i in (expiring, late, early, served)] == [102.0, 102.0, 101.5, 103.0]
    clock.now_s = 102.0
    backend.gate.set()
    for item in (expiring, late, early):
        with pytest.raises(DeadlineExceeded, match=r"^Request timeout expired$"):
            await asyncio.wait_for(item.future, 1.0)
    await asyncio.wait_for(served.future, 1.0)
    await blocker.future
    assert backend.batches == [1, 1]  # the expired requests never ran
    await batcher.close()


async def test_no_default_timeout_means_no_deadline() -> None:
    for default_s in (None, 0.0):
        batcher, _ = make(BatchPolicy(default_timeout_s=default_s), Recorder(), Clock())
        item = batcher.enqueue(row(0))
        assert item.deadline_s is None and item.rows == 1 and item.request_id is None
        await asyncio.wait_for(item.future, 1.0)
        await batcher.close()


async def test_a_deadline_shortens_the_wait_for_a_fuller_batch() -> None:
    clock = Clock(100.0)
    backend = Recorder()
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_s=10.0, adaptive_delay=False)
    batcher, _ = make(policy, backend, clock)
    item = batcher.enqueue(row(1), deadline_s=100.0 + DELAY_S)
    await ticks()
    assert backend.batches == []  # waiting for more, but only until its deadline
    clock.now_s = 100.0 + DELAY_S
    await asyncio.wait_for(item.future, 1.0)  # not 10 s
    assert backend.batches == [1] and backend.deadlines == [100.0 + DELAY_S]
    await batcher.close()


async def test_the_backend_gets_the_earliest_deadline_of_the_batch() -> None:
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(BatchPolicy(max_batch_size=8), backend, Clock(100.0))
    blocker = batcher.enqueue(row(0))
    await ticks()
    items = [batcher.enqueue(row(i), deadline_s=d) for i, d in ((1, 105.0), (2, None), (3, 103.0))]
    backend.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker.future, *(i.future for i in items)), 1.0)
    assert backend.batches == [1, 3] and backend.deadlines == [None, 103.0]
    await batcher.close()


async def test_submit_with_a_deadline_already_past_fails_at_once() -> None:
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(BatchPolicy(max_batch_size=1), backend, Clock(100.0))
    blocker = batcher.enqueue(row(0))
    await ticks()
    with pytest.raises(DeadlineExceeded, match=r"^Request timeout expired$") as failed:
        await asyncio.wait_for(batcher.submit(row(1), 1, deadline_s=99.0), 0.5)
    assert failed.value.__cause__ is None and failed.value.__suppress_context__
    backend.gate.set()
    await blocker.future
    assert backend.batches == [1]
    await batcher.close()


async def test_submit_sends_one_row_with_its_request_id() -> None:
    clock = Clock(100.0)
    backend = Recorder()
    backend.clock, backend.run_s, backend.host = clock, 0.25, "h1"
    batcher, stats = make(BatchPolicy(max_batch_size=8), backend, clock)
    token = context.request_id.set("req-1")
    try:
        result = await batcher.submit(row(3))  # the request id is this task's context
        assert float(result["Y"][0, 0]) == 6.0
    finally:
        context.request_id.reset(token)
    assert backend.request_ids == [("req-1",)] and stats.inference_count == 1
    assert (stats.compute_infer.count, stats.compute_infer.ns) == (1, 250_000_000)
    await batcher.close()


async def test_queue_and_compute_time_are_counted_by_value() -> None:
    clock = Clock(100.0)
    backend = Recorder()
    backend.clock, backend.run_s, backend.host = clock, 0.25, "h1"
    batcher, stats = make(BatchPolicy(max_batch_size=8), backend, clock)
    items = [batcher.enqueue(row(i), request_id=f"r{i}") for i in range(2)]
    clock.now_s = 102.5  # two and a half seconds in the queue
    await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 1.0)
    assert [i.queue_ns for i in items] == [2_500_000_000, 2_500_000_000]
    assert [i.execution for i in items] == [
        context.Execution(2, 2_500_000_000, 250_000_000, "h1")
    ] * 2
    assert backend.request_ids == [("r0", "r1")]
    assert (stats.queue.count, stats.queue.ns) == (2, 5_000_000_000)
    # each request of the batch counts the whole execution, as in Triton
    assert (stats.compute_infer.count, stats.compute_infer.ns) == (2, 500_000_000)
    assert (stats.execution_count, stats.inference_count) == (1, 2)
    assert (stats.batches[2].compute_infer.count, stats.batches[2].compute_infer.ns) == (
        1,
        250_000_000,
    )
    await batcher.close()


@pytest.mark.parametrize(
    ("run_s", "compute_s", "compute_ns", "waited_ns"),
    [
        (4.0, 1.0, 1_000_000_000, 3_000_000_000),
        (64.000000032, 64.0, 64_000_000_000, 32),  # to the nanosecond
        (0.25, 1.0, 250_000_000, 0),  # it claims more than the clock saw: nothing moves
    ],
)
async def test_a_wait_for_an_instance_counts_as_queueing_not_compute(
    run_s: float, compute_s: float, compute_ns: int, waited_ns: int
) -> None:
    """A backend that reports its own compute time (it waited for a free instance first): the
    rest of the batch's time is counted as each request's queue time."""
    clock = Clock(100.0)
    backend = Recorder()
    backend.clock, backend.run_s, backend.compute_s = clock, run_s, compute_s
    batcher, stats = make(BatchPolicy(max_batch_size=8), backend, clock)
    items = [batcher.enqueue(row(i)) for i in range(2)]
    clock.now_s = 100.5
    await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 1.0)
    queue_ns = 500_000_000 + waited_ns
    assert [i.execution for i in items] == [context.Execution(2, queue_ns, compute_ns)] * 2
    assert [i.queue_ns for i in items] == [queue_ns] * 2
    assert (stats.queue.count, stats.queue.ns) == (2, 2 * queue_ns)
    assert (stats.compute_infer.count, stats.compute_infer.ns) == (2, 2 * compute_ns)
    await batcher.close()


async def test_a_backends_input_and_output_time_count_as_compute_input_and_output() -> None:
    """Of a batch's compute time, what the backend says it spent handing inputs over and
    reading outputs is Triton's compute_input / compute_output, for each request of the batch;
    the rest is compute_infer."""
    clock = Clock(100.0)
    backend = Recorder()
    backend.clock, backend.run_s, backend.compute_s = clock, 4.0, 4.0
    backend.input_s, backend.output_s = 0.5, 0.25
    batcher, stats = make(BatchPolicy(max_batch_size=8), backend, clock)
    items = [batcher.enqueue(row(i)) for i in range(2)]
    await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 1.0)
    assert (stats.compute_input.count, stats.compute_input.ns) == (2, 2 * 500_000_000)
    assert (stats.compute_output.count, stats.compute_output.ns) == (2, 2 * 250_000_000)
    assert (stats.compute_infer.count, stats.compute_infer.ns) == (2, 2 * 3_250_000_000)
    await batcher.close()


async def test_preferred_sizes_continue_only_when_the_queue_reaches_the_next() -> None:
    """At a preferred size the batch goes on only if the live requests queued behind it, of the
    same shape, reach the next preferred size (withdrawn ones are not counted, a different
    shape ends the count); past the largest it fills up to the maximum."""
    cases = [
        # queued behind the running one: (rows, width) or "gone" -> the batches formed
        ([(1, 4)] * 3, [1, 2, 1]),
        ([(1, 4)] * 4, [1, 4]),
        ([(1, 4), (1, 4), (2, 4)], [1, 4]),
        ([(1, 4), (1, 4), "gone", (1, 4), (1, 4)], [1, 4]),
        ([(1, 4), (1, 4), (1, 4), (1, 5), (1, 4)], [1, 2, 1, 1, 1]),
        ([(1, 4)] * 6, [1, 6]),
        ([(1, 4)] * 4 + [(4, 4)], [1, 8]),
        ([(1, 4)] * 4 + [(5, 4)], [1, 4, 5]),
    ]
    for queued, expected in cases:
        backend = Recorder()
        backend.gate = asyncio.Event()
        policy = BatchPolicy(max_batch_size=8, preferred_batch_sizes=(2, 4))
        batcher, _ = make(policy, backend, Clock())
        blocker = batcher.enqueue(row(0))
        await ticks()
        live = [blocker]
        for spec in queued:
            if spec == "gone":
                batcher.enqueue(row(9)).future.cancel()
            else:
                n, width = spec
                live.append(batcher.enqueue(rows(1, n, width), n))
        backend.gate.set()
        await asyncio.wait_for(asyncio.gather(*(i.future for i in live)), 1.0)
        assert backend.batches == expected, queued
        await batcher.close()


async def test_backend_errors_reach_every_caller_and_free_the_slot() -> None:
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, stats = make(BatchPolicy(max_batch_size=8), backend, Clock())
    for error in (Unavailable("host down"), ValueError("boom")):
        blocker = batcher.enqueue(row(0))
        await ticks()
        items = [blocker, batcher.enqueue(row(1)), batcher.enqueue(row(2))]
        backend.error = error
        backend.gate.set()
        await asyncio.wait([i.future for i in items], timeout=1.0)
        raised = [i.future.exception() for i in items]  # the blocker ran alone, then 2
        if isinstance(error, GatewayError):
            assert all(e is error for e in raised)
        else:  # anything else is wrapped, once per batch, for every caller in it
            assert all(type(e) is GatewayError for e in raised)
            assert all(str(e) == "execution failed: ValueError: boom" for e in raised)
            assert raised[1] is raised[2]
        backend.gate.clear()
        backend.error = None
    assert stats.execution_count == 0
    backend.gate.set()
    ok = await asyncio.wait_for(batcher.submit(row(4)), 1.0)  # the slot was given back
    assert float(ok["Y"][0, 0]) == 8.0
    await batcher.close()


async def test_a_cancelled_execution_still_answers_its_callers() -> None:
    """A CancelledError out of the backend (or the batch's task cancelled) is not an Exception:
    the callers of that batch are answered anyway, never left waiting."""
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(BatchPolicy(max_batch_size=8), backend, Clock())
    item = batcher.enqueue(row(0))
    await ticks()
    backend.error = asyncio.CancelledError()
    backend.gate.set()
    await asyncio.wait([item.future], timeout=1.0)
    assert item.future.done() and not item.future.cancelled()
    error = item.future.exception()
    assert type(error) is GatewayError and str(error) == "execution was cancelled"
    backend.error = None
    ok = await asyncio.wait_for(batcher.submit(row(4)), 1.0)  # the slot was given back
    assert float(ok["Y"][0, 0]) == 8.0
    await batcher.close()


async def test_a_caller_gone_during_a_failed_batch_is_skipped() -> None:
    backend = Recorder()
    backend.gate = asyncio.Event()
    backend.error = Unavailable("host down")
    batcher, _ = make(BatchPolicy(max_batch_size=8), backend, Clock())
    items = [batcher.enqueue(row(i)) for i in range(2)]
    await ticks()
    items[0].future.cancel()
    backend.gate.set()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(items[1].future, 1.0)
    backend.error = None
    await asyncio.wait_for(batcher.submit(row(1)), 1.0)
    await batcher.close()


async def test_one_instance_runs_one_batch_at_a_time_after_successes_and_failures() -> None:
    """Each batch gives its slot back exactly once, whether it succeeded, failed or lost all
    its callers, so one instance never runs two batches at once."""
    backend = Concurrency()
    batcher, _ = make(BatchPolicy(max_batch_size=1, instance_count=1), backend, Clock())
    backend.gate.set()
    await asyncio.wait_for(batcher.submit(row(0)), 1.0)
    backend.error = ValueError("boom")
    with pytest.raises(GatewayError):
        await asyncio.wait_for(batcher.submit(row(1)), 1.0)
    backend.error = None
    backend.gate.clear()
    items = [batcher.enqueue(row(i)) for i in range(4)]
    await ticks(20)
    assert backend.peak == 1 and backend.running == 1
    backend.gate.set()
    await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 1.0)
    assert backend.peak == 1
    await batcher.close()


async def test_callers_gone_while_the_batch_formed_are_left_out() -> None:
    clock = Clock(100.0)
    backend = Recorder()
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_s=DELAY_S)
    batcher, stats = make(policy, backend, clock)
    kept, gone = batcher.enqueue(row(1)), batcher.enqueue(rows(2, 2), 2)
    await ticks()  # both joined the batch; it waits for more (the clock stands still)
    gone.future.cancel()
    other = batcher.enqueue(row(3, width=5))  # cannot join: the batch goes now
    await asyncio.wait_for(kept.future, 1.0)
    assert backend.batches == [1] and stats.inference_count == 1
    assert kept.execution is not None and kept.execution.batch_size == 1
    clock.now_s += DELAY_S  # ``other`` waited for company in vain
    await asyncio.wait_for(other.future, 1.0)
    # A batch whose callers all left never reaches the backend, and gives its slot back.
    both = [batcher.enqueue(row(4)), batcher.enqueue(row(5))]
    await ticks()
    for item in both:
        item.future.cancel()
    late = batcher.enqueue(row(6, width=5))
    await ticks()
    clock.now_s += DELAY_S
    await asyncio.wait_for(late.future, 1.0)
    assert backend.batches == [1, 1, 1] and stats.execution_count == 3
    await batcher.close()


async def test_a_full_queue_asks_to_retry_in_a_second_and_a_closed_one_refuses() -> None:
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(BatchPolicy(max_batch_size=1, max_queue_size=1), backend, Clock())
    running = batcher.enqueue(row(0))
    await ticks()
    queued = batcher.enqueue(row(1))
    assert batcher.pending == 2 and batcher.policy.max_queue_size == 1
    with pytest.raises(QueueFull, match=r"^Exceeds maximum queue size$") as full:
        batcher.enqueue(row(2))
    assert full.value.retry_after_s == 1.0
    backend.gate.set()
    await asyncio.wait_for(asyncio.gather(running.future, queued.future), 1.0)
    await batcher.close()
    assert batcher.pending == 0
    with pytest.raises(ModelNotReady, match=r"^model is unloading$"):
        batcher.enqueue(row(3))


async def test_close_gives_up_on_a_batch_that_does_not_finish() -> None:
    backend = Recorder()
    backend.gate = asyncio.Event()  # never set: the batch hangs
    batcher, _ = make(BatchPolicy(max_batch_size=1), backend, Clock())
    running = batcher.enqueue(row(0))
    await ticks()
    queued = [batcher.enqueue(row(i)) for i in range(2)]
    await asyncio.wait_for(batcher.close(drain_timeout_s=DELAY_S), 1.0)
    for item in queued:
        with pytest.raises(ModelNotReady, match=r"^model unloaded$"):
            item.future.result()
    assert not running.future.done() and backend.batches == [1]
    running.future.cancel()


async def test_two_is_already_a_batch() -> None:
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(BatchPolicy(max_batch_size=2), backend, Clock())
    items = [batcher.enqueue(row(i)) for i in range(5)]
    backend.gate.set()
    await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 1.0)
    assert backend.batches == [2, 2, 1]
    await batcher.close()


async def prime(
    batcher: Batcher, backend: Recorder, runs: list[tuple[float, float | None]]
) -> None:
    """Run batches of 2 (the preferred size, so they go at once) taking ``run_s`` on the clock
    (reporting ``compute_s`` when given): the batcher learns how long one execution takes."""
    for run_s, compute_s in runs:
        backend.run_s, backend.compute_s = run_s, compute_s
        await asyncio.wait_for(batcher.enqueue(rows(0, 2), 2).future, 1.0)
    backend.run_s, backend.compute_s = 0.0, None


async def pipelined(
    backend: Recorder, runs: list[tuple[float, float | None]]
) -> tuple[Clock, Batcher]:
    """A batcher on its own clock that forms one batch ahead (max 16, preferred 2), primed
    with ``runs``."""
    clock = Clock(100.0)
    backend.clock = clock
    policy = BatchPolicy(max_batch_size=16, preferred_batch_sizes=(2,), pipeline=1)
    batcher, _ = make(policy, backend, clock)
    await prime(batcher, backend, runs)
    return clock, batcher


@pytest.mark.parametrize(
    ("runs", "average_s"),
    [
        ([(1.0, None)], 1.0),
        ([(1.0, None), (0.5, None)], 0.8 * 1.0 + 0.2 * 0.5),  # a moving average
        ([(1.0, 0.5)], 0.5),  # the backend's own compute time, when it reports one
    ],
)
async def test_a_batch_formed_ahead_goes_when_an_instance_is_about_to_free(
    runs: list[tuple[float, float | None]], average_s: float
) -> None:
    """With every instance busy, the next batch keeps growing past its preferred size until
    the running one's start plus three quarters of an average execution."""
    clock = Clock(100.0)
    backend = Recorder()
    backend.clock = clock
    policy = BatchPolicy(max_batch_size=16, preferred_batch_sizes=(2,), pipeline=1)
    batcher, _ = make(policy, backend, clock)
    await prime(batcher, backend, runs)
    started_s = clock.now_s
    free_at_s = started_s + average_s * 0.75
    backend.gate = asyncio.Event()
    running = batcher.enqueue(row(1))
    await ticks()
    clock.now_s = free_at_s - 1e-10  # not quite there: the batch formed ahead waits on
    ahead = [batcher.enqueue(row(i)) for i in range(2)]
    await ticks()
    ahead += [batcher.enqueue(row(i)) for i in range(3)]
    await asyncio.sleep(0.005)
    assert backend.batches[len(runs) :] == [1]  # preferred size reached, the instance busy
    clock.now_s = free_at_s
    await wait_for_batches(backend, len(runs) + 2)
    assert backend.batches[len(runs) :] == [1, 5]  # handed over while the instance is busy
    backend.gate.set()
    await asyncio.wait_for(asyncio.gather(running.future, *(i.future for i in ahead)), 1.0)
    await batcher.close()


async def test_with_an_instance_free_the_batch_goes_at_its_preferred_size() -> None:
    """No estimate, or an instance free: a preferred size is reached, the batch goes (the
    queue delay is not waited)."""
    for instances, runs in ((1, []), (2, [(1.0, None)])):
        clock = Clock(100.0)
        backend = Recorder()
        backend.clock = clock
        policy = BatchPolicy(
            max_batch_size=16,
            preferred_batch_sizes=(2,),
            max_queue_delay_s=10.0,
            instance_count=instances,
            pipeline=1,
        )
        batcher, _ = make(policy, backend, clock)
        await prime(batcher, backend, runs)
        backend.gate = asyncio.Event()
        running = batcher.enqueue(rows(1, 2), 2)  # a preferred size: it goes at once
        await ticks()
        clock.now_s += 0.25
        pair = [batcher.enqueue(row(i)) for i in range(2)]
        await wait_for_batches(backend, len(runs) + 2)
        assert backend.batches[len(runs) :] == [2, 2], instances
        backend.gate.set()
        await asyncio.wait_for(asyncio.gather(running.future, *(i.future for i in pair)), 1.0)
        await batcher.close()


async def test_a_second_batch_formed_ahead_waits_a_round_more() -> None:
    """Two instances, two batches formed ahead: the first one ahead goes when an instance is
    about to free (start of the oldest running + 3/4 of an execution), the second one a whole
    execution later (it waits for a second round)."""
    clock = Clock(100.0)
    backend = Recorder()
    backend.clock = clock
    policy = BatchPolicy(
        max_batch_size=16, preferred_batch_sizes=(2,), instance_count=2, pipeline=2
    )
    batcher, _ = make(policy, backend, clock)
    await prime(batcher, backend, [(1.0, None)])
    backend.gate = asyncio.Event()
    started_s = clock.now_s
    items = []
    for count in (2, 3):  # both instances busy
        items.append(batcher.enqueue(rows(1, 2), 2))
        await wait_for_batches(backend, count)
    clock.now_s = started_s + 0.75 - 0.001
    items.append(batcher.enqueue(rows(1, 2), 2))  # the first formed ahead
    await asyncio.sleep(0.005)
    assert backend.batches == [2, 2, 2]
    clock.now_s = started_s + 0.75
    await wait_for_batches(backend, 4)
    assert backend.batches == [2, 2, 2, 2]
    clock.now_s = started_s + 1.75 - 0.001
    items.append(batcher.enqueue(rows(1, 2), 2))  # the second formed ahead: one round more
    await asyncio.sleep(0.005)
    assert backend.batches == [2, 2, 2, 2]
    clock.now_s = started_s + 1.75
    await wait_for_batches(backend, 5)
    assert backend.batches == [2, 2, 2, 2, 2]
    backend.gate.set()
    await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 1.0)
    await batcher.close()


async def test_when_a_batch_ends_is_judged_by_runs_of_its_size() -> None:
    """A heavy model's batch of 8 runs about 8 times as long as a batch of 2: the batch formed
    behind a running 8 keeps growing for three quarters of an 8's run, not of the average of
    all sizes (which sent it early with half its clients back: batches of 3-5 of 8 at 16
    closed-loop clients of bert_encoder)."""
    backend = Recorder()
    clock, batcher = await pipelined(backend, [(0.25, None)] * 3)  # batches of 2: 0.25 s
    backend.run_s = 1.0
    await asyncio.wait_for(batcher.enqueue(rows(0, 8), 8).future, 1.0)  # one of 8: 1 s
    backend.run_s, backend.gate = 0.0, asyncio.Event()  # (the average of all: 0.4 s)
    running = batcher.enqueue(rows(1, 8), 8)
    await wait_for_batches(backend, 5)
    started_s = clock.now_s
    clock.now_s = started_s + 0.75 - 1e-9  # past 3/4 of the average run, not of an 8's
    ahead = [batcher.enqueue(row(i)) for i in range(3)]
    await asyncio.sleep(0.005)
    assert backend.batches[4:] == [8]
    clock.now_s = started_s + 0.75
    await wait_for_batches(backend, 6)
    assert backend.batches[4:] == [8, 3]
    backend.gate.set()
    await asyncio.wait_for(asyncio.gather(running.future, *(i.future for i in ahead)), 1.0)
    await batcher.close()


class Held(Recorder):
    """A recorder whose batches, while ``hold``, each wait for their own gate."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.gates: list[asyncio.Event] = []

    async def __call__(
        self, inputs: Tensors, outputs: Sequence[str], deadline_s: float | None = None
    ) -> Executed:
        if not self.hold:
            return await super().__call__(inputs, outputs, deadline_s)
        self.batches.append(len(inputs["X"]))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return Executed({"Y": inputs["X"] * 2}, "", self.compute_s, 0.0, 0.0)


async def test_a_batch_that_waited_for_an_instance_runs_from_when_it_got_one() -> None:
    """A batch handed over ahead waits in the backend until the running one ends; the next
    batch formed behind it counts three quarters of a run from that end, not from when the
    waiting one was handed over (a quarter of a run before: the next batch then went half a
    run early)."""
    backend = Held()
    clock, batcher = await pipelined(backend, [(1.0, None)])
    backend.hold, backend.compute_s = True, 1.0  # each run takes 1 s of compute
    first = batcher.enqueue(rows(1, 2), 2)
    await wait_for_batches(backend, 2)
    started_s = clock.now_s
    clock.now_s = started_s + 0.75
    second = batcher.enqueue(rows(1, 2), 2)  # formed ahead, handed over at once
    await wait_for_batches(backend, 3)
    clock.now_s = started_s + 1.5
    backend.gates[0].set()  # the first ends: the second runs from now
    await asyncio.wait_for(first.future, 1.0)
    clock.now_s = started_s + 2.25 - 1e-9
    third = batcher.enqueue(rows(1, 2), 2)
    await asyncio.sleep(0.005)
    assert backend.batches == [2, 2, 2]  # still forming behind the second
    clock.now_s = started_s + 2.25
    await wait_for_batches(backend, 4)
    assert backend.batches == [2, 2, 2, 2]
    for gate in backend.gates:
        gate.set()
    await asyncio.wait_for(asyncio.gather(second.future, third.future), 1.0)
    await batcher.close()


async def test_closing_sends_the_batch_being_formed() -> None:
    backend = Recorder()
    batcher, _ = make(BatchPolicy(max_batch_size=8, max_queue_delay_s=10.0), backend, Clock())
    items = [batcher.enqueue(row(i)) for i in range(2)]
    await ticks()
    assert backend.batches == []  # waiting 10 s for more
    await asyncio.wait_for(batcher.close(), 1.0)
    assert backend.batches == [2] and all(i.future.done() for i in items)


async def test_a_failed_batch_is_not_taken_for_a_running_one() -> None:
    """A batch that failed leaves nothing behind for the estimate of when an instance frees:
    much later, a batch formed ahead still waits for the batch that is really running."""
    backend = Recorder()
    clock, batcher = await pipelined(backend, [(1.0, None)])
    backend.error = ValueError("boom")
    with pytest.raises(GatewayError):
        await asyncio.wait_for(batcher.enqueue(rows(0, 2), 2).future, 1.0)
    backend.error = None
    started_s = clock.now_s = clock.now_s + 10.0
    backend.gate = asyncio.Event()
    running = batcher.enqueue(rows(1, 2), 2)
    await wait_for_batches(backend, 3)
    clock.now_s = started_s + 0.75 - 0.001
    ahead = [batcher.enqueue(row(i)) for i in range(3)]
    await asyncio.sleep(0.005)
    assert backend.batches == [2, 2, 2]  # growing past 2: the instance is busy a while more
    clock.now_s = started_s + 0.75
    await wait_for_batches(backend, 4)
    assert backend.batches == [2, 2, 2, 3]
    backend.gate.set()
    await asyncio.wait_for(asyncio.gather(running.future, *(i.future for i in ahead)), 1.0)
    await batcher.close()


async def test_close_waits_for_the_batches_still_running() -> None:
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(BatchPolicy(max_batch_size=8, instance_count=2), backend, Clock())
    item = batcher.enqueue(row(1))
    await ticks()
    closing = asyncio.ensure_future(batcher.close())
    await ticks()
    assert not closing.done() and batcher.pending == 1
    backend.gate.set()
    await asyncio.wait_for(closing, 1.0)
    assert float(item.future.result()["Y"][0, 0]) == 2.0


async def test_close_completes_when_a_running_batch_died() -> None:
    """A backend that raises a BaseException (here a CancelledError from inside) ends its
    batch task with it; ``close`` still completes instead of raising it."""
    backend = Recorder()
    backend.gate = asyncio.Event()
    backend.error = asyncio.CancelledError()
    batcher, _ = make(BatchPolicy(max_batch_size=8, instance_count=2), backend, Clock())
    item = batcher.enqueue(row(1))
    await ticks()
    closing = asyncio.ensure_future(batcher.close())
    await ticks()
    backend.gate.set()
    await asyncio.wait_for(closing, 1.0)
    item.future.cancel()


async def test_a_batch_formed_ahead_wakes_when_the_queue_can_fill_it() -> None:
    """While every instance is busy the batch formed ahead is woken when the rows that arrived
    can fill it, not one row earlier (then the preferred size 4 would end it: the queue could
    not reach 16)."""
    clock = Clock(100.0)
    backend = Recorder()
    backend.clock = clock
    policy = BatchPolicy(max_batch_size=16, preferred_batch_sizes=(2, 4, 16), pipeline=1)
    batcher, _ = make(policy, backend, clock)
    await prime(batcher, backend, [(1.0, None)])
    backend.gate = asyncio.Event()
    items = [batcher.enqueue(rows(1, 2), 2)]  # runs, the instance busy for 3/4 s more
    await wait_for_batches(backend, 2)
    for i in range(16):  # one by one: the batch formed ahead waits for 15 more rows
        items.append(batcher.enqueue(row(i)))
        await ticks()
    await wait_for_batches(backend, 3)
    assert backend.batches == [2, 2, 16]
    backend.gate.set()
    await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 1.0)
    await batcher.close()


async def test_close_waits_30_s_by_default_for_a_batch_to_finish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[float | None] = []
    real_timeout = asyncio.timeout

    def timeout(delay_s: float | None) -> asyncio.Timeout:
        asked.append(delay_s)
        return real_timeout(DELAY_S)  # the test need not wait that long

    backend = Recorder()
    backend.gate = asyncio.Event()  # never set: the batch hangs
    batcher, _ = make(BatchPolicy(max_batch_size=1), backend, Clock())
    running = batcher.enqueue(row(0))
    await ticks()
    monkeypatch.setattr(asyncio, "timeout", timeout)
    await asyncio.wait_for(batcher.close(), 1.0)
    assert asked == [30.0]
    running.future.cancel()


# The adaptive queue delay (issue 21): with an instance free, a short batch waits only when the
# rate of rows arriving while the batcher is busy says one will join within the delay left.


async def test_a_lone_request_goes_at_once_while_triton_mode_waits_the_delay() -> None:
    """No traffic seen: nothing is expected to join, so the batch goes now (the old code waited
    the whole delay); ``adaptive_delay=False`` keeps Triton's wait, to the clock's instant."""
    for adaptive in (True, False):
        clock = Clock(100.0)
        backend = Recorder()
        policy = BatchPolicy(max_batch_size=8, max_queue_delay_s=DELAY_S, adaptive_delay=adaptive)
        batcher, _ = make(policy, backend, clock)
        item = batcher.enqueue(row(1))
        await asyncio.sleep(2 * DELAY_S)  # the batcher's timer fired; the clock stood still
        assert backend.batches == ([1] if adaptive else []), adaptive
        clock.now_s = 100.0 + DELAY_S
        await asyncio.wait_for(item.future, 1.0)
        assert backend.batches == [1]
        await batcher.close()


async def test_a_closed_loop_client_never_waits() -> None:
    """One client sending its next request when the last one is answered never arrives while
    the batcher is busy: however long the delay, every request goes at once."""
    clock = Clock(100.0)
    backend = Recorder()
    backend.clock, backend.run_s = clock, 0.002
    batcher, _ = make(BatchPolicy(max_batch_size=8, max_queue_delay_s=10.0), backend, clock)
    for i in range(20):
        await asyncio.wait_for(batcher.enqueue(row(i)).future, 1.0)  # not 10 s
        clock.now_s += 0.001  # the client's own time between requests
        assert batcher.arrival_rate() == 0.0
    assert backend.batches == [1] * 20
    await batcher.close()


async def test_paced_clients_are_probed_then_batched() -> None:
    """Clients that the front end hands over one by one (grpc.aio: one call per completion-queue
    round trip) each arrive after the last batch ended, as one closed-loop client does: the busy
    rate stays 0. Arrivals 1 ms apart with 10 ms of delay: the next batch waits two gaps anyway,
    and the client that comes meanwhile joins it."""
    clock = Clock(100.0)
    backend = Recorder()
    batcher, _ = make(BatchPolicy(max_batch_size=8, max_queue_delay_s=0.010), backend, clock)
    for i in range(3):
        await asyncio.wait_for(batcher.enqueue(row(i)).future, 1.0)  # the first: no gap known
        clock.now_s += 0.001
        if i == 0:
            assert backend.batches == [1]
    assert batcher.arrival_rate() == 0.0
    waiting = batcher.enqueue(row(3))
    await ticks()
    clock.now_s += 0.001
    company = batcher.enqueue(row(4))
    clock.now_s += 0.010  # the delay is over once the probe ends: the batch of two goes
    await asyncio.wait_for(asyncio.gather(waiting.future, company.future), 1.0)
    assert backend.batches[-1] == 2
    assert batcher.arrival_rate() > 0  # the joined row counts: the rate decides from here on
    await batcher.close()


async def test_a_closed_loop_client_pays_few_probes() -> None:
    """A lone closed-loop client with gaps (5 ms) shorter than the delay (100 ms): each probe
    catches nothing and the next comes after twice as many batches, so 64 requests see at most
    7 probes; the others go at once."""
    clock = Clock(100.0)
    backend = Recorder()
    backend.clock, backend.run_s = clock, 0.0001
    batcher, _ = make(BatchPolicy(max_batch_size=8, max_queue_delay_s=0.100), backend, clock)
    held = 0
    for i in range(64):
        item = batcher.enqueue(row(i))
        await ticks()
        held += not item.future.done()  # waiting: a probe
        await asyncio.wait_for(item.future, 1.0)
        clock.now_s += 0.005  # a probe: two gaps, 10 ms of real time
    assert 1 <= held <= 7
    assert backend.batches == [1] * 64
    await batcher.close()


async def arrive_while_busy(gap_s: float, delay_s: float) -> tuple[Batcher, Recorder, Clock]:
    """A runs (gated); B arrives ``gap_s`` later while A is out, which makes the arrival rate
    one row per ``gap_s``; A ends at that instant and B forms a batch with ``delay_s`` left."""
    clock = Clock(100.0)
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(BatchPolicy(max_batch_size=8, max_queue_delay_s=delay_s), backend, clock)
    first = batcher.enqueue(row(0))
    await ticks()
    clock.now_s += gap_s
    batcher.enqueue(row(1))
    assert batcher.arrival_rate() == 1 / gap_s
    backend.gate.set()
    await asyncio.wait_for(first.future, 1.0)
    return batcher, backend, clock


async def test_a_short_batch_waits_when_a_row_is_expected_within_the_delay() -> None:
    """Rows arrive while busy one per 1/64 s and 1/64 s of delay is left: one row is expected
    (to the exact boundary), so B waits for company, up to the delay."""
    batcher, backend, clock = await arrive_while_busy(DELAY_S, DELAY_S)
    await asyncio.sleep(2 * DELAY_S)
    assert backend.batches == [1]  # B is waiting
    clock.now_s += DELAY_S
    await wait_for_batches(backend, 2)
    assert backend.batches == [1, 1]
    await batcher.close()


async def test_a_short_batch_goes_when_no_row_is_expected_within_the_delay() -> None:
    """One row per 1/64 + 1/1024 s, and 1/64 s left: less than a row expected, B goes now."""
    batcher, backend, _ = await arrive_while_busy(DELAY_S + 1 / 1024, DELAY_S)
    await wait_for_batches(backend, 2)
    assert backend.batches == [1, 1]
    await batcher.close()


async def test_company_that_arrives_joins_the_waiting_batch() -> None:
    batcher, backend, clock = await arrive_while_busy(DELAY_S / 4, DELAY_S)
    third = batcher.enqueue(row(2))
    await ticks()
    assert backend.batches == [1]  # 2 rows: still waiting for a full batch
    clock.now_s += DELAY_S
    await asyncio.wait_for(third.future, 1.0)
    assert backend.batches == [1, 2]
    await batcher.close()


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Report connections open on the running loop, as the front ends do (long open: the
    "opened lately" guard is off); all closed again at the end."""
    monkeypatch.setattr(clients, "RECENT_FIRST_S", 0.0)
    opened: list[tuple[asyncio.AbstractEventLoop, int | None]] = []

    def open_(count: int, carries: int | None = 1) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            clients.opened(loop, None if carries is None else 0)
            if carries:
                clients.carries_more(loop, carries, first=True)
            opened.append((loop, carries))

    yield open_
    for loop, carries in opened:
        clients.closed(loop, carries)


async def test_a_batch_holding_every_connections_request_goes_at_once(
    connections: Callable[..., None],
) -> None:
    """The rate says wait (as in the test above), but the one connection open has its request
    in this batch: nobody can join before it is answered, so it goes without waiting."""
    connections(1)
    batcher, backend, _ = await arrive_while_busy(DELAY_S / 4, DELAY_S)
    await wait_for_batches(backend, 2)
    assert backend.batches == [1, 1]
    await batcher.close()


async def test_a_batch_goes_once_the_last_connection_that_could_send_has(
    connections: Callable[..., None],
) -> None:
    """Two connections, one request in: it waits for the other's, then goes at once (no
    waiting out the delay for a fuller batch that nobody can send)."""
    connections(2)
    batcher, backend, _ = await arrive_while_busy(DELAY_S / 4, DELAY_S)
    await asyncio.sleep(2 * DELAY_S)
    assert backend.batches == [1]  # one connection may still send
    third = batcher.enqueue(row(2))
    await asyncio.wait_for(third.future, 1.0)  # the clock does not move
    assert backend.batches == [1, 2]
    await batcher.close()


async def test_a_connection_carrying_two_at_once_counts_as_two(
    connections: Callable[..., None],
) -> None:
    """One connection that has carried two requests at once (gRPC clients sharing it): with
    one of them in, the batch waits for the other's, then goes at once."""
    connections(1, carries=2)
    batcher, backend, _ = await arrive_while_busy(DELAY_S / 4, DELAY_S)
    await asyncio.sleep(2 * DELAY_S)
    assert backend.batches == [1]
    third = batcher.enqueue(row(2))
    await asyncio.wait_for(third.future, 1.0)  # the clock does not move
    assert backend.batches == [1, 2]
    await batcher.close()


@pytest.mark.parametrize("open_lately", [False, True])
async def test_an_unseen_or_new_connection_leaves_the_wait_to_the_rate(
    connections: Callable[..., None], monkeypatch: pytest.MonkeyPatch, open_lately: bool
) -> None:
    """Connections of unknown reach (grpc.aio's, a streaming call), or connections opened
    lately (clients that connect per request), may send more at any time: the rate decides."""
    if open_lately:
        monkeypatch.setattr(clients, "RECENT_FIRST_S", 3600.0)
        connections(1)
    else:
        connections(1)
        connections(1, carries=None)
    batcher, backend, clock = await arrive_while_busy(DELAY_S / 4, DELAY_S)
    await asyncio.sleep(2 * DELAY_S)
    assert backend.batches == [1]  # B waits for company, as the rate says
    clock.now_s += DELAY_S
    await wait_for_batches(backend, 2)
    await batcher.close()


def test_who_may_send_on_a_loop() -> None:
    """The count behind the rule: unknown (None) until a front end reports a connection, and
    again once the last one closes; a connection counts from its first request, which turns
    the rule off for a while (clients that connect per request)."""
    loop = asyncio.new_event_loop()
    try:
        assert clients.may_send(loop, 0) is None
        clients.opened(loop)
        clients.opened(loop)
        assert clients.may_send(loop, 0) == 0  # neither sent anything to batch
        clients.carries_more(loop, first=True)
        clients.carries_more(loop, first=True)
        assert clients.may_send(loop, 0) is None  # their first requests came just now
        clients._BY_LOOP[loop].first_s -= clients.RECENT_FIRST_S
        assert [clients.may_send(loop, n) for n in (0, 1, 2, 3)] == [2, 1, 0, 0]
        clients.carries_more(loop, 2)  # one of them carried three at once
        assert [clients.may_send(loop, n) for n in (0, 3, 4)] == [4, 1, 0]
        clients.opened(loop, carries=None)  # any number: unknown while it is open
        assert clients.may_send(loop, 0) is None
        clients.closed(loop, carries=None)
        assert clients.may_send(loop, 0) == 4
        clients.closed(loop, carries=3)
        clients.closed(loop, carries=1)
        assert clients.may_send(loop, 0) is None and loop not in clients._BY_LOOP
    finally:
        loop.close()


async def test_the_arrival_rate_decays_and_counts_busy_time_without_arrivals() -> None:
    """Rows arriving while busy over busy seconds, each observation (an arrival, the end of a
    busy period) weighing the past by 0.9; time busy since the last arrival counts too."""
    clock = Clock(100.0)
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(BatchPolicy(max_batch_size=1), backend, clock)
    assert batcher.arrival_rate() == 0.0
    items = [batcher.enqueue(row(0))]  # found it idle: starts a busy period, not counted
    assert batcher.arrival_rate() == 0.0
    clock.now_s = 100.5
    items.append(batcher.enqueue(rows(1, 2), 2))  # 2 rows after 0.5 s busy
    assert batcher.arrival_rate() == 2 / 0.5
    clock.now_s = 101.0  # busy another 0.5 s, no arrival yet
    assert batcher.arrival_rate() == 2 / 1.0
    clock.now_s = 101.5
    items.append(batcher.enqueue(row(2)))  # decayed: (0.9 * 2 + 1) rows in (0.9 * 0.5 + 1) s
    assert batcher.arrival_rate() == pytest.approx((0.9 * 2 + 1) / (0.9 * 0.5 + 1.0))
    backend.gate.set()
    await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 1.0)
    # The busy period ended at 101.5 (no time passed): one more decayed observation, no rows.
    assert batcher.arrival_rate() == pytest.approx(
        (0.9 * (0.9 * 2 + 1)) / (0.9 * (0.9 * 0.5 + 1.0))
    )
    clock.now_s = 200.0  # idle time does not count
    assert batcher.arrival_rate() == pytest.approx((0.9 * 2 + 1) / (0.9 * 0.5 + 1.0))
    await batcher.close()


async def test_requests_dropped_from_the_queue_end_the_busy_period_too() -> None:
    """An abandoned or expired request leaves the busy period like an answered one: once none is
    outstanding, time no longer counts as busy."""
    clock = Clock(100.0)
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(BatchPolicy(max_batch_size=1), backend, clock)
    running = batcher.enqueue(row(0))
    await ticks()
    clock.now_s = 101.0
    gone = batcher.enqueue(row(1))
    expiring = batcher.enqueue(row(2), deadline_s=101.5)
    gone.future.cancel()
    clock.now_s = 102.0
    backend.gate.set()
    await asyncio.wait_for(running.future, 1.0)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(expiring.future, 1.0)
    rate = batcher.arrival_rate()
    clock.now_s = 150.0
    assert batcher.arrival_rate() == rate  # idle: nothing outstanding
    await batcher.close()


# Priorities (issue 23, Triton's priority_levels): level 1 is the highest; each level queues
# under its own policy.


def levels_policy(**changes: object) -> BatchPolicy:
    """Three levels, default 2, batches of 2; level 3's queue holds 2 requests."""
    from gateway.batching import QueuePolicy

    fields: dict[str, object] = {
        "max_batch_size": 2,
        "priority_levels": 3,
        "default_priority_level": 2,
        "queue_policies": ((3, QueuePolicy(max_queue_size=2)),),
    }
    fields.update(changes)
    return BatchPolicy(**fields)  # type: ignore[arg-type]


async def test_higher_priorities_are_batched_first() -> None:
    """Queued low to high, batched high to low: level 1, then the default level (priority 0
    and priorities past the levels queue there), then level 3, FIFO within a level; a batch
    with room fills from the next level down."""
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(levels_policy(), backend, Clock())
    blocker = batcher.enqueue(row(0))
    await ticks()
    order = [(31, 3), (32, 3), (21, 0), (11, 1), (22, 9), (12, 1), (23, 2)]
    items = [batcher.enqueue(row(v), priority=p) for v, p in order]
    assert [i.level for i in items] == [3, 3, 2, 1, 2, 1, 2]
    items.append(batcher.enqueue(row(24)))
    assert items[-1].level == 2  # no priority given: the default level
    served: list[float] = []
    for item in items:
        item.future.add_done_callback(lambda f: served.append(float(f.result()["Y"][0, 0]) / 2))
    backend.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker.future, *(i.future for i in items)), 1.0)
    assert served == [11, 12, 21, 22, 23, 24, 31, 32]
    assert backend.batches == [1, 2, 2, 2, 2]
    await batcher.close()


async def test_a_full_level_refuses_while_the_others_take_requests() -> None:
    """Level 3 holds two requests: the third is refused (shed), levels 1 and 2 still queue."""
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(levels_policy(max_queue_size=3), backend, Clock())
    blocker = batcher.enqueue(row(0))
    await ticks()
    low = [batcher.enqueue(row(3), priority=3) for _ in range(2)]
    with pytest.raises(QueueFull, match=r"^Exceeds maximum queue size$"):
        batcher.enqueue(row(3), priority=3)
    others = [batcher.enqueue(row(p), priority=p) for p in (1, 1, 1, 2, 2, 2)]
    with pytest.raises(QueueFull):  # the default policy's bound, per level
        batcher.enqueue(row(2), priority=2)
    assert batcher.pending == 9
    backend.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker.future, *(i.future for i in low + others)), 1.0)
    await batcher.close()


async def test_without_levels_a_priority_changes_nothing() -> None:
    backend = Recorder()
    batcher, _ = make(BatchPolicy(max_batch_size=2, max_queue_size=1), backend, Clock())
    backend.gate = asyncio.Event()
    blocker = batcher.enqueue(row(0))
    await ticks()
    item = batcher.enqueue(row(1), priority=1)
    assert item.level == 0
    with pytest.raises(QueueFull):
        batcher.enqueue(row(2), priority=5)
    backend.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker.future, item.future), 1.0)
    await batcher.close()


async def test_a_level_timeout_rejects_queued_requests_of_that_level_only() -> None:
    """timeout_action REJECT: the level's timeout is a deadline (the earlier of it and the
    request's own); other levels keep theirs."""
    from gateway.batching import QueuePolicy

    clock = Clock(100.0)
    backend = Recorder()
    backend.gate = asyncio.Event()
    policy = levels_policy(queue_policies=((3, QueuePolicy(default_timeout_s=1.0)),))
    batcher, _ = make(policy, backend, clock)
    blocker = batcher.enqueue(row(0))
    await ticks()
    low = batcher.enqueue(row(3), priority=3)
    low_own = batcher.enqueue(row(3), deadline_s=100.5, priority=3)
    high = batcher.enqueue(row(1), priority=1)
    assert (low.deadline_s, low_own.deadline_s, high.deadline_s) == (101.0, 100.5, None)
    assert low.delay_at_s is None
    clock.now_s = 101.0
    backend.gate.set()
    for item in (low, low_own):
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(item.future, 1.0)
    await asyncio.wait_for(asyncio.gather(blocker.future, high.future), 1.0)
    assert backend.batches == [1, 1]
    await batcher.close()


async def test_a_level_timeout_with_delay_moves_requests_behind_their_level() -> None:
    """timeout_action DELAY: a request still queued at its level's timeout is not failed but
    served after its level's requests that have not timed out, still before lower levels."""
    from gateway.batching import QueuePolicy

    clock = Clock(100.0)
    backend = Recorder()
    backend.gate = asyncio.Event()
    delay = QueuePolicy(default_timeout_s=1.0, delay_on_timeout=True)
    policy = levels_policy(max_batch_size=1, queue_policies=((1, delay),))
    batcher, _ = make(policy, backend, clock)
    blocker = batcher.enqueue(row(0))
    await ticks()
    old = batcher.enqueue(row(10), priority=1)
    clock.now_s = 100.5
    new = batcher.enqueue(row(11), priority=1)
    low = batcher.enqueue(row(20), priority=2)
    assert (old.delay_at_s, new.delay_at_s, old.deadline_s) == (101.0, 101.5, None)
    clock.now_s = 101.0  # ``old`` timed out to the instant, ``new`` not yet
    served: list[float] = []
    for item in (old, new, low):
        item.future.add_done_callback(lambda f: served.append(float(f.result()["Y"][0, 0]) / 2))
    backend.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker.future, old.future, new.future, low.future), 1)
    assert served == [11, 10, 20]
    await batcher.close()


async def test_a_shorter_request_timeout_overrides_the_level_timeout_only_when_allowed() -> None:
    from gateway.batching import QueuePolicy

    for allow, delay_at_s in ((True, 100.25), (False, 101.0)):
        clock = Clock(100.0)
        delay = QueuePolicy(default_timeout_s=1.0, allow_timeout_override=allow,
                            delay_on_timeout=True)  # fmt: skip
        batcher, _ = make(levels_policy(queue_policies=((1, delay),)), Recorder(), clock)
        short = batcher.enqueue(row(1), deadline_s=100.25, priority=1)
        longer = batcher.enqueue(row(1), deadline_s=102.0, priority=1)
        none = batcher.enqueue(row(1), priority=1)
        assert short.delay_at_s == delay_at_s, allow
        assert longer.delay_at_s == none.delay_at_s == 101.0
        assert (short.deadline_s, longer.deadline_s) == (100.25, 102.0)  # the request's own
        await asyncio.wait_for(asyncio.gather(short.future, longer.future, none.future), 1.0)
        await batcher.close()


def test_level_policies_fill_in_the_default_policy() -> None:
    from gateway.batching import QueuePolicy

    special = QueuePolicy(max_queue_size=5, delay_on_timeout=True)
    policy = BatchPolicy(
        max_queue_size=7,
        default_timeout_s=2.0,
        allow_timeout_override=True,
        delay_on_timeout=True,
        priority_levels=3,
        default_priority_level=3,
        queue_policies=((2, special),),
    )
    default = QueuePolicy(7, 2.0, True, True)
    assert policy.level_policies() == {1: default, 2: special, 3: default}
    assert BatchPolicy(max_queue_size=7).level_policies() == {0: QueuePolicy(7)}
    assert [policy.level_of(p) for p in (0, 1, 2, 3, 4)] == [3, 1, 2, 3, 3]


async def test_a_wait_in_vain_is_cut_short_after_two_expected_gaps() -> None:
    """One row per 1/8 s while busy and 1/2 s of delay: B waits, but its timer is set for two
    expected gaps (1/4 s), not the whole delay. When it fires, nothing came in the 1/4 s the
    clock moved: the rate fell to one row per 3/8 s, less than a row is expected in the 1/4 s
    left, and B goes, a quarter of a second before the delay's end."""
    batcher, backend, clock = await arrive_while_busy(1 / 8, 1 / 2)
    clock.now_s += 1 / 4
    await asyncio.sleep(3 / 8)  # real time: past the 1/4 s timer, short of the 1/2 s one
    assert backend.batches == [1, 1]
    await batcher.close()


async def test_a_wait_that_still_pays_goes_on_after_its_timer() -> None:
    """The same, with the clock still: at the timer the rate is unchanged, B waits on."""
    batcher, backend, clock = await arrive_while_busy(DELAY_S / 4, DELAY_S)
    await asyncio.sleep(DELAY_S)  # past the DELAY_S / 2 timer
    assert backend.batches == [1]
    clock.now_s += DELAY_S
    await wait_for_batches(backend, 2)
    assert backend.batches == [1, 1]
    await batcher.close()


async def test_an_expired_request_does_not_start_a_batch() -> None:
    """The head of the queue timed out: it is failed and the live request behind it starts the
    batch, which waits for company (Triton's delay) instead of going with a dead first."""
    clock = Clock(100.0)
    backend = Recorder()
    backend.gate = asyncio.Event()
    policy = BatchPolicy(max_batch_size=2, max_queue_delay_s=DELAY_S, adaptive_delay=False)
    batcher, _ = make(policy, backend, clock)
    blocker = batcher.enqueue(rows(0, 2), 2)  # a full batch: it goes at once
    await ticks()
    expiring = batcher.enqueue(row(1), deadline_s=100.5)
    clock.now_s = 100.5
    live = batcher.enqueue(row(2))
    backend.gate.set()
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(expiring.future, 1.0)
    await asyncio.sleep(2 * DELAY_S)
    assert backend.batches == [2]  # ``live`` waits for company until its delay ends
    clock.now_s += DELAY_S
    await asyncio.wait_for(asyncio.gather(blocker.future, live.future), 1.0)
    assert backend.batches == [2, 1]
    await batcher.close()


async def test_a_dropped_request_counts_once_so_busy_periods_still_end() -> None:
    """A withdrawn request dropped from the queue (at the head, or while a batch forms) is one
    request less outstanding, not two: later busy periods still end when their last request
    does, and idle time never counts as busy."""
    for max_batch_size in (1, 4):  # dropped by _take_live / by the forming loop
        clock = Clock(100.0)
        backend = Recorder()
        backend.gate = asyncio.Event()
        policy = BatchPolicy(max_batch_size=max_batch_size, adaptive_delay=False)
        batcher, _ = make(policy, backend, clock)
        blocker = batcher.enqueue(row(0))
        await ticks()
        clock.now_s = 101.0
        ahead = batcher.enqueue(row(1))  # with batches of 4, it starts the batch
        batcher.enqueue(row(9)).future.cancel()
        behind = batcher.enqueue(row(2))
        backend.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker.future, ahead.future, behind.future), 1)
        assert backend.batches == ([1, 1, 1] if max_batch_size == 1 else [1, 2])
        await asyncio.wait_for(batcher.enqueue(row(3)).future, 1.0)  # a busy period of its own
        rate = batcher.arrival_rate()
        clock.now_s = 110.0  # idle
        assert batcher.arrival_rate() == rate > 0, max_batch_size
        await batcher.close()


async def test_the_batch_being_formed_counts_against_its_own_level() -> None:
    """Level 3 holds two: one waiting in the batch being formed and one queued fill it (as
    Triton's queue holds a request until its batch is sent); level 1 still takes requests."""
    clock = Clock(100.0)
    backend = Recorder()
    policy = levels_policy(max_batch_size=4, max_queue_delay_s=DELAY_S, adaptive_delay=False)
    batcher, _ = make(policy, backend, clock)
    low = [batcher.enqueue(row(3), priority=3)]
    await ticks()  # taken into the batch being formed, waiting for company
    low.append(batcher.enqueue(row(3), priority=3))
    with pytest.raises(QueueFull):
        batcher.enqueue(row(3), priority=3)
    high = batcher.enqueue(row(1), priority=1)
    clock.now_s += DELAY_S
    await asyncio.wait_for(asyncio.gather(high.future, *(i.future for i in low)), 1.0)
    await batcher.close()


async def test_a_failing_callback_leaves_the_rest_of_its_batch_answered() -> None:
    """``Queued.on_done`` runs where the batch ends: one caller's callback that raises is
    reported to the loop, and every other request of the batch still gets its rows."""
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(BatchPolicy(max_batch_size=8), backend)
    reported: list[BaseException] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx["exception"]))
    try:
        blocker = batcher.enqueue(row(0))
        await wait_for_batches(backend, 1)  # it runs alone, blocked on the gate
        items = [batcher.enqueue(row(i)) for i in range(1, 4)]
        answered: list[float] = []

        def fails(_: object) -> None:
            raise RuntimeError("a caller's bug")

        items[0].on_done = fails
        for item in items[1:]:
            item.on_done = lambda q: answered.append(float(q.result["Y"][0, 0]))  # type: ignore[index]
        backend.gate.set()
        await asyncio.wait_for(blocker.future, 1.0)
        for _ in range(100):  # (no futures of theirs: the callbacks are all they have)
            if all(i.done() for i in items):
                break
            await asyncio.sleep(0.001)
        assert backend.batches == [1, 3]
        assert answered == [4.0, 6.0]
        assert [str(e) for e in reported] == ["a caller's bug"]
    finally:
        loop.set_exception_handler(None)


async def test_a_queued_entry_and_its_future_end_as_one() -> None:
    """``Queued.future`` is made on first use: after the end it holds that end; cancelling it
    withdraws the request at once (the batcher never runs it, the entry's callback sees it)."""
    backend = Recorder()
    backend.gate = asyncio.Event()
    batcher, _ = make(BatchPolicy(max_batch_size=8), backend)
    blocker = batcher.enqueue(row(0))
    await wait_for_batches(backend, 1)
    gone, kept = batcher.enqueue(row(1)), batcher.enqueue(row(2))
    ended: list[bool] = []
    gone.on_done = lambda q: ended.append(q.cancelled())  # type: ignore[attr-defined]
    assert gone.future.cancel()
    assert gone.cancelled() and ended == [True]  # at once, not a loop turn later
    backend.gate.set()
    await asyncio.wait_for(blocker.future, 1.0)
    for _ in range(100):
        if kept.done():
            break
        await asyncio.sleep(0.001)
    assert backend.batches == [1, 1]  # the cancelled one took no place in the batch
    assert kept.future.done() and float(kept.future.result()["Y"][0, 0]) == 4.0
