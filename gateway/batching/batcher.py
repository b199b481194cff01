"""The per-model-version dynamic batcher.

(Over 450 lines on purpose: the scheduler, the batch run and the decisions between them,
whether a short batch waits and whether a lone batch runs inline, share one model version's
queue and slots. How requests arrive, the rate and the probe those decisions read, is
``gateway.batching.arrivals``.)

Each caller gets a ``Queued`` entry that ends with its rows of the outputs. One scheduler task
waits until an execution slot is free (there are ``instance_count`` of them), then takes
requests from the head of the queue while they are shape-compatible and fit
``max_batch_size``; it keeps waiting for more, up to ``max_queue_delay``, unless a preferred
batch size is reached first. The merged batch runs as its own task and the outputs are split
back, row ranges per caller. Waiting for a free slot before forming the batch means that under
load batches grow by themselves, with no delay configured.

With ``pipeline`` > 0, that many more batches may be formed while every instance is busy and
handed to the backend ahead, so it starts the next one the moment it finishes instead of
waiting for the event loop to notice. Such a batch keeps growing (past a preferred size, up to
``max_batch_size``) until an instance is about to free up, as estimated from the running batch's
start and the average execution time.

The queue delay adapts to the traffic (``BatchPolicy.adaptive_delay``, the default): while an
instance is free, waiting leaves it idle, so the batcher waits only when the recent rate of
requests arriving while it is busy says one will join before the delay runs out, or, for
clients the front end paces, as a probe (``gateway.batching.arrivals``), and not at all when no
other client can send (``gateway.batching.clients``). Off, every short batch waits the whole
``max_queue_delay`` (Triton's behaviour).

A lone batch (``BatchPolicy.inline_max_s``: all that is outstanding on the event loop, of a
model whose recent runs were short, with arrivals rare) runs on the event loop's own thread
through the backend's ``execute_now``, skipping the hand-off to a worker thread and back.

The queue (``gateway.batching.queue``) has one FIFO per priority level (Triton's
``priority_levels``; one level without them): batches take from the highest level first. Each
level is bounded: a full one fails fast (``QueueFull``). A request whose deadline (its own, or
its level's queue timeout) passes while queued fails with ``DeadlineExceeded``; a caller that
goes away (its entry cancelled) is dropped before it takes a slot in a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway import context, tracing
from gateway.batching import clients
from gateway.batching.arrivals import MIN_RECHECK_S, Arrivals
from gateway.batching.queue import PriorityQueue, QueuePolicy
from gateway.errors import DeadlineExceeded, GatewayError, ModelNotReady
from gateway.stats import ModelStats

Tensors = dict[str, np.ndarray[Any, Any]]
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Executed:
    """What running one batch gave back (a backend's ``execute``): its outputs, where it ran
    (a host's name; "" in-process), and how long it really computed when the backend knows
    (not counting a wait for a free instance, as when the batcher hands batches ahead: the
    batcher counts the rest as queueing)."""

    outputs: Tensors
    host: str = ""
    compute_s: float | None = None
    # Of compute_s, the time spent handing inputs to the runtime and reading its outputs
    # (Triton's compute_input / compute_output), when the backend knows.
    input_s: float = 0.0
    output_s: float = 0.0


Execute = Callable[[Tensors, Sequence[str], float | None], Awaitable[Executed]]


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How one model version batches. ``max_batch_size`` 0 means requests never merge."""

    max_batch_size: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 1024
    default_timeout_s: float | None = None
    instance_count: int = 1
    # Batches formed ahead while every instance is busy, handed to the backend at once so it
    # starts the next one the moment it finishes (no idle hop through the event loop between).
    pipeline: int = 0
    # Wait for a fuller batch with an instance free only when the arrival rate says a request
    # will join within the delay left (see the module docstring); False: Triton's fixed wait.
    adaptive_delay: bool = True
    # A lone batch (nothing else outstanding in this process, arrivals rare, its model's recent
    # executions at most this long) runs on the event loop's thread, with no hand-off to a
    # worker thread and back (see ``Batcher``); 0: never.
    inline_max_s: float = 0.0
    # Triton's priorities: levels 1 (highest) .. ``priority_levels`` (0: none, one queue); a
    # request's priority 0 (or one past the levels) is ``default_priority_level``. Each level
    # queues under its ``queue_policies`` entry, else the default policy: ``max_queue_size``,
    # ``default_timeout_s``, ``allow_timeout_override``, ``delay_on_timeout`` above and below.
    priority_levels: int = 0
    default_priority_level: int = 0
    queue_policies: tuple[tuple[int, QueuePolicy], ...] = ()
    allow_timeout_override: bool = False
    delay_on_timeout: bool = False

    def level_policies(self) -> dict[int, QueuePolicy]:
        """Every priority level's queue policy (level 0 alone without priorities)."""
        default = QueuePolicy(
            self.max_queue_size,
            self.default_timeout_s,
            self.allow_timeout_override,
            self.delay_on_timeout,
        )
        if not self.priority_levels:
            return {0: default}
        given = dict(self.queue_policies)
        return {n: given.get(n, default) for n in range(1, self.priority_levels + 1)}

    def level_of(self, priority: int) -> int:
        """The level a request of ``priority`` queues at (Triton: 0 or out of range, the
        default level)."""
        if 1 <= priority <= self.priority_levels:
            return priority
        return self.default_priority_level


# A lone batch runs inline only while fewer rows than this are expected to arrive during it.
INLINE_MAX_ARRIVALS = 0.25
# Requests outstanding in every batcher of an event loop: a batch runs inline only when it
# holds all of them (it blocks the loop, and with it every other model's requests).
_LOOP_OUTSTANDING: dict[asyncio.AbstractEventLoop, int] = {}

# Runs one batch on the calling thread if it can start at once (an in-process session free),
# else returns None (``Backend.execute_now``).
ExecuteNow = Callable[[Tensors, Sequence[str]], Executed | None]


# A queued request's state (``Queued.state``): read as a plain attribute on the hot path.
WAITING, DONE, CANCELLED = 0, 1, 2


@dataclass(slots=True, eq=False)
class Queued:
    """One request in the queue (``Batcher.enqueue``): it ends once, with its rows of the
    outputs (``result``), an ``error``, or cancelled (its caller went away: the batcher drops
    it before it takes a slot in a batch); ``execution`` says how it ran.

    Its end calls ``on_done(self)`` right there, not scheduled: the data plane's ``Pending``
    takes it so, with no asyncio future, callback handle and loop turn per request. ``future``
    is the same end as an asyncio future, made on first use, for callers that await."""

    inputs: Tensors
    rows: int
    signature: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    enqueued_s: float
    deadline_s: float | None
    request_id: str | None = None
    queue_ns: int = field(default=0)
    execution: context.Execution | None = None
    level: int = 0  # its priority level
    delay_at_s: float | None = None  # a DELAY queue policy moves it back from then on
    trace: Any = None  # the request's trace span (gateway.tracing), set by its Pending
    state: int = WAITING
    result: Tensors | None = None
    error: BaseException | None = None
    on_done: Callable[[Queued], object] | None = None
    _future: asyncio.Future[Tensors] | None = None

    def done(self) -> bool:
        return self.state != WAITING

    def cancelled(self) -> bool:
        return self.state == CANCELLED

    def cancel(self) -> bool:
        """Withdraw it (False once it ended)."""
        if self.state != WAITING:
            return False
        self.state = CANCELLED
        self._ended()
        return True

    def set_result(self, result: Tensors) -> None:
        """End it with its rows of the outputs (no-op once ended: a cancel came first)."""
        if self.state != WAITING:
            return
        self.state, self.result = DONE, result
        if self._future is not None or self.on_done is None:
            self._ended()
            return
        # The usual end, ``_ended`` inline (once per request): the one callback, no future.
        callback, self.on_done = self.on_done, None
        try:
            callback(self)
        except Exception as exc:  # the caller's bug: reported, the batch goes on
            self.loop.call_exception_handler(
                {"message": "exception in a queued request's callback", "exception": exc}
            )

    def set_exception(self, error: BaseException) -> None:
        """End it with ``error`` (no-op once ended)."""
        if self.state == WAITING:
            self.state, self.error = DONE, error
            self._ended()

    def _ended(self) -> None:
        future = self._future
        if future is not None and not future.done():
            _mirror(self, future)
        callback, self.on_done = self.on_done, None
        if callback is not None:
            try:
                callback(self)
            except Exception as exc:  # the caller's bug: reported, the batch goes on
                self.loop.call_exception_handler(
                    {"message": "exception in a queued request's callback", "exception": exc}
                )

    @property
    def future(self) -> asyncio.Future[Tensors]:
        """Its end as an asyncio future (made on first use); cancelling it cancels it."""
        future = self._future
        if future is None:
            future = self._future = _QueuedFuture(self)
            if self.state != WAITING:
                _mirror(self, future)
        return future


class _QueuedFuture(asyncio.Future[Tensors]):
    """``Queued.future``: a cancel withdraws the request at once, as the batcher reads it."""

    def __init__(self, item: Queued) -> None:
        super().__init__(loop=item.loop)
        self._item = item

    def cancel(self, msg: Any = None) -> bool:
        return self._item.cancel() or super().cancel(msg)


def _mirror(item: Queued, future: asyncio.Future[Tensors]) -> None:
    """Give ``future`` the end ``item`` had."""
    if item.state == CANCELLED:
        asyncio.Future.cancel(future)
    elif item.error is not None:
        future.set_exception(item.error)
    else:
        assert item.result is not None
        future.set_result(item.result)


def signature(inputs: Tensors) -> tuple[Any, ...]:
    """Requests merge only when every input agrees on name, dtype and non-batch shape."""
    layout: list[tuple[str, str, tuple[int, ...]]] = []
    for name, a in inputs.items():  # a plain loop: a generator would be a call per input
        layout.append((name, a.dtype.str, a.shape[1:]))
    return tuple(layout)


def _fail(batch: list[Queued], error: Exception) -> None:
    """Answer every request of a failed batch that is still waiting with ``error``."""
    for item in batch:
        item.set_exception(error)


def _answer(batch: list[Queued], outputs: Tensors) -> None:
    """Give each request of a batch that ran its own rows of ``outputs``."""
    if len(batch) == 1:
        batch[0].set_result(outputs)
        return
    start = 0
    for item in batch:
        end = start + item.rows
        if item.state == WAITING:
            item.set_result({n: a[start:end] for n, a in outputs.items()})
        start = end


@dataclass(slots=True)
class _Started:
    """A batch handed to the backend: since when it runs (while it still ``waits`` for an
    instance there: since it was handed over), and its rows."""

    at_s: float
    rows: int
    waits: bool


def _at(started: _Started) -> float:
    return started.at_s


class Batcher:
    """Queue + scheduler for one model version."""

    def __init__(
        self,
        execute: Execute,
        outputs: Sequence[str],
        policy: BatchPolicy,
        stats: ModelStats,
        clock: Clock = time.monotonic,
        capacity: Callable[[], int] | None = None,
        execute_now: ExecuteNow | None = None,
    ) -> None:
        """``capacity``, when given, is asked for the instance count each time a batch is about
        to form (a routed backend's grows and shrinks with its hosts); else the policy's.
        ``execute_now``, when given, runs a lone batch inline (``BatchPolicy.inline_max_s``)."""
        self._execute = execute
        self._execute_now = execute_now if policy.inline_max_s > 0 else None
        self._outputs = list(outputs)
        self._policy = policy
        self._stats = stats
        self._clock = clock
        self._level_policies = policy.level_policies()
        self._default_level = policy.level_of(0)
        self._queue = PriorityQueue(self._level_policies, clock)
        self._arrived = asyncio.Event()
        self._capacity = capacity or (lambda: policy.instance_count)
        self._busy = 0  # batches formed and not finished
        self._freed = asyncio.Event()
        self._started: dict[int, _Started] = {}  # id(batch) -> its run, handed to the backend
        self._compute_s: float | None = None  # moving average of one execution
        # ... and of one of so many rows: a batch of 8 of a heavy model runs about 8 times as
        # long as a batch of 1, so one average for all sizes misjudges when a batch ends
        self._compute_by_rows: dict[int, float] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        # What wakes the scheduler while it waits: ``_wake_rows`` rows arriving (1 while it
        # waits for a first request), or one that cannot join the batch being formed. Waking it
        # for every arrival costs a task step and a timer per request.
        self._wake_rows = 1
        self._arrived_rows = 0
        self._forming: tuple[Any, ...] | None = None
        self._armed = False  # ``_arrived`` is clear and the scheduler waits on it
        # Requests queued, forming or running; while there are any, the batcher is busy.
        self._outstanding = 0
        self._arrivals = Arrivals()  # what the adaptive delay and the inline rule read
        # Requests per priority level taken into the batch being formed, not sent yet: they
        # still count against their level's bound, as in Triton's queue.
        self._held: dict[int, int] = {}
        # Kept: on Python 3.11 every get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()
        # In a context of its own, not the one of the request that loaded the model: its batch
        # tasks answer callers' callbacks (``Queued.on_done``), which log in the context they
        # run in.
        self._scheduler = self._loop.create_task(self._schedule(), context=contextvars.Context())

    @property
    def policy(self) -> BatchPolicy:
        return self._policy

    @property
    def pending(self) -> int:
        """Requests queued, in the batch being formed or executing: Triton's pending request
        count (it counts requests, not batches)."""
        return self._outstanding

    async def submit(
        self, inputs: Tensors, rows: int = 1, deadline_s: float | None = None
    ) -> Tensors:
        """Queue one request of ``rows`` batch rows and wait for its own rows of the outputs."""
        item = self.enqueue(inputs, rows, deadline_s, context.request_id.get())
        future = item.future
        try:
            if item.deadline_s is None:
                result = await future
            else:
                async with asyncio.timeout(max(0.0, item.deadline_s - item.enqueued_s)):
                    result = await future
        except TimeoutError:
            raise DeadlineExceeded("Request timeout expired") from None
        finally:
            future.cancel()  # no-op when done; marks it dropped when we stop waiting
        return result

    def enqueue(
        self,
        inputs: Tensors,
        rows: int = 1,
        deadline_s: float | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> Queued:
        """``submit`` without the wait, for callers that take the end in ``Queued.on_done`` (or
        from ``Queued.future``; cancel either to withdraw). A deadline only fails the request
        if it passes while queued: waiting for the batch to finish is the caller's to bound.

        ``priority`` picks the level (see ``BatchPolicy``); the level's queue policy bounds it
        (``QueueFull``) and times it out in the queue: its timeout (the request's own when
        shorter and the policy allows that) becomes the deadline, the earlier one winning, or
        with ``delay_on_timeout`` the instant it moves behind its level's other requests."""
        if self._closed:
            raise ModelNotReady("model is unloading")
        now = self._clock()
        # (No calls for the usual request: priority 0 and the level's policy from a dict.)
        level = self._policy.level_of(priority) if priority else self._default_level
        queue_policy = self._level_policies[level]
        timeout_s = queue_policy.default_timeout_s
        if (
            timeout_s
            and queue_policy.allow_timeout_override
            and deadline_s is not None
            and deadline_s - now < timeout_s
        ):
            timeout_s = deadline_s - now
        delay_at_s = None
        if timeout_s:
            if queue_policy.delay_on_timeout:
                delay_at_s = now + timeout_s
            elif deadline_s is None or now + timeout_s < deadline_s:
                deadline_s = now + timeout_s
        item = Queued(
            inputs, rows, signature(inputs), self._loop, now, deadline_s, request_id,
            level=level, delay_at_s=delay_at_s,
        )  # fmt: skip
        # The batch being formed still counts: its requests wait as those queued do, and
        # Triton's queue holds them until the batch is sent (``max_queue_size`` admits that
        # many waiting requests, not one more).
        self._queue.append(item, self._held.get(level, 0))
        self._outstanding += 1
        _LOOP_OUTSTANDING[self._loop] = _LOOP_OUTSTANDING.get(self._loop, 0) + 1
        self._arrivals.arrived(now, rows)
        self._arrived_rows += rows
        # Set the event only while the scheduler's wake-up is armed: once set, it stays set
        # until the next ``_wait_for``, and setting it again would be a call for nothing.
        if self._armed and (
            self._arrived_rows >= self._wake_rows
            or (self._forming is not None and item.signature != self._forming)
        ):
            self._armed = False
            self._arrived.set()
        return item

    def _take_live(self) -> Queued | None:
        """Pop the head of the queue, failing expired entries and skipping abandoned ones."""
        now = self._clock()
        while self._queue.head() is not None:
            item = self._queue.popleft()
            if item.state != WAITING or (item.deadline_s is not None and self._expire(item, now)):
                self._left(1)
                continue
            return item
        return None

    def _expire(self, item: Queued, now: float | None = None) -> bool:
        """Fail ``item`` if its deadline has passed (it is queued: the queue's timeout or the
        request's own); True if it did."""
        if item.deadline_s is None:
            return False
        if now is None:
            now = self._clock()
        if now < item.deadline_s:
            return False
        item.set_exception(DeadlineExceeded("Request timeout expired"))
        return True

    async def _schedule(self) -> None:
        policy = self._policy
        while True:
            while self._busy >= max(1, self._capacity()) + policy.pipeline:
                self._freed.clear()
                await self._freed.wait()
            self._busy += 1
            first = self._take_live()
            while first is None:
                if self._closed:
                    self._release()
                    return
                self._wait_for(1, None)
                await self._arrived.wait()
                first = self._take_live()
            batch, rows = [first], first.rows
            self._held = {first.level: 1}
            if policy.max_batch_size > 1:
                give_up_s = first.enqueued_s + policy.max_queue_delay_s
                waited = False  # a batch probes only before any wait (then the rate decides)
                while rows < policy.max_batch_size:
                    head = self._queue.head()
                    if head is not None and self._stop_at_preferred(rows, first.signature):
                        break
                    if head is not None:
                        if head.state != WAITING or (
                            head.deadline_s is not None and self._expire(head)
                        ):
                            self._queue.popleft()
                            self._left(1)
                            continue
                        if (
                            head.signature != first.signature
                            or rows + head.rows > policy.max_batch_size
                        ):
                            break
                        self._queue.popleft()
                        batch.append(head)
                        self._held[head.level] = self._held.get(head.level, 0) + 1
                        rows += head.rows
                        continue
                    if self._closed:
                        break
                    # While every instance is busy, a batch formed ahead keeps growing until
                    # one is about to free up: sending it earlier would only queue it there.
                    free_at = self._instance_free_at()
                    if free_at is None and rows in policy.preferred_batch_sizes:
                        break
                    wait_until = give_up_s if free_at is None else max(give_up_s, free_at)
                    if first.deadline_s is not None:
                        wait_until = min(wait_until, first.deadline_s)
                    now = self._clock()
                    wait_s = wait_until - now
                    if wait_s <= 0:
                        break
                    # An instance is free: waiting idles it, worth it only if company comes;
                    # decided again after two expected gaps without any (the rate then fell).
                    probing = False
                    senders = None  # how many more requests can come at most (None: unknown)
                    if free_at is None and policy.adaptive_delay:
                        outstanding = _LOOP_OUTSTANDING.get(self._loop, 0)
                        senders = clients.may_send(self._loop, outstanding)
                        if senders == 0:
                            break  # every client that could join is in already
                        rate = self._arrivals.rate(now)
                        if rate * wait_s >= 1.0:
                            wait_s = min(wait_s, max(2.0 / rate, MIN_RECHECK_S))
                        else:
                            probe_s = None if waited else self._arrivals.probe(wait_s)
                            if probe_s is None:
                                break
                            wait_s, probing = probe_s, True
                    # Worth waking for: a full batch, or (with an instance free) the next
                    # preferred size.
                    target = policy.max_batch_size
                    if free_at is None:
                        target = min(
                            (n for n in policy.preferred_batch_sizes if n > rows), default=target
                        )
                    if senders is not None:  # and once they are all in, it goes
                        target = min(target, rows + senders)
                    self._wait_for(target - rows, first.signature)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait_s):
                            await self._arrived.wait()
                    self._forming = None
                    waited = True
                    if probing:
                        self._arrivals.probed(self._queue.head() is not None)
            self._held = {}
            task = self._loop.create_task(self._run(batch, rows))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            # Hold no request past its batch while waiting for the next one: its inputs may be
            # views of a client's shared memory, unmapped only once the last view goes.
            batch = first = head = None  # type: ignore[assignment]

    def _inline(self, taken: int) -> bool:
        """Whether the batch about to run (``taken`` requests) runs on the event loop's thread:
        it is all that is outstanding (queued, forming or running), in this batcher and in the
        process, this model's recent executions were short, and the arrival rate expects fewer
        than ``INLINE_MAX_ARRIVALS`` rows during one. The hand-off to a worker thread and back
        costs two thread wake-ups (the way back alone a median 2 ms on a loaded 2-core
        machine, ``bench/lone_request.py``); blocking the loop costs nothing when nobody else
        is waiting. Arrivals that the blocked loop reads only
        after the run still count as arriving while busy (``_run`` ends the busy period one
        loop turn later), so traffic that would have overlapped turns this off."""
        compute_s = self._compute_s
        if (
            self._execute_now is None
            or compute_s is None
            or compute_s > self._policy.inline_max_s
            or self._outstanding != taken
            or _LOOP_OUTSTANDING.get(self._loop, 0) != taken
        ):
            return False
        return self.arrival_rate() * compute_s < INLINE_MAX_ARRIVALS

    async def _run(self, batch: list[Queued], rows: int) -> None:
        """Run one batch (inline when ``_inline`` says so and the backend can start it at
        once) and answer its requests."""
        released, span = False, None
        answer: tuple[list[Queued], Tensors] | None = None
        taken = len(batch)
        inline = False
        try:
            # Callers may have gone away while the batch was forming.
            for p in batch:  # (plain loops here: a generator is a call per request)
                if p.state != WAITING:
                    batch = [p for p in batch if p.state == WAITING]
                    rows = sum(p.rows for p in batch)
                    if not batch:
                        return
                    break
            started = self._clock()
            waits = len(self._started) >= max(1, self._capacity())
            self._started[id(batch)] = _Started(started, rows, waits)
            queued_ns = 0
            request_ids: list[str] = []
            deadline_s = None
            for item in batch:
                item.queue_ns = int((started - item.enqueued_s) * 1e9)
                queued_ns += item.queue_ns
                if item.request_id:
                    request_ids.append(item.request_id)
                if item.deadline_s is not None and (
                    deadline_s is None or item.deadline_s < deadline_s
                ):
                    deadline_s = item.deadline_s
            self._stats.record_queue(queued_ns, len(batch))  # once a batch: the same totals
            context.batch_request_ids.set(tuple(request_ids))
            span = tracing.batch_begins(batch, rows) if tracing.enabled else None
            if len(batch) == 1:
                inputs = batch[0].inputs
            else:
                names = batch[0].inputs.keys()
                inputs = {n: np.concatenate([p.inputs[n] for p in batch]) for n in names}
            try:
                ran = None
                if self._execute_now is not None and self._inline(taken):
                    ran = self._execute_now(inputs, self._outputs)
                    inline = ran is not None
                if ran is None:
                    ran = await self._execute(inputs, self._outputs, deadline_s)
            except GatewayError as exc:
                _fail(batch, exc)
                return
            except Exception as exc:
                _fail(batch, GatewayError(f"execution failed: {type(exc).__name__}: {exc}"))
                return
            except BaseException:  # cancelled (inside the backend or this task): answer, go on
                _fail(batch, GatewayError("execution was cancelled"))
                raise
            # Free the slot before handing results back: the scheduler's wake-up then runs
            # ahead of the callers' tasks, so the next batch reaches the backend before the
            # event loop spends a millisecond encoding this batch's responses.
            self._release(batch)
            released = True
            compute_ns = int((self._clock() - started) * 1e9)
            outputs, ran_s = ran.outputs, ran.compute_s
            one_s = ran_s if ran_s is not None else compute_ns / 1e9
            average = self._compute_s
            self._compute_s = one_s if average is None else 0.8 * average + 0.2 * one_s
            average = self._compute_by_rows.get(rows)
            self._compute_by_rows[rows] = one_s if average is None else 0.8 * average + 0.2 * one_s
            if ran_s is not None and ran_s * 1e9 < compute_ns:  # the rest: waiting for an instance
                waited_ns = compute_ns - int(ran_s * 1e9)
                compute_ns -= waited_ns
                for item in batch:
                    item.queue_ns += waited_ns
                self._stats.record_queue(waited_ns * len(batch), count=0)
            self._stats.record_execution(
                rows, len(batch), compute_ns, int(ran.input_s * 1e9), int(ran.output_s * 1e9)
            )
            host = ran.host
            for item in batch:
                item.execution = context.Execution(rows, item.queue_ns, compute_ns, host)
            answer = batch, outputs
        finally:
            if not released:
                self._release(batch)
            if inline:  # what the blocked loop reads next arrived while this batch ran
                self._loop.call_soon(self._left, taken)
            else:
                self._left(taken)
            if span is not None:
                span.end()
        if answer is not None:
            # Requests queued behind: the scheduler's wake-up (queued by ``_release``) runs
            # first, so the next batch reaches the backend before the callers' answers are
            # encoded. Nothing queued: answer now, with no loop turn between.
            if self._queue:
                self._loop.call_soon(_answer, *answer)
            else:
                _answer(*answer)

    def _stop_at_preferred(self, rows: int, signature: tuple[Any, ...]) -> bool:
        """At a preferred size, stop unless the queue holds enough to reach the next larger one,
        as Triton forms the largest preferred batch it can. Without this a burst of arrivals
        (the event loop reads sockets in rounds) is swallowed whole: with closed-loop clients
        the batches then settle into a lopsided pair (say 61 and 3) with the backend idle while
        the big one's responses go out, instead of two even halves that overlap."""
        preferred = self._policy.preferred_batch_sizes
        if rows not in preferred:
            return False
        target = min((n for n in preferred if n > rows), default=None)
        if target is None:  # past the largest preferred size: fill up to the maximum
            return False
        need = target - rows
        for item in self._queue:
            if item.state != WAITING:
                continue
            if item.signature != signature:
                break
            need -= item.rows
            if need <= 0:
                return False
        return True

    def _left(self, count: int) -> None:
        """``count`` requests are no longer outstanding; the last one ends a busy period."""
        self._outstanding -= count
        left = _LOOP_OUTSTANDING.get(self._loop, 0) - count
        if left > 0:
            _LOOP_OUTSTANDING[self._loop] = left
        else:
            _LOOP_OUTSTANDING.pop(self._loop, None)
        if self._outstanding == 0:
            self._arrivals.idle(self._clock())

    def arrival_rate(self) -> float:
        """Rows per second arriving while the batcher is busy, recently (``Arrivals.rate``)."""
        return self._arrivals.rate(self._clock())

    def _wait_for(self, rows: int, forming: tuple[Any, ...] | None) -> None:
        """Arm the scheduler's wake-up (see ``__init__``) before it waits on ``_arrived``."""
        self._arrived.clear()
        self._armed = True
        self._arrived_rows = 0
        self._wake_rows = rows
        self._forming = forming

    def _release(self, batch: list[Queued] | None = None) -> None:
        """Give back a batch slot (and forget when ``batch`` started)."""
        ended = None if batch is None else self._started.pop(id(batch), None)
        if ended is not None and not ended.waits:
            for entry in self._started.values():  # (in the order they went to the backend)
                if entry.waits:  # the batch that waited for this one's instance runs from now
                    entry.at_s, entry.waits = self._clock(), False
                    break
        self._busy -= 1
        self._freed.set()
        self._arrived.set()  # a batch formed ahead stops waiting for more

    def _instance_free_at(self) -> float | None:
        """When the batch being formed could start, if every instance is busy until then
        (estimated from the oldest running batch and the average execution of its size), less a
        margin for the hand-over; None when an instance is free now or nothing is known yet."""
        capacity = max(1, self._capacity())
        ahead = self._busy - 1  # this batch is counted already
        if ahead < capacity or self._compute_s is None or not self._started:
            return None
        rounds = -(-ahead // capacity)
        # the oldest batch that runs (one that still waits behind it went to the backend early)
        oldest = min((e for e in self._started.values() if not e.waits), key=_at, default=None)
        if oldest is None:
            return None
        compute_s = self._compute_by_rows.get(oldest.rows, self._compute_s)
        return oldest.at_s + compute_s * (rounds - 0.25)

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Stop taking requests, let queued and running ones finish, then stop the scheduler."""
        self._closed = True
        self._arrived.set()
        try:
            async with asyncio.timeout(drain_timeout_s):
                await asyncio.shield(self._scheduler)
                while self._running:
                    await asyncio.gather(*list(self._running), return_exceptions=True)
        except TimeoutError:
            self._scheduler.cancel()
            for item in self._queue:
                item.set_exception(ModelNotReady("model unloaded"))
            dropped = len(self._queue)
            self._queue.clear()
            if dropped:
                self._left(dropped)
