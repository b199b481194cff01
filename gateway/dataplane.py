"""Where the parts meet: the one data plane behind every front end (REST, the raw HTTP path,
gRPC, streaming).

It owns the set of loaded model versions, loading on first use (an edge's pulls), readiness,
deadlines and admission to the per-version batchers, and keeps statistics. Inference has one way
in, ``submit``: front ends only decode requests and encode what its ``Pending`` ends with. It
knows nothing of HTTP or gRPC.

Why one module of this size: inference (``submit``, with the per-request features that hook into
it: traffic splits, shadow copies, the response cache, ensembles, shared-memory views, each a
call into its own module) and the model life cycle (load, unload, index) share the model entries
and their locks; the life cycle is the next split.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gateway import __version__, context, tracing
from gateway.backends.base import Backend, BackendFactory, Tensors
from gateway.batching import Batcher, BatchPolicy, QueuePolicy
from gateway.ensemble import EnsembleBackend, run_ensemble
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    Unavailable,
)
from gateway.metrics import Metrics, Source
from gateway.pending import Pending
from gateway.protocol.types import InferRequest, InferResponse, RequestedOutput
from gateway.repository.config import ModelConfig, QueuePolicyConfig, parse_json
from gateway.repository.local import (
    LocalRepository,
    ModelSource,
    check_model_name,
    is_version,
    locate_versions,
    read_labels,
)
from gateway.repository.pushed import write_pushed_files
from gateway.response_cache import ResponseCache, build_cache
from gateway.settings import Settings
from gateway.shared_memory import SharedMemoryRegistry, write_outputs
from gateway.splits import HeaderLookup, VersionSplits
from gateway.stats import ModelStats

log = logging.getLogger(__name__)

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"
EXTENSIONS = ["classification", "model_repository", "statistics", "binary_tensor_data", "logging"]
EXTENSIONS.append("trace")  # gateway/tracing.py, gateway/server/trace_setting.py
EXTENSIONS.append("system_shared_memory")  # gateway/shared_memory.py


@dataclass(slots=True)
class LoadedVersion:
    """One servable model version: its backend, batcher and counters."""

    version: int
    config: ModelConfig
    backend: Backend
    batcher: Batcher
    stats: ModelStats
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per output (classes)


@dataclass(slots=True)
class ModelEntry:
    """What the gateway knows of one model name, loaded or not."""

    name: str
    state: str = UNAVAILABLE
    reason: str = ""
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    scratch: Path | None = None  # files pushed through the repository API
    override: str | None = None  # the config a load was given; kept by plain reloads

    @property
    def latest(self) -> LoadedVersion:
        return self.versions[max(self.versions)]


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


def _capacity_of(backend: Backend) -> Callable[[], int]:
    """Asked by the batcher whenever a batch forms: a routed backend's grows with its hosts."""
    return lambda: backend.instance_count


def _policy(config: ModelConfig, backend: Backend, settings: Settings) -> BatchPolicy:
    db = config.dynamic_batching
    if not config.batched or db is None:
        return BatchPolicy(
            max_batch_size=0,
            max_queue_size=settings.max_queue_size,
            instance_count=backend.instance_count,
            pipeline=settings.batch_pipeline,
        )
    return BatchPolicy(
        max_batch_size=config.max_batch_size,
        preferred_batch_sizes=db.preferred_batch_sizes,
        max_queue_delay_s=0.0 if backend.batches_upstream else db.max_queue_delay_us / 1e6,
        max_queue_size=db.max_queue_size or settings.max_queue_size,
        default_timeout_s=(db.default_timeout_us / 1e6) or None,
        instance_count=backend.instance_count,
        pipeline=settings.batch_pipeline,
        adaptive_delay=settings.batching_delay == "adaptive",
        inline_max_s=settings.inline_max_ms / 1e3,
        priority_levels=db.priority_levels,
        default_priority_level=db.default_priority_level,
        queue_policies=tuple(
            (level, _queue_policy(policy, settings)) for level, policy in db.priority_queue_policy
        ),
        allow_timeout_override=db.allow_timeout_override,
        delay_on_timeout=db.timeout_action == "DELAY",
    )


def _queue_policy(policy: QueuePolicyConfig, settings: Settings) -> QueuePolicy:
    """A config's queue policy for the batcher: a bound of 0 is the gateway's default one."""
    return QueuePolicy(
        max_queue_size=policy.max_queue_size or settings.max_queue_size,
        default_timeout_s=(policy.default_timeout_us / 1e6) or None,
        allow_timeout_override=policy.allow_timeout_override,
        delay_on_timeout=policy.timeout_action == "DELAY",
    )


