"""Ensembles: Triton's ``platform: "ensemble"`` with ``ensemble_scheduling`` steps.

An ensemble is not a model that runs; it is a DAG of other models. Each step is an ordinary
request to its model through the data plane's ``submit`` (so it is batched with that model's
other traffic and routed to whichever host serves it, the response cache and version splits
included), started as soon as every tensor it takes exists. Intermediate tensors stay in this
process as numpy arrays. An error names the step that failed.

Statistics are Triton's for an ensemble: one success or failure per request with its whole
duration, one execution of its rows, the wait before the first step as its queue time and the
steps' whole time as its compute time; the steps' own statistics count under their own models.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import copy
import functools
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.backends.base import Backend, Executed, Tensors
from gateway.context import Execution
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    InvalidInput,
    ModelNotFound,
    Unavailable,
)
from gateway.pending import Pending, failure_reason, response_of, validate
from gateway.protocol.types import InferRequest, RequestedOutput
from gateway.repository.config import EnsembleStep, ModelConfig
from gateway.shared_memory import write_outputs

if TYPE_CHECKING:
    from gateway.lifecycle import LoadedVersion

Submit = Callable[[str, str | None, InferRequest, str | None], Pending]

MAX_NESTING = 8  # ensembles of ensembles; deeper is taken for a cycle between them
# How many ensembles enclose the running one: each runs in a task, which copies its context.
_nesting: contextvars.ContextVar[int] = contextvars.ContextVar("ensemble_nesting", default=0)

__all__ = ["EnsembleBackend", "StepFailed", "run_ensemble"]


class StepFailed(GatewayError):
    """A step of an ensemble failed with something other than a gateway error (a bug)."""


class EnsembleBackend(Backend):
    """What the data plane holds for an ensemble version: its config, nothing to execute."""

    def __init__(self, config: ModelConfig) -> None:
        self._config = config

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def instance_count(self) -> int:
        return 1

    async def execute(
        self, inputs: Tensors, output_names: Sequence[str], deadline_s: float | None = None
    ) -> Executed:
        raise GatewayError(f"ensemble '{self._config.name}' runs its steps, not a batch")

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"ensemble_steps": [s.model_name for s in self._config.ensemble_steps]}


def _step_error(index: int, step: EnsembleStep, ensemble: str, exc: BaseException) -> Exception:
    """The step's error, its class kept (so its status is the same), naming the step; a step
    model that is not there makes the ensemble unavailable, not unknown."""
    text = exc.message if isinstance(exc, GatewayError) else f"{type(exc).__name__}: {exc}"
    message = f"ensemble '{ensemble}' step {index} ('{step.model_name}') failed: {text}"
    if isinstance(exc, ModelNotFound):
        return Unavailable(message)
    if isinstance(exc, GatewayError):
        error = copy.copy(exc)  # the same class and attributes (retry_after_s)
        error.message = message
        error.args = (message,)
        return error
    return StepFailed(message)


async def run_ensemble(
    submit: Submit,
    pending: Pending,
    lv: LoadedVersion,
    deadline_s: float | None,
    clock: Callable[[], float],
    request_id: str | None,
) -> None:
    """Run ``pending`` (a request to ensemble ``lv``) step by step, and end it."""
    started_ns = time.perf_counter_ns()
    steps_started: dict[int, Pending] = {}
    depth = _nesting.get() + 1
    _nesting.set(depth)  # this task's own context
    try:
        if depth > MAX_NESTING:
            raise InvalidInput(
                f"ensemble '{pending.name}' is nested in more than {MAX_NESTING} ensembles "
                "(do ensembles name each other as steps?)"
            )
        request = pending.request
        assert request is not None
        inputs, rows = validate(lv.config, request)
        left_s = None if deadline_s is None else max(0.0, deadline_s - clock())
        steps_from_ns = time.perf_counter_ns()
        steps = _steps(
            submit, pending.name, lv, inputs, deadline_s, clock, request_id, steps_started
        )
        if left_s is None:
            tensors = await steps
        else:
            try:
                async with asyncio.timeout(left_s):
                    tensors = await steps
            except TimeoutError:
                raise DeadlineExceeded("Request timeout expired") from None
        # As Triton reports an ensemble: its queue is the wait before the first step, its
        # compute the steps' whole time (their queues included), one execution per request.
        queue_ns = steps_from_ns - started_ns
        compute_ns = time.perf_counter_ns() - steps_from_ns
        outputs = {t.name: tensors[t.name] for t in lv.config.outputs}
        response = response_of(pending.name, lv.version, lv.config, request, outputs)
        if request.shared_targets:
            write_outputs(request, response)  # into the client's shared memory
    except asyncio.CancelledError:  # the caller went away (Pending.cancel), or the loop ends
        for step in steps_started.values():
            step.cancel()
        pending.settle(error=Unavailable("server is shutting down", retry_after_s=1.0))
        raise
    except Exception as exc:
        for step in steps_started.values():
            step.cancel()
        spent_ns = time.perf_counter_ns() - started_ns
        reason = failure_reason(exc) if isinstance(exc, GatewayError) else "OTHER"
        lv.stats.record_request(False, spent_ns, reason)
        pending.settle(error=exc)
        return
    spent_ns = time.perf_counter_ns() - started_ns
    lv.stats.record_request(True, spent_ns)
    lv.stats.record_queue(queue_ns)
    lv.stats.record_execution(rows if lv.config.batched else 1, 1, compute_ns)
    pending.settle(response, execution=Execution(rows, queue_ns, compute_ns, "ensemble"))


class _Ended:
    """The steps that ended, in order, for the ensemble's task to take one by one (cheaper
    than a queue: one future while it waits, none when a step ended already)."""

    __slots__ = ("indices", "waiter")

    def __init__(self) -> None:
        self.indices: collections.deque[int] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None

    def __call__(self, index: int, _: Pending) -> None:
        """A step's done-callback (it may run inside ``submit``, before anyone waits)."""
        self.indices.append(index)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> int:
        while not self.indices:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        self.waiter = None
        return self.indices.popleft()


