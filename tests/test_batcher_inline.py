"""A lone batch run on the event loop's thread (``BatchPolicy.inline_max_s``,
``Backend.execute_now``): when it does, when it must not, and that it answers as the worker
thread would."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from gateway.backends.onnxruntime import OnnxRuntimeFactory
from gateway.batching import Batcher, BatchPolicy, Executed
from gateway.dataplane import DataPlane
from gateway.errors import InvalidInput
from gateway.protocol.types import InferRequest
from gateway.repository.local import LocalRepository
from gateway.settings import Settings, SettingsError
from gateway.stats import ModelStats
from tests import models

pytestmark = pytest.mark.timeout(10)

DENSE_CONFIG = """
name: "dense"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 8 ] } ]
dynamic_batching { }
"""

Tensors = dict[str, np.ndarray]


class Clock:
    def __init__(self, now_s: float = 100.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


class Backend:
    """Doubles its input, through ``execute`` (awaited) or ``execute_now`` (inline), recording
    which ran each batch; each run moves the test's clock by ``run_s``."""

    def __init__(self, clock: Clock, run_s: float = 0.002) -> None:
        self.clock = clock
        self.run_s = run_s
        self.ran: list[str] = []
        self.busy = False  # execute_now: no instance free
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None

    def _run(self, inputs: Tensors) -> Executed:
        self.clock.now_s += self.run_s
        if self.error is not None:
            raise self.error
        return Executed({"Y": inputs["X"] * 2}, "", self.run_s)

    async def execute(
        self, inputs: Tensors, outputs: Sequence[str], deadline_s: float | None = None
    ) -> Executed:
        self.ran.append("worker")
        if self.gate is not None:
            await self.gate.wait()
        return self._run(inputs)

    def execute_now(self, inputs: Tensors, outputs: Sequence[str]) -> Executed | None:
        if self.busy:
            return None
        self.ran.append("inline")
        return self._run(inputs)


def make(
    backend: Backend, inline_max_s: float = 0.01, **policy: object
) -> tuple[Batcher, ModelStats]:
    stats = ModelStats("m", "1")
    batcher = Batcher(
        backend.execute,
        ["Y"],
        BatchPolicy(max_batch_size=8, max_queue_delay_s=0.001, inline_max_s=inline_max_s, **policy),  # type: ignore[arg-type]
        stats,
        clock=backend.clock,
        execute_now=backend.execute_now,
    )
    return batcher, stats


def row(value: float) -> Tensors:
    return {"X": np.full((1, 4), value, dtype=np.float32)}


async def one(batcher: Batcher, value: float) -> Tensors:
    return await asyncio.wait_for(batcher.enqueue(row(value)).future, 1.0)


async def closed_loop(batcher: Batcher, clock: Clock, count: int) -> None:
    """A lone client: its next request once the last is answered (and the loop turned)."""
    for i in range(count):
        result = await one(batcher, i)
        assert result["Y"][0, 0] == 2 * i
        await asyncio.sleep(0)
        clock.now_s += 0.001


async def test_a_lone_client_runs_inline_once_the_models_compute_time_is_known() -> None:
    """The first batch goes to a worker thread (nothing known of the model yet); a lone
    closed-loop client's next ones run inline and are answered the same, stats counted once."""
    clock = Clock()
    backend = Backend(clock)
    batcher, stats = make(backend)
    await closed_loop(batcher, clock, 4)
    assert backend.ran == ["worker", "inline", "inline", "inline"]
    assert stats.queue.count == 4 and stats.compute_infer.count == 4
    await batcher.close()


async def test_off_without_inline_max_and_for_slow_models() -> None:
    """``inline_max_s`` 0 (the policy's default) never runs inline, even for a model that takes
    no time; a model whose runs take longer than ``inline_max_s`` neither: it would block the
    event loop that long."""
    for inline_max_s, run_s in ((0.0, 0.002), (0.0, 0.0), (0.01, 0.02)):
        clock = Clock()
        backend = Backend(clock, run_s)
        batcher, _ = make(backend, inline_max_s)
        await closed_loop(batcher, clock, 3)
        assert backend.ran == ["worker"] * 3, (inline_max_s, run_s)
        await batcher.close()


async def test_anything_else_outstanding_in_the_process_keeps_it_on_a_worker() -> None:
    """A batch runs inline only when it is all that is outstanding on the event loop: another
    model's request still running (gated) sends this one to a worker thread too."""
    clock = Clock()
    backend, other = Backend(clock), Backend(clock)
    batcher, _ = make(backend)
    busy, _ = make(other)
    await closed_loop(batcher, clock, 2)
    other.gate = asyncio.Event()
    held = busy.enqueue(row(9))
    await asyncio.sleep(0.01)
    assert other.ran == ["worker"]  # running, gated
    await one(batcher, 5)
    assert backend.ran == ["worker", "inline", "worker"]
    other.gate.set()
    await asyncio.wait_for(held.future, 1.0)
    await closed_loop(batcher, clock, 1)
    assert backend.ran[-1] == "inline"
    await batcher.close()
    await busy.close()


async def test_two_requests_at_once_are_not_lone() -> None:
    """Two requests that cannot merge: the first's batch is not all that is outstanding, and
    the second arrived while the batcher was busy (the rate says traffic overlaps)."""
    clock = Clock()
    backend = Backend(clock)
    batcher, _ = make(backend)
    await closed_loop(batcher, clock, 2)
    wide = {"X": np.ones((1, 5), dtype=np.float32)}
    items = [batcher.enqueue(row(1)), batcher.enqueue(wide)]
    await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 1.0)
    assert backend.ran == ["worker", "inline", "worker", "worker"]
    await batcher.close()


