"""Where the parts meet: the one data plane behind every front end (REST now, gRPC later).

It owns the set of loaded model versions, validates requests against each model's config,
feeds the per-version batchers and keeps statistics. It knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gateway import __version__, context
from gateway.backends.base import Backend, BackendFactory, Tensors
from gateway.batching import Batcher, BatchPolicy, Queued
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    QueueFull,
    Unavailable,
)
from gateway.metrics import Metrics
from gateway.protocol.types import InferRequest, InferResponse, datatype_of
from gateway.repository.config import ModelConfig, parse_json
from gateway.repository.local import (
    LocalRepository,
    ModelSource,
    check_model_name,
    is_version,
    locate_versions,
)
from gateway.settings import Settings
from gateway.stats import ModelStats

log = logging.getLogger(__name__)

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"
EXTENSIONS = ["classification", "model_repository", "statistics", "binary_tensor_data"]


@dataclass(slots=True)
class LoadedVersion:
    """One servable model version: its backend, batcher and counters."""

    version: int
    config: ModelConfig
    backend: Backend
    batcher: Batcher
    stats: ModelStats


@dataclass(slots=True)
class Started:
    """A request ``DataPlane.infer_nowait`` queued: where, and since when."""

    version: LoadedVersion
    queued: Queued
    started_ns: int


@dataclass(slots=True)
class ModelEntry:
    """What the gateway knows of one model name, loaded or not."""

    name: str
    state: str = UNAVAILABLE
    reason: str = ""
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    scratch: Path | None = None  # files pushed through the repository API

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


def failure_reason(exc: GatewayError) -> str:
    """Triton's ``reason`` label of ``nv_inference_request_failure``."""
    if isinstance(exc, QueueFull):
        return "REJECTED"
    if isinstance(exc, DeadlineExceeded):
        return "CANCELED"
    if isinstance(exc, InvalidInput):
        return "BACKEND"  # Triton counts input the model rejects as a backend failure
    return "OTHER"


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
        max_queue_delay_s=0.0
        if getattr(backend, "batches_upstream", False)
        else db.max_queue_delay_us / 1e6,
        max_queue_size=db.max_queue_size or settings.max_queue_size,
        default_timeout_s=(db.default_timeout_us / 1e6) or None,
        instance_count=backend.instance_count,
        pipeline=settings.batch_pipeline,
    )


def _check_file_key(key: str) -> str:
    """``file:<version>/<name>`` -> a safe relative path inside the model directory."""
    rel = key[len("file:") :]
    norm = posixpath.normpath(rel)
    parts = norm.split("/")
    if (
        not rel
        or "\\" in rel
        or "\x00" in rel
        or norm.startswith("/")
        or ".." in parts
        or len(parts) < 2
        or not is_version(parts[0])
    ):
        raise InvalidInput(f"invalid file path {rel[:128]!r}: expected '<version>/<file name>'")
    return norm


def _write_scratch(name: str, files: dict[str, bytes]) -> Path:
    """Files pushed with a load request, in a fresh directory laid out as a repository model."""
    paths = {_check_file_key(key): data for key, data in files.items()}
    for rel in paths:
        parent = posixpath.dirname(rel)
        while parent:
            if parent in paths:
                raise InvalidInput(f"file path '{parent}' is also a directory of '{rel}'")
            parent = posixpath.dirname(parent)
    scratch = Path(tempfile.mkdtemp(prefix=f"gateway-{name}-"))
    try:
        for rel, data in paths.items():
            target = scratch / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return scratch


def _message(exc: BaseException) -> str:
    if isinstance(exc, GatewayError):
        return exc.message
    return f"internal error ({type(exc).__name__})"


def _shape_error(name: str, cfg: ModelConfig, shape: tuple[int, ...]) -> str:
    spec = cfg.input(name)
    expected = ([-1] if cfg.batched else []) + list(spec.dims if spec else ())
    return (
        f"unexpected shape for input '{name}' for model '{cfg.name}'. "
        f"Expected {expected}, got {list(shape)}"
    )


