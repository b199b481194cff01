"""Where the parts meet: the one data plane behind every front end (REST, the raw HTTP path,
gRPC, streaming).

It owns inference's one way in, ``submit``: resolving the model (or waiting for its first-use
load, forwarding meanwhile), deadlines, the checks against the config and admission to the
per-version batchers, with the per-request features that hook into it (traffic splits, shadow
copies, the response cache, ensembles, shared-memory views, each a call into its own module);
and readiness, metadata and statistics. Front ends only decode requests and encode what its
``Pending`` ends with. It knows nothing of HTTP or gRPC.

The model life cycle (what is loaded; load, unload, first-use loads, the repository index) is
``gateway.lifecycle``'s: the data plane holds one ``ModelLifecycle`` and offers its load,
unload and index to the front ends unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from gateway import __version__, context, tracing
from gateway.backends.base import BackendFactory, Tensors
from gateway.ensemble import run_ensemble
from gateway.errors import (
    GatewayError,
    InvalidInput,
    Unavailable,
)
from gateway.lifecycle import READY, LoadedVersion, ModelEntry, ModelLifecycle
from gateway.metrics import Metrics, Source
from gateway.pending import Pending
from gateway.protocol.types import InferRequest, InferResponse, RequestedOutput
from gateway.repository.config import ENSEMBLE_PLATFORM, ModelConfig
from gateway.repository.local import (
    LocalRepository,
    check_model_name,
    is_version,
)
from gateway.response_cache import ResponseCache, build_cache
from gateway.settings import Settings
from gateway.shared_memory import SharedMemoryRegistry, write_outputs
from gateway.splits import HeaderLookup, VersionSplits

EXTENSIONS = ["classification", "model_repository", "statistics", "binary_tensor_data", "logging"]
EXTENSIONS.append("trace")  # gateway/trace_settings.py, gateway/server/trace_setting.py
EXTENSIONS.append("system_shared_memory")  # gateway/shared_memory.py


class Forwarder(Protocol):
    """Runs a request elsewhere while its model is fetched (``gateway.forwarding``)."""

    async def infer(
        self,
        model: str,
        version: str | None,
        inputs: Tensors,
        outputs: Sequence[str],
        timeout_s: float | None,
    ) -> tuple[str, int, Tensors] | None: ...


class DataPlane:
    """ready / metadata / config / submit (inference) / load / unload / index / stats."""

    def __init__(
        self,
        settings: Settings,
        repository: LocalRepository,
        factory: BackendFactory,
        clock: Callable[[], float] = time.monotonic,
        forwarder: Forwarder | None = None,
        metric_sources: Sequence[Source] = (),
        shared_memory: SharedMemoryRegistry | None = None,
        cache: ResponseCache | None = None,
        splits: VersionSplits | None = None,
    ) -> None:
        """``clock`` (monotonic seconds) times deadlines and batching; ``forwarder`` serves
        requests while their model is fetched on first use; ``metric_sources`` add other
        parts' families to ``/metrics`` (the factory's own are added here); ``shared_memory``
        holds the clients' registered regions (a new, empty one by default); ``cache``: the
        response cache (by default the one the settings ask for, if any); ``splits``: traffic
        splits between versions (by default the settings' ``version_weights``)."""
        self.settings = settings
        self.repository = repository
        self.factory = factory
        self.clock = clock
        self.forwarder = forwarder
        self.shared_memory = shared_memory or SharedMemoryRegistry(
            settings.shared_memory_max_regions
        )
        self.lifecycle = ModelLifecycle(settings, repository, factory, clock)
        self.cache = cache if cache is not None else build_cache(settings)
        sources = (factory.metric_families, *metric_sources)
        if self.cache is not None:
            sources += (self.cache.metric_families,)
        self.splits = splits if splits is not None else VersionSplits(settings.version_weights)
        sources += (self.splits.metric_families,)
        self.metrics = Metrics(self, sources)
        self.started = False

    # -- life cycle (``gateway.lifecycle``) ------------------------------------------------------

    @property
    def models(self) -> dict[str, ModelEntry]:
        """What is known of each model, loaded or not (the life cycle's)."""
        return self.lifecycle.models

    @property
    def draining(self) -> bool:
        """Shutting down: new work is refused (set by ``stop``, or early by the CLI)."""
        return self.lifecycle.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.lifecycle.draining = value

    async def start(self) -> None:
        await self.lifecycle.start()
        self.started = True

    async def stop(self) -> None:
        """Drain: refuse new work, finish queued and running batches, release backends."""
        await self.lifecycle.stop()
        self.shared_memory.close()
        if self.cache is not None:
            await self.cache.close()

    async def load(
        self,
        name: str,
        config_json: str | None = None,
        files: dict[str, bytes] | None = None,
    ) -> None:
        """Triton's repository load (``ModelLifecycle.load``)."""
        await self.lifecycle.load(name, config_json, files)

    async def unload(self, name: str) -> None:
        """Triton's repository unload (``ModelLifecycle.unload``)."""
        await self.lifecycle.unload(name)

    def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        return self.lifecycle.repository_index(ready_only)

    def in_use(self, name: str) -> bool:
        """Whether some version of ``name`` is loaded here (an edge never evicts it)."""
        return self.lifecycle.in_use(name)

    def reload_soon(self, name: str) -> None:
        """Load ``name`` again in the background (``ModelLifecycle.reload_soon``)."""
        self.lifecycle.reload_soon(name)

    def check_known(self, name: str) -> str:
        """``name`` if it is a model here or in the repository (``ModelLifecycle.check_known``)."""
        return self.lifecycle.check_known(name)

    # -- health and metadata ----------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        if not self.started or self.draining:
            return False
        if self.settings.strict_readiness:
            return all(e.state == READY for e in self.models.values())
        return True

    def server_metadata(self) -> dict[str, Any]:
        return {"name": self.settings.server_name, "version": __version__, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Loaded, and (for remote backends that can tell) servable somewhere right now; an
        ensemble, as in Triton, only while every step is."""
        return self._model_ready(name, version, ())

    def _model_ready(self, name: str, version: str | None, within: tuple[str, ...]) -> bool:
        try:
            lv = self.lifecycle.resolve(name, version)
        except GatewayError:
            return False
        if lv.config.is_ensemble:
            if name in within:  # ensembles naming each other: never servable
                return False
            return all(
                self._model_ready(
                    step.model_name,
                    None if step.model_version < 0 else str(step.model_version),
                    (*within, name),
                )
                for step in lv.config.ensemble_steps
            )
        return lv.backend.ready()

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        lv = self.lifecycle.resolve(name, version)
        cfg = lv.config
        prefix = [-1] if cfg.batched else []

        def tensors(items: tuple[Any, ...]) -> list[dict[str, Any]]:
            return [
                {"name": t.name, "datatype": t.datatype, "shape": prefix + list(t.dims)}
                for t in items
            ]

        entry = self.models[name]
        return {
            "name": name,
            "versions": [str(v) for v in sorted(entry.versions)],
            "platform": cfg.platform,
            "inputs": tensors(cfg.inputs),
            "outputs": tensors(cfg.outputs),
            "parameters": lv.backend.describe(),
        }

    def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        return self.lifecycle.resolve(name, version).config.to_dict()

    def config_of(self, name: str, version: str | None = None) -> ModelConfig:
        """The config of the version a request would be served by (for decoders that need the
        model's metadata: Triton's raw binary request)."""
        return self.lifecycle.resolve(name, version).config

    def model_stats(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Triton's statistics extension; an unknown model or version is a 400 in its words."""
        if name:
            check_model_name(name)
            entry = self.models.get(name)
            if entry is None:
                raise InvalidInput(f"requested model '{name}' is not available")
            if version:
                loaded = entry.versions.get(int(version)) if is_version(version) else None
                if loaded is None:
                    raise InvalidInput(
                        f"requested model version is not available for model '{name}'"
                    )
                return {"model_stats": [loaded.stats.to_dict()]}
            chosen = [entry.versions[v] for v in sorted(entry.versions)]
        else:
            chosen = [e.versions[v] for e in self.models.values() for v in sorted(e.versions)]
        return {"model_stats": [lv.stats.to_dict() for lv in chosen]}

    # -- inference: the one way in ------------------------------------------------------------

    def submit(
        self,
        name: str,
        version: str | None,
        request: InferRequest | Callable[[], InferRequest],
        request_id: str | None = None,
        header: HeaderLookup | None = None,
        trace: tracing.Incoming | None = None,
    ) -> Pending:
        """Run one inference request: the only way in for every front end.

        ``request`` is the decoded request, or a function that decodes it: called once the
        model is known, so an unknown model is a 404 before its body is parsed, whatever the
        front end. Everything else happens here, in this order: the model is resolved (or, for
        one the repository fetches on first use, loaded, concurrent requests sharing one load,
        and meanwhile forwarded if a forwarder is set), the request's deadline is fixed once
        (from its ``timeout`` parameter, on ``clock``), the request is checked against the
        model's config and queued for its batch (``QueueFull`` when the queue is at its bound).

        The returned :class:`Pending` may be done already (an error found on the spot). A
        request to a loaded model never needs a task: the batch's end, or a timer for its
        deadline, ends it. Only a request that must wait for a load first runs in one.

        A request that names no version follows its model's traffic split, if it has one
        (``header`` looks up the sticky header), and may be copied to a shadow version.

        With tracing on, the request's span starts here, a child of ``trace`` (the caller's
        context, as its front end read it); the front end ends it (``Pending.answered``)."""
        pending = Pending(name)
        shadow = 0
        if tracing.enabled:
            pending.span = tracing.start_request(name, version, request_id, trace)
        try:
            if version is None and self.splits:
                version, shadow = self._split(name, header)
            cold = self.lifecycle.cold(name)
            lv = None if cold else self.lifecycle.resolve(name, version)  # 404/503 before decoding
            decoded = request if isinstance(request, InferRequest) else request()
            if decoded.shared_inputs or decoded.outputs:  # shared memory: views, checked here
                self.shared_memory.resolve(decoded)
            pending.request = decoded
            timeout_us = decoded.timeout_us if decoded.parameters else None
            deadline_s = self.clock() + timeout_us / 1e6 if timeout_us else None
            if lv is None:
                pending.start_task(self._serve_cold(pending, version, deadline_s, request_id))
            else:
                self._admit(pending, lv, deadline_s, request_id)
            if shadow:
                self._shadow(name, shadow, decoded)
        except Exception as exc:
            pending.settle(error=exc)
        return pending

    def _split(self, name: str, header: HeaderLookup | None) -> tuple[str | None, int]:
        entry = self.models.get(name)
        return self.splits.route(name, entry.versions if entry is not None else (), header)

    def _shadow(self, name: str, version: int, request: InferRequest) -> None:
        """A copy of ``request`` to ``version``: answer dropped, latency and outcome kept."""
        started_s = time.perf_counter()
        inputs = request.inputs
        if request.shared_inputs:  # the client may reuse its region once answered: a copy
            inputs = {n: a.copy() for n, a in inputs.items()}
        outputs = [RequestedOutput(o.name) for o in request.outputs or ()] or None
        # Nothing of the copy's answer reaches the client: no shared-memory outputs either.
        twin = InferRequest(inputs, request.id, outputs, parameters=request.parameters)
        copy = self.submit(name, str(version), twin)

        def done(shadow: Pending) -> None:
            error = shadow.error if not shadow.cancelled() else Unavailable("cancelled")
            self.splits.shadow_done(name, version, time.perf_counter() - started_s, error)

        copy.add_done_callback(done)

    def _admit(
        self,
        pending: Pending,
        lv: LoadedVersion,
        deadline_s: float | None,
        request_id: str | None,
    ) -> None:
        """Queue ``pending`` for ``lv``'s batches, unless the response cache answers it; an
        ensemble's request runs its steps, each through ``submit``."""
        config = lv.config
        if self.cache is not None and config.response_cache:
            run = functools.partial(self._run, pending, lv, deadline_s, request_id)
            self.cache.serve(pending, lv, run)
        elif config.platform != ENSEMBLE_PLATFORM:  # the usual case, without ``_run``'s call
            pending.enqueue(lv, deadline_s, request_id)
        else:
            self._run(pending, lv, deadline_s, request_id)

    def _run(
        self,
        pending: Pending,
        lv: LoadedVersion,
        deadline_s: float | None,
        request_id: str | None,
    ) -> None:
        if lv.config.is_ensemble:
            steps = run_ensemble(self.submit, pending, lv, deadline_s, self.clock, request_id)
            pending.start_task(steps)
        else:
            pending.enqueue(lv, deadline_s, request_id)

    async def infer(self, name: str, version: str | None, request: InferRequest) -> InferResponse:
        """``await submit(...)``, for in-process callers that want a coroutine."""
        pending = self.submit(name, version, request)
        try:
            return await pending
        finally:
            if pending.span is not None:
                pending.answered("in-process")

    async def _serve_cold(
        self,
        pending: Pending,
        version: str | None,
        deadline_s: float | None,
        request_id: str | None,
    ) -> None:
        """``submit`` for a model that loads on first use: forwarded while it is fetched (if a
        forwarder is set and a target answers), else queued here once loaded."""
        name = pending.name
        if request_id is not None:
            context.request_id.set(request_id)  # this task's own context
        tracing.use(pending.span)  # a first-use load (an edge fetch) joins the request's trace
        try:
            if self.forwarder is not None and not self.draining:
                if await self._forward(self.forwarder, pending, version, deadline_s):
                    return
            lv = await self.lifecycle.loaded(name, version, deadline_s)
            self._admit(pending, lv, deadline_s, request_id)
        except Exception as exc:
            pending.settle(error=exc)
        except asyncio.CancelledError:  # by ``pending.cancel`` (then a no-op), or the loop's end
            pending.settle(error=Unavailable("server is shutting down", retry_after_s=1.0))
            raise

    async def _forward(
        self,
        forwarder: Forwarder,
        pending: Pending,
        version: str | None,
        deadline_s: float | None,
    ) -> bool:
        """Run ``pending`` on another host while its model loads here on first use; False when
        no target ran it (the caller then waits for the local load, within the deadline)."""
        name, request = pending.name, pending.request
        assert request is not None
        self.lifecycle.load_soon(name)  # the fetch goes on meanwhile
        forward_started_ns = time.perf_counter_ns()
        left_s = None if deadline_s is None else deadline_s - self.clock()
        wanted = [o.name for o in request.outputs] if request.outputs else []
        with tracing.span(tracing.FORWARD):
            result = await forwarder.infer(name, version, request.inputs, wanted, left_s)
        if result is None:
            return False
        target, served, outputs = result
        missing = [n for n in wanted if n not in outputs]
        if missing:
            raise Unavailable(f"host {target} did not return output(s) {', '.join(missing)}")
        rows = next(iter(request.inputs.values())).shape[:1] if request.inputs else ()
        execution = context.Execution(
            int(rows[0]) if rows else 1, 0, time.perf_counter_ns() - forward_started_ns, target
        )
        chosen = {n: outputs[n] for n in wanted} if wanted else outputs
        response = InferResponse(
            model_name=name, model_version=str(served), outputs=chosen, id=request.id
        )
        if request.shared_targets:
            write_outputs(request, response)
        pending.settle(response, execution=execution)
        return True
