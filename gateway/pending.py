"""One inference request in flight: what ``DataPlane.submit`` hands back to every front end.

A :class:`Pending` ends exactly once: with a response, with an error, or cancelled (its caller
went away). A front end takes the end whichever way suits it, and only encodes it:

- ``await pending`` (or ``await pending.wait()``, which does not raise the request's error) in a
  task, as the ASGI and gRPC handlers do. Cancelling that task withdraws the request.
- ``pending.add_done_callback(fn)``, with no task at all, as the raw HTTP path does: ``fn`` runs
  where the request ends (usually the end of its batch), not scheduled for later.

Whether anything runs in a task *inside* (a model to load first, a request to forward while the
model is fetched) is the data plane's decision; a request to a loaded model is validated, queued
for its batch, and ended by the batch's callback, its deadline (if any) kept by a timer.

Also here: the checks of a request against its model's config (``validate``) and the cut of a
batch's outputs to what the request asked for (``response_of``), pure functions of the config.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway import context, tracing
from gateway.backends.base import Tensors
from gateway.batching.batcher import CANCELLED
from gateway.errors import DeadlineExceeded, GatewayError, InvalidInput, QueueFull
from gateway.protocol.tensors import tensor_from_buffer
from gateway.protocol.types import (
    DATATYPES,
    InferRequest,
    InferResponse,
    datatype_of,
    numpy_dtype,
)
from gateway.repository.config import ModelConfig
from gateway.shared_memory import write_outputs

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from gateway.batching import Queued
    from gateway.lifecycle import LoadedVersion

DoneCallback = Callable[["Pending"], object]

_WAITING, _DONE, _CANCELLED = 0, 1, 2


def failure_reason(exc: GatewayError) -> str:
    """Triton's ``reason`` label of ``nv_inference_request_failure``."""
    if isinstance(exc, QueueFull):
        return "REJECTED"
    if isinstance(exc, DeadlineExceeded):
        return "CANCELED"
    if isinstance(exc, InvalidInput):
        return "BACKEND"  # Triton counts input the model rejects as a backend failure
    return "OTHER"


