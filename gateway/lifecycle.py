"""The model life cycle: which model versions are loaded, and loading, reloading and unloading
them.

What it owns: one ``ModelEntry`` per model name (state, reason, the loaded versions, the lock
that orders its loads and unloads, files pushed with a load, the override config a plain reload
keeps) and, per loaded version, a ``LoadedVersion`` (its backend, batcher and counters, the
batcher's policy made from the config); ``load`` / ``unload`` as Triton's repository extension
has them, loads on first use (an edge's pulls: concurrent requests share one load, ``loaded``
waits for it within a deadline), background reloads, drain at shutdown, and the repository index.

Why a module of its own: inference (``gateway.dataplane``) only reads what is loaded here
(``resolve``) and asks for a first-use load (``cold``, ``loaded``); the life cycle knows nothing
of requests. The data plane holds one ``ModelLifecycle`` and passes its own collaborators in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.backends.base import Backend, BackendFactory
from gateway.batching import Batcher, BatchPolicy, QueuePolicy
from gateway.ensemble import EnsembleBackend
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    Unavailable,
)
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
from gateway.settings import Settings
from gateway.stats import ModelStats

# Loads were logged by the data plane before the life cycle had a module of its own: operators
# filter on the name, so it stays.
log = logging.getLogger("gateway.dataplane")

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


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


class ModelLifecycle:
    """The loaded model versions by name, and their loads and unloads."""

    def __init__(
        self,
        settings: Settings,
        repository: LocalRepository,
        factory: BackendFactory,
        clock: Callable[[], float],
    ) -> None:
        """``clock`` (monotonic seconds) times batching and a first-use load's deadline."""
        self.settings = settings
        self.repository = repository
        self.factory = factory
        self.clock = clock
        self.models: dict[str, ModelEntry] = {}
        self.draining = False  # shutting down: nothing new is loaded or served
        self._loads: dict[str, asyncio.Future[None]] = {}  # loads started by a request
        self._reloads: set[asyncio.Future[None]] = set()  # loads started by the repository

    # -- start and drain ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load what the settings name, else what the repository starts with; a model that
        fails is logged and left unavailable."""
        names = list(self.settings.load_models) or await self.repository.startup_names()
        await asyncio.gather(*(self._load_quietly(name) for name in names))

    async def _load_quietly(self, name: str) -> None:
        try:
            await self.load(name)
        except GatewayError as exc:
            log.error("%s", exc.message)  # "failed to load '<name>', <why>"

    async def stop(self) -> None:
        """Drain: refuse new loads, finish queued and running batches, release backends."""
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

    # -- what is loaded -----------------------------------------------------------------------

    def _entry(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            check_model_name(name)  # a name in ``models`` was checked on its way in (``load``)
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

    # -- loading on first use (edge repositories) -------------------------------------------

    def cold(self, name: str) -> bool:
        """Loading (or to be loaded) on first use: a request for it waits or is forwarded."""
        return name in self._loads or self._wants_load(name)

    def _wants_load(self, name: str) -> bool:
        entry = self.models.get(name)
        if entry is not None and (entry.versions or entry.reason == "unloaded"):
            return False
        return not self.draining and self.repository.on_demand(check_model_name(name))

    def load_soon(self, name: str) -> asyncio.Future[None]:
        """The first-use load of ``name``: the one running, else a new one (shared by every
        request that waits for it, and by the forwarder's meanwhile)."""
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

    async def loaded(
        self, name: str, version: str | None, deadline_s: float | None
    ) -> LoadedVersion:
        """The version to serve once a first-use load is over, waited for until the deadline:
        concurrent cold requests share one load, so one download."""
        if self.cold(name):
            future = self.load_soon(name)
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
        return self.resolve(name, version)

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


__all__ = [
    "LOADING",
    "READY",
    "UNAVAILABLE",
    "UNLOADING",
    "LoadedVersion",
    "ModelEntry",
    "ModelLifecycle",
]