def _message(exc: BaseException) -> str:
    if isinstance(exc, GatewayError):
        return exc.message
    return f"internal error ({type(exc).__name__})"


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
        self.models: dict[str, ModelEntry] = {}
        self.cache = cache if cache is not None else build_cache(settings)
        sources = (factory.metric_families, *metric_sources)
        if self.cache is not None:
            sources += (self.cache.metric_families,)
        self.splits = splits if splits is not None else VersionSplits(settings.version_weights)
        sources += (self.splits.metric_families,)
        self.metrics = Metrics(self, sources)
        self.started = False
        self.draining = False
        self._loads: dict[str, asyncio.Future[None]] = {}  # loads started by a request
        self._reloads: set[asyncio.Future[None]] = set()  # loads started by the repository

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        names = list(self.settings.load_models) or await self.repository.startup_names()
        await asyncio.gather(*(self._load_quietly(name) for name in names))
        self.started = True

    async def _load_quietly(self, name: str) -> None:
        try:
            await self.load(name)
        except GatewayError as exc:
            log.error("%s", exc.message)  # "failed to load '<name>', <why>"

    async def stop(self) -> None:
        """Drain: refuse new work, finish queued and running batches, release backends."""
        self.draining = True
        await asyncio.gather(
            *(self._retire(list(e.versions.values())) for e in self.models.values())
        )
        for entry in self.models.values():
            entry.versions.clear()
            entry.state = UNAVAILABLE
            entry.reason = "server shutting down"
            if entry.scratch is not None:
                shutil.rmtree(entry.scratch, ignore_errors=True)
        self.shared_memory.close()
        if self.cache is not None:
            await self.cache.close()

    async def _retire(self, versions: list[LoadedVersion]) -> None:
        for lv in versions:
            await lv.batcher.close(self.settings.drain_timeout_s)
            await lv.backend.close()

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

    def _entry(self, name: str) -> ModelEntry:
        check_model_name(name)
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        return entry

    def _resolve(self, name: str, version: str | None = None) -> LoadedVersion:
        """The loaded version to serve (the newest when none is named)."""
        entry = self._entry(name)
        if self.draining:
            raise Unavailable("server is shutting down", retry_after_s=1.0)
        if entry.state != READY or not entry.versions:
            reason = f": {entry.reason}" if entry.reason else ""
            raise ModelNotReady(f"model '{name}' is not ready ({entry.state.lower()}{reason})")
        if not version:
            return entry.latest
        if not is_version(version):
            raise ModelNotFound(f"invalid version {version[:32]!r} for model '{name}'")
        loaded = entry.versions.get(int(version))
        if loaded is None:
            raise ModelNotFound(
                f"Request for unknown model: '{name}' version {version} is not found"
            )
        return loaded

    def in_use(self, name: str) -> bool:
        """Whether some version of ``name`` is loaded here (an edge never evicts it)."""
        entry = self.models.get(name)
        return entry is not None and bool(entry.versions)

    def check_known(self, name: str) -> str:
        """``name`` if it is a model here or in the repository (loaded or not), else
        ``ModelNotFound``: for settings kept per model (the trace extension's)."""
        check_model_name(name)
        if name not in self.models and name not in self.repository.model_names():
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        return name

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Loaded, and (for remote backends that can tell) servable somewhere right now; an
        ensemble, as in Triton, only while every step is."""
        return self._model_ready(name, version, ())

    def _model_ready(self, name: str, version: str | None, within: tuple[str, ...]) -> bool:
        try:
            lv = self._resolve(name, version)
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

    # -- loading on first use (edge repositories) -------------------------------------------

    def _cold(self, name: str) -> bool:
        """Loading (or to be loaded) on first use: a request for it waits or is forwarded."""
        return name in self._loads or self._wants_load(name)

    def _wants_load(self, name: str) -> bool:
        entry = self.models.get(name)
        if entry is not None and (entry.versions or entry.reason == "unloaded"):
            return False
        return not self.draining and self.repository.on_demand(check_model_name(name))

    def _load_soon(self, name: str) -> asyncio.Future[None]:
        future = self._loads.get(name)
        if future is None:
            future = asyncio.ensure_future(self.load(name))
            self._loads[name] = future
            future.add_done_callback(lambda f: self._load_done(name, f))
        return future

    def _load_done(self, name: str, future: asyncio.Future[None]) -> None:
        self._loads.pop(name, None)
        if not future.cancelled():
            future.exception()  # retrieved: every waiter may have given up (load() forgot
            # a name the repository does not know, so a name asked for in vain leaves nothing)

    def reload_soon(self, name: str) -> None:
        """Load ``name`` again in the background (an edge's origin changed it), unless it was
        never loaded here or was unloaded; requests keep using the loaded version meanwhile."""
        entry = self.models.get(name)
        if entry is None or entry.reason == "unloaded" or self.draining:
            return
        future = asyncio.ensure_future(self._load_quietly(name))
        self._reloads.add(future)
        future.add_done_callback(self._reloads.discard)

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        lv = self._resolve(name, version)
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
        return self._resolve(name, version).config.to_dict()

    def config_of(self, name: str, version: str | None = None) -> ModelConfig:
        """The config of the version a request would be served by (for decoders that need the
        model's metadata: Triton's raw binary request)."""
        return self._resolve(name, version).config

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

    def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        names = set(self.models) | set(self.repository.model_names())
        index: list[dict[str, Any]] = []
        for name in sorted(names):
            entry = self.models.get(name)
            if entry is None:
                if not ready_only:
                    reason = self.repository.note(name) or "not loaded"
                    index.append({"name": name, "state": UNAVAILABLE, "reason": reason})
                continue
            if ready_only and entry.state != READY:
                continue
            if entry.versions:
                for v in sorted(entry.versions):
                    index.append(
                        {
                            "name": name,
                            "version": str(v),
                            "state": entry.state,
                            "reason": entry.reason,
                        }
                    )
            else:
                reason = entry.reason
                if entry.state == LOADING and not reason:
                    reason = self.repository.note(name)  # an edge: "fetching: x/y bytes"
                index.append({"name": name, "state": entry.state, "reason": reason})
        return index

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
            cold = self._cold(name)
            lv = None if cold else self._resolve(name, version)  # 404 / 503 before decoding
            decoded = request if isinstance(request, InferRequest) else request()
            if decoded.shared_inputs or decoded.outputs:  # shared memory: views, checked here
                self.shared_memory.resolve(decoded)
            pending.request = decoded
            timeout_us = decoded.timeout_us
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
        if self.cache is not None and lv.config.response_cache:
            run = functools.partial(self._run, pending, lv, deadline_s, request_id)
            self.cache.serve(pending, lv, run)
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
            lv = await self._loaded(name, version, deadline_s)
            self._admit(pending, lv, deadline_s, request_id)
        except Exception as exc:
            pending.settle(error=exc)
        except asyncio.CancelledError:  # by ``pending.cancel`` (then a no-op), or the loop's end
            pending.settle(error=Unavailable("server is shutting down", retry_after_s=1.0))
            raise

    async def _loaded(
        self, name: str, version: str | None, deadline_s: float | None
    ) -> LoadedVersion:
        """The version to serve once a first-use load is over, waited for until the deadline:
        concurrent cold requests share one load, so one download."""
        if self._cold(name):
            future = self._load_soon(name)
            left_s = None if deadline_s is None else max(0.0, deadline_s - self.clock())
            try:
                async with asyncio.timeout(left_s):
                    await asyncio.shield(future)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"model '{name}' is still being fetched; the request timeout expired"
                ) from None
            except (ModelLoadError, ModelNotFound):
                if name not in self.models and name not in self.repository.model_names():
                    raise ModelNotFound(
                        f"Request for unknown model: '{name}' is not found"
                    ) from None
                raise
        return self._resolve(name, version)

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
        self._load_soon(name)  # the fetch goes on meanwhile
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

    # -- repository -------------------------------------------------------------------------

    async def load(
        self,
        name: str,
        config_json: str | None = None,
        files: dict[str, bytes] | None = None,
    ) -> None:
        """Load (or reload) a model; in-flight requests on the old versions finish first.

        A load that fails leaves the versions that were serving, or the model unavailable with
        the reason; never LOADING, never scratch files, and no entry at all for a name the
        repository does not know (unknown names must not grow state).

        As in Triton, a plain load (no config, no files) of a model that is loaded with an
        override config keeps that override (and the files pushed with it) until an unload:
        only a model not loaded is read from the repository afresh."""
        check_model_name(name)
        entry = self.models.setdefault(name, ModelEntry(name))
        async with entry.lock:
            if self.models.get(name) is not entry:  # forgotten while this call waited
                return await self.load(name, config_json, files)
            if not entry.versions:
                entry.state, entry.reason = LOADING, ""
            scratch: Path | None = None
            kept = config_json is None and not files and bool(entry.versions)
            if kept and entry.override is not None:
                config_json = entry.override
            try:
                config = self._config(name, config_json)
                if kept and entry.scratch is not None and config is not None:
                    source = locate_versions(entry.scratch, config)
                elif files:
                    scratch = write_pushed_files(name, files)  # bad paths first, as Triton
                    if config is None:  # Triton refuses it, in these words
                        raise ModelLoadError(
                            "Load parameter 'config' must be specified for model file override"
                        )
                    source = locate_versions(scratch, config)
                else:
                    await self.repository.fetch(name)  # edge caches pull from their origin
                    source = self.repository.source(name, config)
                new = await self._load_versions(name, source)
            except BaseException as exc:
                if scratch is not None:
                    shutil.rmtree(scratch, ignore_errors=True)
                self._load_failed(entry, exc)
                if isinstance(exc, Unavailable) or not isinstance(exc, GatewayError):
                    raise  # origin down: retry later; a bug: 500
                # Triton's form, which clients match on ("failed to load 'simple', ..."),
                # with the detail after it. An unknown name stays a 404.
                kind = ModelNotFound if isinstance(exc, ModelNotFound) else ModelLoadError
                raise kind(f"failed to load '{name}', {exc.message}") from None
            if not (kept and entry.override is not None) and (scratch is not None or not files):
                if entry.scratch is not None:
                    shutil.rmtree(entry.scratch, ignore_errors=True)
                entry.scratch = scratch
            entry.override = config_json
            old = list(entry.versions.values())
            entry.versions = new
            entry.state, entry.reason = READY, ""
        if old:
            await self._retire(old)
        log.info("model %s loaded, versions %s", name, sorted(new))

    def _config(self, name: str, config_json: str | None) -> ModelConfig | None:
        if config_json is None:
            return None
        return parse_json(config_json, "override config", name)

    async def _load_versions(self, name: str, source: ModelSource) -> dict[int, LoadedVersion]:
        new: dict[int, LoadedVersion] = {}
        try:
            for version in source.version_paths:
                if source.config.is_ensemble:  # its steps are other models: nothing to load
                    backend: Backend = EnsembleBackend(source.config)
                else:
                    backend = await self.factory.load(source, version)
                stats = ModelStats(name, str(version))
                batcher = Batcher(
                    backend.execute,
                    [t.name for t in backend.config.outputs],
                    _policy(backend.config, backend, self.settings),
                    stats,
                    self.clock,
                    capacity=_capacity_of(backend),
                    execute_now=backend.execute_now,
                )
                labels = read_labels(source.directory, backend.config)
                new[version] = LoadedVersion(
                    version, backend.config, backend, batcher, stats, labels
                )
        except BaseException:
            await self._retire(list(new.values()))
            raise
        return new

    def _load_failed(self, entry: ModelEntry, exc: BaseException) -> None:
        if entry.versions:  # the versions loaded before keep serving
            entry.reason = f"load failed: {_message(exc)}"
            return
        known = entry.name in self.repository.model_names()
        if not known and self.models.get(entry.name) is entry:
            del self.models[entry.name]
            if entry.scratch is not None:
                shutil.rmtree(entry.scratch, ignore_errors=True)
            return
        entry.state, entry.reason = UNAVAILABLE, f"load failed: {_message(exc)}"

    async def unload(self, name: str) -> None:
        """Unload every version; a name with nothing loaded is a success, as in Triton."""
        check_model_name(name)
        entry = self.models.get(name)
        if entry is None:
            return
        async with entry.lock:
            old = list(entry.versions.values())
            entry.state, entry.reason = UNLOADING, ""
            entry.versions = {}
            with contextlib.suppress(Exception):
                await self._retire(old)
            if entry.scratch is not None:  # pushed files go with the model, as in Triton
                shutil.rmtree(entry.scratch, ignore_errors=True)
                entry.scratch = None
            entry.override = None  # the next load reads the repository afresh
            entry.state, entry.reason = UNAVAILABLE, "unloaded"