class Pending:
    """One request handed to the data plane, until it ends (see the module docstring)."""

    __slots__ = (
        "_callback",
        "_more_callbacks",
        "_queued",
        "_state",
        "_stats_started_ns",
        "_task",
        "_timer",
        "_version",
        "error",
        "execution",
        "name",
        "request",
        "response",
        "span",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.request: InferRequest | None = None  # None until decoded (or if that failed)
        self.response: InferResponse | None = None
        self.error: Exception | None = None
        self.execution: context.Execution | None = None  # how it ran, for the access log
        self._state = _WAITING
        self._callback: DoneCallback | None = None  # the usual one: its front end's
        self._more_callbacks: list[DoneCallback] | None = None
        self._version: LoadedVersion | None = None
        self._queued: Queued | None = None
        self._stats_started_ns = 0
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.span: Span | None = None  # its trace span, when tracing samples it (submit sets it)

    # -- for the front ends ------------------------------------------------------------------

    def done(self) -> bool:
        return self._state != _WAITING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def outcome(self) -> InferResponse | Exception:
        """The response or the error of a request that is done and was not cancelled."""
        if self.error is not None:
            return self.error
        assert self.response is not None, "outcome() of a pending or cancelled request"
        return self.response

    def result(self) -> InferResponse:
        """The response; raises the request's error (CancelledError if it was cancelled)."""
        if self._state == _CANCELLED:
            raise asyncio.CancelledError()
        outcome = self.outcome()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def add_done_callback(self, callback: DoneCallback) -> None:
        """Call ``callback(self)`` once done: right away if done already, else where the request
        ends (not scheduled: a callback that raises is the caller's bug)."""
        if self._state != _WAITING:
            callback(self)
        elif self._callback is None:
            self._callback = callback
        elif self._more_callbacks is None:
            self._more_callbacks = [callback]
        else:
            self._more_callbacks.append(callback)

    def cancel(self) -> None:
        """The caller went away: give up its place in the queue (or its wait for a model)."""
        if self._state != _WAITING:
            return
        self._state = _CANCELLED
        if self._timer is not None:
            self._timer.cancel()
        if self._queued is not None:
            self._queued.cancel()  # the batcher drops it before it takes a slot
        if self._task is not None:
            self._task.cancel()
        self._run_callbacks()

    async def wait(self) -> None:
        """Until done, without raising its error; being cancelled cancels the request."""
        if self._state != _WAITING:
            return
        # Waiting for something: its batch, or the data plane's task.
        if self._queued is not None:
            loop = self._queued.loop
        else:
            assert self._task is not None
            loop = self._task.get_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def wake(_: Pending) -> None:
            if not waiter.done():
                waiter.set_result(None)

        self.add_done_callback(wake)
        try:
            await waiter
        except asyncio.CancelledError:
            self.cancel()
            raise

    def answered(self, status: int | str, response_bytes: int = 0) -> None:
        """The front end's last word (its status code and the bytes it wrote): ends the
        request's trace span, if it has one; front ends call it where they log the request."""
        span, self.span = self.span, None
        if span is not None:
            tracing.end_request(span, self, status, response_bytes)

    def __await__(self) -> Generator[Any, None, InferResponse]:
        yield from self.wait().__await__()
        return self.result()

    # -- for the data plane -----------------------------------------------------------------

    def start_task(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (a coroutine that ends this request) as a task of its own."""
        self._task = asyncio.ensure_future(work)

    def enqueue(self, lv: LoadedVersion, deadline_s: float | None, request_id: str | None) -> None:
        """Check the request against ``lv``'s config and queue it for a batch (raises
        ``InvalidInput``, ``QueueFull``, counted as ``lv``'s failures); from then on the batch's
        end, or the deadline's timer, ends it."""
        request = self.request
        assert request is not None
        self._version = lv
        self._stats_started_ns = stats_started_ns = time.perf_counter_ns()
        try:
            inputs, rows = validate(lv.config, request)
            priority = request.priority if request.parameters else 0  # (no call when none)
            queued = lv.batcher.enqueue(inputs, rows, deadline_s, request_id, priority)
        except GatewayError as exc:
            spent_ns = time.perf_counter_ns() - stats_started_ns
            lv.stats.record_request(False, spent_ns, failure_reason(exc))
            raise
        self._queued = queued
        queued.trace = self.span  # the batch's span links to it (gateway.tracing)
        # Ended by the batch right where it ends (no asyncio future, no loop turn between).
        queued.on_done = self._batch_done
        if queued.deadline_s is not None:  # the request's, or the model's default timeout
            delay_s = max(0.0, queued.deadline_s - queued.enqueued_s)
            self._timer = queued.loop.call_later(delay_s, self._expired)

    def settle(
        self,
        response: InferResponse | None = None,
        error: Exception | None = None,
        execution: context.Execution | None = None,
    ) -> None:
        """End it with ``response`` or ``error`` (no-op once done: a cancel came first)."""
        if self._state != _WAITING:
            return
        self._state = _DONE
        self.response = response
        if isinstance(error, GatewayError):
            # A refusal's traceback holds the frame that refused it, and that frame this
            # Pending (and the front end's call): a cycle only the collector frees, whose
            # passes stall the loop. Refusals are answered, never logged with their stack.
            # So do the tracebacks of the errors it was raised from or while handling (a
            # body that does not decode: ``raise InvalidInput(...) from None`` still keeps
            # the parser's error, and its frames, as ``__context__``).
            chained: BaseException | None = error
            for _ in range(8):  # a chain is short; bounded all the same
                if chained is None:
                    break
                chained.__traceback__ = None
                chained = chained.__cause__ or chained.__context__
        self.error = error
        self.execution = execution
        if self._more_callbacks is None:  # the usual case, inline: one front end's callback
            callback, self._callback = self._callback, None
            if callback is not None:
                callback(self)
        else:
            self._run_callbacks()

    def _run_callbacks(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(self)
        more, self._more_callbacks = self._more_callbacks, None
        for callback in more or ():
            callback(self)

    def _batch_done(self, queued: Queued) -> None:
        """The batch's end: the usual way a request ends."""
        if self._state != _WAITING:
            return  # cancelled or expired: ended already
        if queued.state == CANCELLED:  # not by this request (the batcher never does): no hanging
            self.settle(error=GatewayError("request withdrawn from its batch"))
            return
        if self._timer is not None:
            self._timer.cancel()
        lv, request = self._version, self.request
        assert lv is not None and request is not None
        spent_ns = time.perf_counter_ns() - self._stats_started_ns
        exc = queued.error
        if exc is not None:
            if isinstance(exc, GatewayError):
                lv.stats.record_request(False, spent_ns, failure_reason(exc))
            error = exc if isinstance(exc, Exception) else GatewayError(repr(exc))
            self.settle(error=error, execution=queued.execution)
            return
        lv.stats.record_request(True, spent_ns)
        outputs = queued.result
        assert outputs is not None  # ended, not cancelled, no error: its rows
        try:
            response = response_of(self.name, lv.version, lv.config, request, outputs, lv.labels)
            if request.shared_targets:
                write_outputs(request, response)  # into the client's shared memory
        except Exception as error:  # a backend that left out an output asked for
            self.settle(error=error, execution=queued.execution)
            return
        self.settle(response, execution=queued.execution)

    def _expired(self) -> None:
        """The deadline passed before the batch's end (queued or running): a 504, and its
        place in the queue given up."""
        self._timer = None
        if self._state != _WAITING:
            return
        lv, queued = self._version, self._queued
        assert lv is not None and queued is not None
        error = DeadlineExceeded("Request timeout expired")
        lv.stats.record_request(
            False, time.perf_counter_ns() - self._stats_started_ns, failure_reason(error)
        )
        self.settle(error=error)
        queued.cancel()


# -- pure checks against a model's config ----------------------------------------------------


def _dims(dims: Sequence[int]) -> str:
    """Dims as Triton prints them: ``[-1,16]``."""
    return "[" + ",".join(str(d) for d in dims) + "]"


# Triton's note after a shape error of a batched model (clients see it as the hint it is).
BATCH_NOTE = (
    " NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension "
    "to be prepended to each input shape. If you want to specify the full shape including the "
    "batch dim in your input dims config, try setting max_batch_size to zero. See the model "
    "configuration docs for more info on max_batch_size."
)


def _shape_error(name: str, cfg: ModelConfig, shape: tuple[int, ...]) -> str:
    """Triton's words for an input whose shape the config does not allow."""
    spec = cfg.input(name)
    expected = ([-1] if cfg.batched else []) + list(spec.dims if spec else ())
    return (
        f"unexpected shape for input '{name}' for model '{cfg.name}'. "
        f"Expected {_dims(expected)}, got {_dims(shape)}." + (BATCH_NOTE if cfg.batched else "")
    )


# Each datatype's name by its numpy dtype: ``datatype_of`` without a call, for the usual dtypes.
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}


def validate(cfg: ModelConfig, request: InferRequest) -> tuple[Tensors, int]:
    """The request's inputs as the backend takes them (reshaped where the config says), and its
    batch rows; ``InvalidInput`` for anything the model does not accept."""
    rows = 1
    prepared: Tensors = {}
    batched = cfg.batched
    specs = cfg.inputs_by_name  # (dict reads, not calls: these run per request)
    for name, array in request.inputs.items():
        spec = specs.get(name)
        if spec is None:
            raise InvalidInput(f"unexpected inference input '{name}' for model '{cfg.name}'")
        datatype = _NAMES.get(array.dtype) or datatype_of(array)  # (strings: not in _NAMES)
        if datatype != spec.datatype:
            raise InvalidInput(
                f"inference input '{name}' data-type is '{datatype}', but model "
                f"'{cfg.name}' expects '{spec.datatype}'"
            )
        shape = array.shape
        dims = shape[1:] if batched else shape
        if len(dims) != len(spec.dims) or (batched and not shape):
            raise InvalidInput(_shape_error(name, cfg, shape))
        if batched:
            if shape[0] < 1:  # () was refused above
                raise InvalidInput(
                    f"input '{name}': shape {list(shape)} needs a batch dimension >= 1"
                )
            if shape[0] > cfg.max_batch_size:
                raise InvalidInput(
                    f"inference request batch-size must be <= {cfg.max_batch_size} for "
                    f"'{cfg.name}', got {shape[0]}"
                )
            if prepared and shape[0] != rows:
                raise InvalidInput(
                    f"input '{name}': batch size {shape[0]} differs from other inputs' {rows}"
                )
            rows = shape[0]
        if dims != spec.dims and any(
            want != -1 and got != want for got, want in zip(dims, spec.dims, strict=True)
        ):
            raise InvalidInput(_shape_error(name, cfg, shape))
        if spec.reshape is not None:
            lead = (rows,) if batched else ()
            try:
                array = array.reshape(lead + spec.reshape)
            except ValueError:
                raise InvalidInput(
                    f"input '{name}' cannot be reshaped to {list(spec.reshape)}"
                ) from None
        prepared[name] = array
    # Every name in ``prepared`` is one of the config's: as many means none is missing.
    missing = (
        []
        if len(prepared) == len(cfg.inputs)
        else [t.name for t in cfg.inputs if t.name not in prepared and not t.optional]
    )
    if missing:

        def names(items: Sequence[str]) -> str:
            return "[" + ",".join(f"'{n}'" for n in items) + "]"

        raise InvalidInput(  # Triton's words
            f"expected {len(cfg.inputs)} inputs but got {len(prepared)} inputs for model "
            f"'{cfg.name}'. Got input(s) {names(list(prepared))}, but missing required input(s) "
            f"{names(missing)}. Please provide all required input(s)."
        )
    if request.outputs:
        out_specs = cfg.outputs_by_name
        for out in request.outputs:
            spec = out_specs.get(out.name)
            if spec is None:
                raise InvalidInput(
                    f"unexpected inference output '{out.name}' for model '{cfg.name}'"
                )
            if out.classification and spec.datatype not in CLASSIFIABLE:
                raise InvalidInput(  # Triton's words
                    "class result not available for output due to unsupported type "
                    f"'{spec.datatype}'"
                )
    return prepared, rows


# Triton's classification extension ranks these; others are refused in its words.
CLASSIFIABLE = frozenset(
    {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"}
)


def classify(
    array: np.ndarray[Any, Any], count: int, labels: tuple[str, ...] | None, batched: bool
) -> np.ndarray[Any, Any]:
    """The top ``count`` classes of each batch row (of the whole tensor when not batched) as
    Triton's BYTES ``"value:index"`` or ``"value:index:label"`` strings, best first (ties by
    index); fewer when the row holds fewer. Values print as C's ``%f`` for floats."""
    rows = array.reshape(array.shape[0], -1) if batched and array.ndim else array.reshape(1, -1)
    floats = rows.dtype.kind == "f"
    keep = min(count, rows.shape[1])
    out = np.empty((rows.shape[0], keep), dtype=object)
    for r, row in enumerate(rows):
        # descending and stable: sort the reversed row ascending, then read it backwards
        order = (len(row) - 1 - np.argsort(row[::-1], kind="stable")[::-1])[:keep]
        for k, index in enumerate(order.tolist()):
            value = row[index]
            text = f"{float(value):f}" if floats else str(int(value))
            text += f":{index}"
            if labels is not None and index < len(labels):
                text += f":{labels[index]}"
            out[r, k] = text.encode()
    return out if batched and array.ndim else out.reshape(keep)


def raw_binary_request(cfg: ModelConfig, body: bytes) -> InferRequest:
    """Triton's raw binary request (``Inference-Header-Content-Length: 0``): the whole body is
    the tensor of the model's one input, its shape deduced from the config (at most one
    variable dimension, from the body's size; a BYTES input of dims ``[1]`` is one element,
    the body), a batch of one for a batching model; every output answered as binary."""
    if len(cfg.inputs) != 1:
        raise InvalidInput(
            f"raw binary request (Inference-Header-Content-Length: 0) needs a model with one "
            f"input; '{cfg.name}' has {len(cfg.inputs)}"
        )
    spec = cfg.inputs[0]
    lead = (1,) if cfg.batched else ()
    dtype = numpy_dtype(spec.datatype)
    if dtype.kind == "O":
        if spec.dims != (1,):
            raise InvalidInput(
                f"raw binary request: BYTES input '{spec.name}' must have dims [1], "
                f"not {_dims(spec.dims)}"
            )
        array = np.empty((*lead, 1), dtype=object)
        array.reshape(-1)[0] = bytes(body)
        return InferRequest(inputs={spec.name: array}, binary_output=True)
    variable = [i for i, d in enumerate(spec.dims) if d == -1]
    fixed = math.prod(d for d in spec.dims if d != -1) * dtype.itemsize
    if len(variable) > 1:
        raise InvalidInput(
            f"raw binary request: input '{spec.name}' has dims {_dims(spec.dims)}; the size of "
            "the body can tell at most one variable dimension"
        )
    dims = list(spec.dims)
    if variable and fixed and len(body) % fixed == 0:
        dims[variable[0]] = len(body) // fixed
    elif variable or len(body) != fixed:
        raise InvalidInput(
            f"raw binary request: {len(body)} bytes do not make input '{spec.name}' of "
            f"{spec.datatype} dims {_dims(spec.dims)}"
        )
    array = tensor_from_buffer(body, dtype, lead + tuple(dims), spec.name)
    return InferRequest(inputs={spec.name: array}, binary_output=True)


def response_of(
    name: str,
    version: int,
    cfg: ModelConfig,
    request: InferRequest,
    outputs: Tensors,
    labels: dict[str, tuple[str, ...]] | None = None,
) -> InferResponse:
    """The outputs asked for (all by default), reshaped as the config says, or as their top
    classes where the request asked for ``classification``."""
    # One pass over what was asked for (plain loops: no comprehension frames per request).
    wanted: list[tuple[str, int]] = []
    if request.outputs:
        for requested in request.outputs:
            wanted.append((requested.name, requested.classification))
    else:
        for out_name in outputs:
            wanted.append((out_name, 0))
    result: dict[str, np.ndarray[Any, Any]] = {}
    specs = cfg.outputs_by_name
    for out_name, classes in wanted:
        array = outputs[out_name]
        spec = specs.get(out_name)
        if spec is not None and spec.reshape is not None:
            lead = (array.shape[0],) if cfg.batched else ()
            array = array.reshape(lead + tuple(spec.dims))
        if classes:
            names = (labels or {}).get(out_name)
            array = classify(array, classes, names, cfg.batched)
        result[out_name] = array
    return InferResponse(model_name=name, model_version=str(version), outputs=result, id=request.id)


__all__ = [
    "BATCH_NOTE",
    "Pending",
    "classify",
    "failure_reason",
    "raw_binary_request",
    "response_of",
    "validate",
]