class DataPlane:
    """ready / metadata / config / infer / load / unload / index / stats."""

    def __init__(
        self,
        settings: Settings,
        repository: LocalRepository,
        factory: BackendFactory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.repository = repository
        self.factory = factory
        self.clock = clock
        self.models: dict[str, ModelEntry] = {}
        self.metrics = Metrics(self)
        self.started = False
        self.draining = False
        self._pending: dict[str, asyncio.Future[None]] = {}  # loads started by a request
        self._reloads: set[asyncio.Future[None]] = set()  # loads started by the repository
        self.forwarder: Forwarder | None = None  # serves requests while a model is fetched

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        names = list(self.settings.load_models) or await self.repository.startup_names()
        await asyncio.gather(*(self._load_quietly(name) for name in names))
        self.started = True

    async def _load_quietly(self, name: str) -> None:
        try:
            await self.load(name)
        except GatewayError as exc:
            log.error("model %s failed to load: %s", name, exc.message)

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
        return {"name": "gateway", "version": __version__, "extensions": EXTENSIONS}

    def _entry(self, name: str) -> ModelEntry:
        check_model_name(name)
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        return entry

    def resolve(self, name: str, version: str | None = None) -> LoadedVersion:
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

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Loaded, and (for remote backends that can tell) servable somewhere right now."""
        try:
            lv = self.resolve(name, version)
        except GatewayError:
            return False
        ready = getattr(lv.backend, "ready", None)
        return bool(ready()) if callable(ready) else True

    # -- loading on first use (edge repositories) -------------------------------------------

    def _wants_load(self, name: str) -> bool:
        entry = self.models.get(name)
        if entry is not None and (entry.versions or entry.reason == "unloaded"):
            return False
        return not self.draining and self.repository.on_demand(check_model_name(name))

    def _load_soon(self, name: str) -> asyncio.Future[None]:
        future = self._pending.get(name)
        if future is None:
            future = asyncio.ensure_future(self.load(name))
            self._pending[name] = future
            future.add_done_callback(lambda f: self._load_done(name, f))
        return future

    def _load_done(self, name: str, future: asyncio.Future[None]) -> None:
        self._pending.pop(name, None)
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

    def prepare(self, name: str, version: str | None = None) -> LoadedVersion | None:
        """``resolve`` as an early check (before a body is read), except that a model the
        repository fetches on first use starts loading here instead of failing (None)."""
        if name in self._pending or self._wants_load(name):
            self._load_soon(name)
            return None
        return self.resolve(name, version)

    async def ensure(
        self, name: str, version: str | None = None, timeout_us: int | None = None
    ) -> LoadedVersion:
        """``resolve``, first waiting (within the request's timeout) for a first-use load:
        concurrent cold requests share one load, so one download."""
        if name in self._pending or self._wants_load(name):
            future = self._load_soon(name)
            try:
                async with asyncio.timeout(timeout_us / 1e6 if timeout_us else None):
                    await asyncio.shield(future)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"model '{name}' is still being fetched; the request timeout expired"
                ) from None
            except ModelLoadError:
                if name not in self.models and name not in self.repository.model_names():
                    raise ModelNotFound(
                        f"Request for unknown model: '{name}' is not found"
                    ) from None
                raise
        return self.resolve(name, version)

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        lv = self.resolve(name, version)
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
        return self.resolve(name, version).config.to_dict()

    def model_stats(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        if name:
            if version:
                return {"model_stats": [self.resolve(name, version).stats.to_dict()]}
            entry = self._entry(name)
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

    # -- inference --------------------------------------------------------------------------

    def _prepare(self, lv: LoadedVersion, request: InferRequest) -> tuple[Tensors, int]:
        cfg = lv.config
        rows = 1
        prepared: Tensors = {}
        for name, array in request.inputs.items():
            spec = cfg.input(name)
            if spec is None:
                raise InvalidInput(f"unexpected inference input '{name}' for model '{cfg.name}'")
            datatype = datatype_of(array)
            if datatype != spec.datatype:
                raise InvalidInput(
                    f"inference input '{name}' data-type is '{datatype}', but model "
                    f"'{cfg.name}' expects '{spec.datatype}'"
                )
            shape = array.shape
            dims = shape[1:] if cfg.batched else shape
            if len(dims) != len(spec.dims) or (cfg.batched and not shape):
                raise InvalidInput(_shape_error(name, cfg, shape))
            if cfg.batched:
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
                lead = (rows,) if cfg.batched else ()
                try:
                    array = array.reshape(lead + spec.reshape)
                except ValueError:
                    raise InvalidInput(
                        f"input '{name}' cannot be reshaped to {list(spec.reshape)}"
                    ) from None
            prepared[name] = array
        missing = [t.name for t in cfg.inputs if t.name not in prepared and not t.optional]
        if missing:
            raise InvalidInput(
                f"expected {len(cfg.inputs)} inputs but got {len(prepared)} inputs for model "
                f"'{cfg.name}'; missing: {', '.join(missing)}"
            )
        if request.outputs:
            for out in request.outputs:
                if cfg.output(out.name) is None:
                    raise InvalidInput(
                        f"unexpected inference output '{out.name}' for model '{cfg.name}'"
                    )
        return prepared, rows

    async def infer(self, name: str, version: str | None, request: InferRequest) -> InferResponse:
        """Validate, batch, execute, and cut this request's rows back out."""
        timeout_us = request.timeout_us
        if self.forwarder is not None and (name in self._pending or self._wants_load(name)):
            started = self.clock()
            forwarded = await self._forward(self.forwarder, name, version, request)
            if forwarded is not None:
                return forwarded
            if timeout_us:  # every target failed: wait for the local load in what is left
                spent_us = int((self.clock() - started) * 1e6)
                if spent_us >= timeout_us:
                    raise DeadlineExceeded(
                        f"model '{name}' is still being fetched; the request timeout expired"
                    )
                timeout_us -= spent_us
        if name in self._pending or self._wants_load(name):
            lv = await self.ensure(name, version, timeout_us)
        else:  # loaded (or failed): no wait
            lv = self.resolve(name, version)
        started = time.perf_counter_ns()
        try:
            inputs, rows = self._prepare(lv, request)
            timeout_us = request.timeout_us
            deadline_s = self.clock() + timeout_us / 1e6 if timeout_us else None
            outputs = await lv.batcher.submit(inputs, rows, deadline_s)
        except GatewayError as exc:
            lv.stats.record_request(False, time.perf_counter_ns() - started, failure_reason(exc))
            raise
        lv.stats.record_request(True, time.perf_counter_ns() - started)
        return self._response(name, lv, request, outputs)

    def infer_nowait(
        self, lv: LoadedVersion, request: InferRequest, request_id: str | None
    ) -> Started | None:
        """The start of ``infer`` without a task, for a request to a version ``prepare`` found
        loaded and with no deadline: validated and queued, or None (use ``infer``). Raises what
        ``infer`` raises before the batch. ``infer_result`` ends it once ``queued.future`` is
        done; cancelling that future withdraws it."""
        if request.timeout_us or lv.batcher.policy.default_timeout_s:
            return None
        started = time.perf_counter_ns()
        try:
            inputs, rows = self._prepare(lv, request)
            queued = lv.batcher.enqueue(inputs, rows, None, request_id)
        except GatewayError as exc:
            lv.stats.record_request(False, time.perf_counter_ns() - started, failure_reason(exc))
            raise
        return Started(lv, queued, started)

    def infer_result(self, name: str, started: Started, request: InferRequest) -> InferResponse:
        """The response to an ``infer_nowait`` request whose future is done (not cancelled), or
        the error its batch failed with, raised."""
        lv = started.version
        future = started.queued.future
        spent_ns = time.perf_counter_ns() - started.started_ns
        exc = future.exception()
        if exc is not None:
            if isinstance(exc, GatewayError):
                lv.stats.record_request(False, spent_ns, failure_reason(exc))
            raise exc
        lv.stats.record_request(True, spent_ns)
        return self._response(name, lv, request, future.result())

    @staticmethod
    def _response(
        name: str, lv: LoadedVersion, request: InferRequest, outputs: Tensors
    ) -> InferResponse:
        """The outputs asked for (all by default), reshaped as the config says."""
        wanted = [o.name for o in request.outputs] if request.outputs else list(outputs)
        result: dict[str, np.ndarray[Any, Any]] = {}
        for out_name in wanted:
            array = outputs[out_name]
            spec = lv.config.output(out_name)
            if spec is not None and spec.reshape is not None:
                lead = (array.shape[0],) if lv.config.batched else ()
                array = array.reshape(lead + tuple(spec.dims))
            result[out_name] = array
        return InferResponse(
            model_name=name, model_version=str(lv.version), outputs=result, id=request.id
        )

    async def _forward(
        self, forwarder: Forwarder, name: str, version: str | None, request: InferRequest
    ) -> InferResponse | None:
        """Run ``request`` on another host while ``name`` loads here on first use."""
        if self.draining:
            return None
        self._load_soon(name)  # the fetch goes on meanwhile
        started = time.perf_counter_ns()
        timeout_us = request.timeout_us
        wanted = [o.name for o in request.outputs] if request.outputs else []
        result = await forwarder.infer(
            name, version, request.inputs, wanted, timeout_us / 1e6 if timeout_us else None
        )
        if result is None:
            return None
        target, served, outputs = result
        missing = [n for n in wanted if n not in outputs]
        if missing:
            raise Unavailable(f"host {target} did not return output(s) {', '.join(missing)}")
        rows = next(iter(request.inputs.values())).shape[:1] if request.inputs else ()
        context.execution.set(
            context.Execution(
                int(rows[0]) if rows else 1, 0, time.perf_counter_ns() - started, target
            )
        )
        chosen = {n: outputs[n] for n in wanted} if wanted else outputs
        return InferResponse(
            model_name=name, model_version=str(served), outputs=chosen, id=request.id
        )

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
        repository does not know (unknown names must not grow state)."""
        check_model_name(name)
        entry = self.models.setdefault(name, ModelEntry(name))
        async with entry.lock:
            if self.models.get(name) is not entry:  # forgotten while this call waited
                return await self.load(name, config_json, files)
            if not entry.versions:
                entry.state, entry.reason = LOADING, ""
            scratch: Path | None = None
            try:
                config = self._config(name, config_json)
                if files:
                    scratch = _write_scratch(name, files)
                    source = locate_versions(scratch, config or ModelConfig(name=name))
                else:
                    await self.repository.fetch(name)  # edge caches pull from their origin
                    source = self.repository.source(name, config)
                new = await self._load_versions(name, source)
            except BaseException as exc:
                if scratch is not None:
                    shutil.rmtree(scratch, ignore_errors=True)
                self._load_failed(entry, exc)
                if isinstance(exc, ModelNotFound | Unavailable) or not isinstance(
                    exc, GatewayError
                ):
                    raise  # unknown name: 404; origin down: retry later; a bug: 500
                raise ModelLoadError(exc.message) from None
            if scratch is not None or not files:
                if entry.scratch is not None:
                    shutil.rmtree(entry.scratch, ignore_errors=True)
                entry.scratch = scratch
            old = list(entry.versions.values())
            entry.versions = new
            entry.state, entry.reason = READY, ""
        if old:
            await self._retire(old)
        log.info("model %s loaded, versions %s", name, sorted(new))

    def _config(self, name: str, config_json: str | None) -> ModelConfig | None:
        if config_json is None:
            return None
        return parse_json(config_json, f"load request for '{name}'", name)

    async def _load_versions(self, name: str, source: ModelSource) -> dict[int, LoadedVersion]:
        new: dict[int, LoadedVersion] = {}
        try:
            for version in source.version_paths:
                backend = await self.factory.load(source, version)
                stats = ModelStats(name, str(version))
                batcher = Batcher(
                    backend.execute,
                    [t.name for t in backend.config.outputs],
                    _policy(backend.config, backend, self.settings),
                    stats,
                    self.clock,
                    capacity=_capacity_of(backend),
                )
                new[version] = LoadedVersion(version, backend.config, backend, batcher, stats)
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
        entry = self._entry(name)
        async with entry.lock:
            old = list(entry.versions.values())
            entry.state, entry.reason = UNLOADING, ""
            entry.versions = {}
            with contextlib.suppress(Exception):
                await self._retire(old)
            if entry.scratch is not None:  # pushed files go with the model, as in Triton
                shutil.rmtree(entry.scratch, ignore_errors=True)
                entry.scratch = None
            entry.state, entry.reason = UNAVAILABLE, "unloaded"
