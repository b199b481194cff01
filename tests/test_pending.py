"""``DataPlane.submit``, the one way into inference, in-process: a fake backend and a fake
repository (no ONNX Runtime, no sockets), so every rule it owns is seen on its own: resolving,
load on first use, the deadline fixed once at arrival, admission to the queue, draining,
cancellation, forwarding, and no task for a request to a loaded model."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.backends.base import Backend, BackendFactory, Executed, Tensors
from gateway.dataplane import DataPlane
from gateway.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    QueueFull,
    Unavailable,
)
from gateway.pending import Pending
from gateway.protocol.types import InferRequest
from gateway.repository.config import DynamicBatching, ModelConfig, TensorConfig
from gateway.repository.local import LocalRepository, ModelSource
from gateway.settings import Settings


def config_of(name: str) -> ModelConfig:
    return ModelConfig(
        name=name,
        max_batch_size=8,
        inputs=(TensorConfig("X", "FP32", (4,)),),
        outputs=(TensorConfig("Y", "FP32", (4,)),),
        dynamic_batching=DynamicBatching(),
    )


class FakeBackend(Backend):
    """``Backend``: Y = X + 1; ``gate`` (when set) holds every execution until opened."""

    def __init__(self, config: ModelConfig, gate: asyncio.Event | None) -> None:
        self._config = config
        self.gate = gate
        self.batches: list[int] = []  # rows of each batch executed
        self.host = ""  # where it says each batch ran
        self.servable = True  # what ``ready`` answers

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def instance_count(self) -> int:
        return 1

    async def execute(
        self, inputs: Tensors, outputs: Sequence[str], deadline_s: float | None = None
    ) -> Executed:
        self.batches.append(int(inputs["X"].shape[0]))
        if self.gate is not None:
            await self.gate.wait()
        return Executed({"Y": inputs["X"] + 1}, self.host, 0.001)

    def ready(self) -> bool:
        return self.servable

    async def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"kind": "fake"}


class FakeFactory(BackendFactory):
    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.loaded: dict[str, FakeBackend] = {}
        self.loads = 0

    async def load(self, source: ModelSource, version: int) -> FakeBackend:
        self.loads += 1
        backend = FakeBackend(source.config, self.gate)
        self.loaded[source.name] = backend
        return backend


class FakeRepository(LocalRepository):
    """``ready`` is loaded at start; ``cold`` loads on first use (an edge's pull), its fetch
    held until ``fetched`` is set."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fetched = asyncio.Event()

    def model_names(self) -> list[str]:
        return ["cold", "ready"]

    async def startup_names(self) -> list[str]:
        return ["ready"]

    def on_demand(self, name: str) -> bool:
        return name == "cold"

    async def fetch(self, name: str) -> None:
        if name == "cold":
            await self.fetched.wait()

    def source(self, name: str, config: ModelConfig | None = None) -> ModelSource:
        return ModelSource(name, self.root, config or config_of(name), {1: self.root / "x"})


class ManualClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


class FakeForwarder:
    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.calls: list[tuple[str, float | None]] = []

    async def infer(
        self,
        model: str,
        version: str | None,
        inputs: Tensors,
        outputs: Sequence[str],
        timeout_s: float | None,
    ) -> tuple[str, int, Tensors] | None:
        self.calls.append((model, timeout_s))
        if not self.answer:
            return None
        return "elsewhere", 3, {"Y": inputs["X"] * 10}


def request(rows: int = 1, timeout_us: int = 0, value: float = 1.0) -> InferRequest:
    params: dict[str, Any] = {"timeout": timeout_us} if timeout_us else {}
    return InferRequest({"X": np.full((rows, 4), value, np.float32)}, parameters=params)


async def plane(
    tmp_path: Path,
    gate: asyncio.Event | None = None,
    clock: ManualClock | None = None,
    forwarder: FakeForwarder | None = None,
    **settings: Any,
) -> tuple[DataPlane, FakeFactory, FakeRepository]:
    factory = FakeFactory(gate)
    repository = FakeRepository(tmp_path)
    dataplane = DataPlane(
        Settings(batch_pipeline=0, **settings),
        repository,
        factory,
        **({"clock": clock} if clock else {}),
        forwarder=forwarder,
    )
    await dataplane.start()
    return dataplane, factory, repository


def tasks_now() -> int:
    return len(asyncio.all_tasks())


async def test_a_loaded_model_answers_without_a_task(tmp_path: Path) -> None:
    dataplane, _, _ = await plane(tmp_path)
    try:
        before = tasks_now()
        pending = dataplane.submit("ready", None, request(2, timeout_us=10_000_000))
        assert tasks_now() == before  # queued, its deadline on a timer: no task of its own
        assert not pending.done()
        ended: list[Pending] = []
        pending.add_done_callback(ended.append)
        response = await pending
        assert ended == [pending]
        assert response.model_name == "ready" and response.model_version == "1"
        assert response.outputs["Y"].tolist() == [[2.0] * 4] * 2
        assert pending.execution is not None and pending.execution.batch_size == 2
        stats = dataplane.model_stats("ready")["model_stats"][0]["inference_stats"]
        assert stats["success"]["count"] == 1
    finally:
        await dataplane.stop()


async def test_an_unknown_model_is_refused_before_decoding(tmp_path: Path) -> None:
    dataplane, _, _ = await plane(tmp_path)
    decoded: list[int] = []

    def decode() -> InferRequest:
        decoded.append(1)
        return request()

    try:
        for name, version in (("nope", None), ("ready", "7")):
            pending = dataplane.submit(name, version, decode)
            assert pending.done() and isinstance(pending.error, ModelNotFound)
            with pytest.raises(ModelNotFound):
                await pending
        assert decoded == []
    finally:
        await dataplane.stop()


async def test_bad_input_is_refused_at_once_and_counted(tmp_path: Path) -> None:
    dataplane, factory, _ = await plane(tmp_path)
    try:
        bad = InferRequest({"X": np.zeros((1, 5), np.float32)})
        pending = dataplane.submit("ready", None, bad)
        assert pending.done() and isinstance(pending.error, InvalidInput)
        assert "unexpected shape for input 'X'" in str(pending.error)

        def broken() -> InferRequest:
            raise InvalidInput("request body is not valid JSON")

        assert isinstance(dataplane.submit("ready", None, broken).error, InvalidInput)
        stats = dataplane.model_stats("ready")["model_stats"][0]["inference_stats"]
        assert stats["fail"]["count"] == 1  # the model saw one; the other never reached it
        assert factory.loaded["ready"].batches == []
    finally:
        await dataplane.stop()


async def test_queue_full_and_draining_are_refused_at_once(tmp_path: Path) -> None:
    gate = asyncio.Event()
    dataplane, _, _ = await plane(tmp_path, gate, max_queue_size=1)
    try:
        running = dataplane.submit("ready", None, request())
        await asyncio.sleep(0.01)  # the first batch runs (held), the queue is empty
        queued = dataplane.submit("ready", None, request())
        refused = dataplane.submit("ready", None, request())
        assert refused.done() and isinstance(refused.error, QueueFull)
        dataplane.draining = True
        drained = dataplane.submit("ready", None, request())
        assert isinstance(drained.error, Unavailable) and "shutting down" in str(drained.error)
        dataplane.draining = False
        gate.set()
        assert (await running).outputs["Y"].shape == (1, 4)
        assert (await queued).outputs["Y"].shape == (1, 4)
    finally:
        gate.set()
        await dataplane.stop()


async def test_a_deadline_ends_a_request_held_in_its_batch(tmp_path: Path) -> None:
    gate = asyncio.Event()
    dataplane, _, _ = await plane(tmp_path, gate)
    try:
        pending = dataplane.submit("ready", None, request(timeout_us=20_000))
        with pytest.raises(DeadlineExceeded, match="Request timeout expired"):
            await asyncio.wait_for(pending, 5)
        stats = dataplane.model_stats("ready")["model_stats"][0]["inference_stats"]
        assert stats["fail"]["count"] == 1
    finally:
        gate.set()
        await dataplane.stop()


async def test_a_cancelled_request_gives_up_its_place(tmp_path: Path) -> None:
    gate = asyncio.Event()
    dataplane, factory, _ = await plane(tmp_path, gate)
    try:
        first = dataplane.submit("ready", None, request())
        await asyncio.sleep(0.01)
        second = dataplane.submit("ready", None, request(rows=3))
        ended: list[Pending] = []
        second.add_done_callback(ended.append)
        second.cancel()
        assert ended == [second] and second.cancelled()
        waiter = asyncio.ensure_future(dataplane.infer("ready", None, request(rows=2)))
        await asyncio.sleep(0.01)
        waiter.cancel()  # a caller's task cancelled: its request goes too
        with pytest.raises(asyncio.CancelledError):
            await waiter
        gate.set()
        await first
        await asyncio.sleep(0.01)
        assert factory.loaded["ready"].batches == [1]  # neither of the others ran
    finally:
        gate.set()
        await dataplane.stop()


async def test_cold_requests_share_one_load_in_a_task(tmp_path: Path) -> None:
    dataplane, factory, repository = await plane(tmp_path)
    try:
        before = tasks_now()
        first = dataplane.submit("cold", None, request())
        assert tasks_now() > before  # waits for the load: the data plane's task, not the caller's
        others = [dataplane.submit("cold", None, request(value=v)) for v in (2.0, 3.0)]
        await asyncio.sleep(0.01)
        assert not first.done()
        repository.fetched.set()
        answers = [await p for p in (first, *others)]
        assert [a.outputs["Y"][0, 0] for a in answers] == [2.0, 3.0, 4.0]
        assert factory.loads == 2  # ``ready`` at start, ``cold`` once
    finally:
        repository.fetched.set()
        await dataplane.stop()


async def test_the_deadline_is_fixed_at_arrival(tmp_path: Path) -> None:
    """A request whose deadline passes while its model loads is not run with a fresh one."""
    clock = ManualClock()
    dataplane, factory, repository = await plane(tmp_path, clock=clock)
    try:
        pending = dataplane.submit("cold", None, request(timeout_us=1_000_000))
        await asyncio.sleep(0.01)
        clock.now_s = 1.5  # the load took longer than the request's timeout
        repository.fetched.set()
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(pending, 5)
        assert factory.loaded["cold"].batches == []
    finally:
        repository.fetched.set()
        await dataplane.stop()


async def test_a_cold_request_waits_for_its_load_within_its_deadline(tmp_path: Path) -> None:
    dataplane, _, repository = await plane(tmp_path)
    try:
        pending = dataplane.submit("cold", None, request(timeout_us=20_000))
        with pytest.raises(DeadlineExceeded, match="still being fetched"):
            await asyncio.wait_for(pending, 5)
    finally:
        repository.fetched.set()
        await dataplane.stop()


async def test_forwarded_while_fetching_with_what_is_left_of_the_deadline(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    forwarder = FakeForwarder(answer=True)
    dataplane, _, repository = await plane(tmp_path, clock=clock, forwarder=forwarder)
    try:
        pending = dataplane.submit("cold", None, request(timeout_us=2_000_000))
        clock.now_s = 0.5
        response = await asyncio.wait_for(pending, 5)
        assert response.model_version == "3" and response.outputs["Y"][0, 0] == 10.0
        assert pending.execution is not None and pending.execution.host == "elsewhere"
        assert forwarder.calls == [("cold", 1.5)]
        forwarder.answer = False  # no target answers: served here once loaded
        later = dataplane.submit("cold", None, request())
        repository.fetched.set()
        assert (await asyncio.wait_for(later, 5)).model_version == "1"
    finally:
        repository.fetched.set()
        await dataplane.stop()


async def test_how_a_batch_ran_reaches_its_requests_by_value(tmp_path: Path) -> None:
    """The backend's ``Executed`` record (no contextvars): its host is each request's host in
    the access log, its compute time counted as compute."""
    dataplane, factory, _ = await plane(tmp_path)
    try:
        factory.loaded["ready"].host = "h9"
        pending = dataplane.submit("ready", None, request(3))
        await asyncio.wait_for(pending, 5)
        assert pending.execution is not None
        assert (pending.execution.host, pending.execution.batch_size) == ("h9", 3)
        assert pending.execution.compute_ns <= 1_000_000
    finally:
        await dataplane.stop()


async def test_model_ready_and_in_use_ask_the_backend_and_the_entries(tmp_path: Path) -> None:
    dataplane, factory, _ = await plane(tmp_path)
    try:
        assert dataplane.model_ready("ready") and not dataplane.model_ready("cold")
        assert dataplane.in_use("ready") and not dataplane.in_use("cold")
        factory.loaded["ready"].servable = False  # a routed backend with no host serving it
        assert not dataplane.model_ready("ready") and dataplane.in_use("ready")
    finally:
        await dataplane.stop()


async def test_metric_sources_are_given_when_the_data_plane_is_built(tmp_path: Path) -> None:
    """The factory's own families (``BackendFactory.metric_families``) and the sources passed
    to the constructor are on every scrape; a factory without families of its own adds none."""
    from prometheus_client.core import GaugeMetricFamily

    def family(name: str) -> list[Any]:
        return [GaugeMetricFamily(name, name, value=1.0)]

    class Reporting(FakeFactory):
        def metric_families(self) -> list[Any]:
            return family("from_factory")

    plain = DataPlane(Settings(), FakeRepository(tmp_path), FakeFactory())
    assert b"from_" not in plain.metrics.render()
    dataplane = DataPlane(
        Settings(),
        FakeRepository(tmp_path),
        Reporting(),
        metric_sources=[lambda: family("from_edge"), lambda: family("from_forwarder")],
    )
    text = dataplane.metrics.render().decode()
    assert [n for n in ("from_factory", "from_edge", "from_forwarder") if n + " 1.0" in text] == [
        "from_factory",
        "from_edge",
        "from_forwarder",
    ]


async def test_refusals_leave_no_reference_cycle(tmp_path: Path) -> None:
    """A refused request is freed by reference counting: its error's traceback held the frame
    that refused it, and so the Pending, a cycle left to the collector (whose passes stall the
    loop) for every 4xx, whichever front end."""
    dataplane, _, _ = await plane(tmp_path)

    def broken() -> InferRequest:
        raise InvalidInput("request body is not valid JSON")

    gc.collect()
    gc.disable()
    try:
        for name, body in (
            ("nope", request()),  # unknown model
            ("ready", InferRequest({"X": np.zeros((1, 5), np.float32)})),  # bad shape
            ("ready", broken),  # body that does not decode
        ):
            # Front ends take the outcome by callback (awaiting would add the awaiting frame)
            refused = dataplane.submit(name, None, body)
            assert isinstance(refused.error, ModelNotFound | InvalidInput)
            del refused
        left = [o for o in gc.get_objects() if isinstance(o, Pending)]
    finally:
        gc.enable()
        await dataplane.stop()
    assert left == []