async def _steps(
    submit: Submit,
    ensemble: str,
    lv: LoadedVersion,
    inputs: Tensors,
    deadline_s: float | None,
    clock: Callable[[], float],
    request_id: str | None,
    started: dict[int, Pending],
) -> Tensors:
    """Every step, each as soon as its inputs exist; the ensemble's tensors at the end."""
    steps = lv.config.ensemble_steps
    tensors: dict[str, np.ndarray[Any, Any]] = dict(inputs)
    ended = _Ended()
    done: set[int] = set()

    def start_ready() -> None:
        for index, step in enumerate(steps):
            if index in started or any(t not in tensors for _, t in step.input_map):
                continue
            parameters: dict[str, Any] = {}
            if deadline_s is not None:  # the time left, for the step's own deadline
                parameters["timeout"] = max(1, int((deadline_s - clock()) * 1e6))
            request = InferRequest(
                inputs={name: tensors[tensor] for name, tensor in step.input_map},
                outputs=[RequestedOutput(name) for name, _ in step.output_map],
                parameters=parameters,
            )
            version = None if step.model_version < 0 else str(step.model_version)
            step_pending = submit(step.model_name, version, request, request_id)
            started[index] = step_pending
            step_pending.add_done_callback(functools.partial(ended, index))

    start_ready()
    while len(done) < len(steps):
        if len(started) == len(done):  # nothing running, steps left (the config check forbids)
            raise InvalidInput(f"ensemble '{ensemble}': steps left without their inputs")
        index = await ended.next()
        done.add(index)
        step_pending, step = started[index], steps[index]
        if step_pending.cancelled():
            raise _step_error(index, step, ensemble, GatewayError("cancelled"))
        outcome = step_pending.outcome()
        if isinstance(outcome, Exception):
            raise _step_error(index, step, ensemble, outcome)
        for name, tensor in step.output_map:
            array = outcome.outputs.get(name)
            if array is None:
                raise _step_error(
                    index, step, ensemble, GatewayError(f"no output '{name}' in its answer")
                )
            tensors[tensor] = array
        start_ready()
    return tensors