async def test_arrivals_read_just_after_an_inline_run_count_as_arriving_while_busy() -> None:
    """A blocked loop reads what arrived during the run only afterwards: the busy period ends
    a loop turn later, so such arrivals raise the rate and overlapping traffic goes back to
    worker threads (rate x compute >= 0.25 rows)."""
    clock = Clock()
    backend = Backend(clock)
    batcher, _ = make(backend)
    await closed_loop(batcher, clock, 2)
    assert batcher.arrival_rate() == 0.0
    first = batcher.enqueue(row(1))
    while not first.future.done():  # the run, inline, and its answer: no loop turn after it
        await asyncio.sleep(0)
    second = batcher.enqueue(row(2))  # read in the same turn as the first's answer
    assert batcher.arrival_rate() > 0.25 / backend.run_s
    await asyncio.wait_for(second.future, 1.0)
    assert backend.ran[-2:] == ["inline", "worker"]
    await batcher.close()


async def test_no_free_instance_falls_back_to_the_worker_thread() -> None:
    clock = Clock()
    backend = Backend(clock)
    batcher, stats = make(backend)
    await closed_loop(batcher, clock, 1)
    backend.busy = True
    await closed_loop(batcher, clock, 2)
    assert backend.ran == ["worker", "worker", "worker"]
    assert stats.queue.count == 3
    await batcher.close()


async def test_an_inline_failure_fails_its_caller_and_the_next_request_is_served() -> None:
    clock = Clock()
    backend = Backend(clock)
    batcher, _ = make(backend)
    await closed_loop(batcher, clock, 1)
    backend.error = InvalidInput("rejected")
    with pytest.raises(InvalidInput):
        await one(batcher, 1)
    backend.error = None
    assert (await one(batcher, 2))["Y"][0, 0] == 4
    assert backend.ran == ["worker", "inline", "inline"]
    await batcher.close()


def test_the_setting_is_checked() -> None:
    assert Settings().inline_max_ms == 5.0
    with pytest.raises(SettingsError, match="inline_max_ms"):
        Settings(inline_max_ms=-1)


async def test_onnx_runtime_runs_a_lone_request_on_the_loops_thread(tmp_path: Path) -> None:
    """Real sessions: with ``inline_max_ms`` set, a lone client's requests after the first
    run on the event loop's own thread and answer as the worker thread did; a busy session
    makes ``execute_now`` decline rather than wait."""
    models.dense(tmp_path, "dense", config=DENSE_CONFIG)
    settings = Settings(
        model_repo=str(tmp_path), warmup=False, inline_max_ms=1000.0, intra_op_threads=1
    )
    dataplane = DataPlane(settings, LocalRepository(tmp_path), OnnxRuntimeFactory(settings))
    await dataplane.start()
    try:
        backend = dataplane.models["dense"].versions[1].backend
        threads: list[int] = []
        original = backend._run

        def traced(*args: object) -> Executed:
            threads.append(threading.get_ident())
            return original(*args)  # type: ignore[no-any-return]

        backend._run = traced
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        answers = []
        for _ in range(3):
            response = await dataplane.infer("dense", None, InferRequest({"X": x}))
            answers.append(response.outputs["Y"])
        loop_thread = threading.get_ident()
        assert threads[0] != loop_thread and threads[1:] == [loop_thread, loop_thread]
        assert all(np.array_equal(a, answers[0]) for a in answers)
        session = backend._free.get()  # every instance busy: declined, not waited for
        try:
            assert backend.execute_now({"X": x}, ["Y"]) is None
        finally:
            backend._free.put(session)
        with pytest.raises(InvalidInput, match="rejected the input"):
            backend.execute_now({"X": x.astype(np.float64)}, ["Y"])
        assert backend.execute_now({"X": x}, ["Y"]) is not None  # the session came back
        backend.inline = False  # a backend made not to run inline declines
        assert backend.execute_now({"X": x}, ["Y"]) is None
    finally:
        await dataplane.stop()


async def test_a_model_whose_runs_take_exactly_inline_max_runs_inline() -> None:
    """``inline_max_s`` is the most a run may take (the second batch knows the first's time)."""
    clock = Clock()
    backend = Backend(clock, run_s=0.0078125)
    batcher, _ = make(backend, 0.0078125)
    await closed_loop(batcher, clock, 2)
    assert backend.ran == ["worker", "inline"]
    await batcher.close()


async def test_rare_arrivals_while_busy_still_run_inline() -> None:
    """About one row a second arrives while busy and a run takes 2 ms: a row during a run is
    a 0.2 % chance, far below a quarter, so the lone batch after runs inline."""
    clock = Clock()
    backend = Backend(clock)
    batcher, _ = make(backend)
    await closed_loop(batcher, clock, 1)
    first = batcher.enqueue(row(1))
    clock.now_s += 1.0
    second = batcher.enqueue(row(2))  # arrives while the first is outstanding, a second later
    await asyncio.wait_for(asyncio.gather(first.future, second.future), 1.0)
    await asyncio.sleep(0)
    assert 0 < batcher.arrival_rate() * backend.run_s < 0.25
    await closed_loop(batcher, clock, 1)
    assert backend.ran[-1] == "inline"
    await batcher.close()
