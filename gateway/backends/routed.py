"""Serving each model version on several targets, picked per batch by ``gateway.routing``.

Targets are the in-process ONNX Runtime (``local_execution``, on by default) and every
configured ``[[hosts]]`` entry allowed to serve the model (``models`` placement; empty: all):
``kind = "v2"`` hosts are ``V2Host`` (another gateway node or any v2 server), ``kind =
"triton"`` hosts are ``gateway.backends.triton.TritonHost`` when that module is importable. A
``v2`` entry with ``dns`` + ``port`` instead of ``url`` is re-resolved every ``dns_refresh_s``,
one host per address.

Hosts change at run time (``add_host`` / ``remove_host``, behind ``POST`` and ``DELETE
/admin/hosts``): a new host is prepared with the loaded model versions before it takes traffic;
a removed or replaced one takes no new batches at once, finishes those in flight (drain), then
its client is closed.

Per batch, ``RoutedBackend.execute`` asks the router for a target (policy, health, in-flight
caps, predictive admission against the deadline), runs there with the remaining deadline, and
on ``HostUnreachable`` or a 503 tries once more on another target when the deadline and the
retry budget allow.

Cold starts are priced by tier (``gateway.routing.tiers``): each probe of a v2 host also asks
its repository index (one call per host) where each loaded model version is there (``loaded``,
``cached``, only at the ``origin``); a push measures the bandwidth to that host; the model's
size is known at load. ``GET /admin/hosts`` shows the tier and its cost per host and model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import socket
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway import context
from gateway.backends.base import Backend, BackendFactory, Host, Tensors, check_answer
from gateway.backends.remote import V2Host
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    HostUnreachable,
    ModelLoadError,
    ModelNotReady,
    Overloaded,
    Unavailable,
)
from gateway.repository.config import ModelConfig
from gateway.repository.local import ModelSource
from gateway.routing import (
    FAILURE,
    NEUTRAL,
    SUCCESS,
    HostConflict,
    Lease,
    OutlierDetector,
    RetryBudget,
    Router,
    TargetState,
    UnknownHost,
    check_host_table,
    make_policy,
)
from gateway.routing.hosts import LOCAL
from gateway.routing.tiers import LOADED, HostModel, tier_for
from gateway.settings import Settings, SettingsError

__all__ = [
    "LOCAL",
    "DnsGroup",
    "HostEntry",
    "RoutedBackend",
    "RoutedFactory",
    "configured_hosts",
    "host_from_table",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class HostEntry:
    """One configured host and how the router should treat it."""

    host: Host
    models: frozenset[str] | None = None
    weight: float = 1.0
    max_inflight: int = 16
    target: TargetState | None = None  # its router state, once added


@dataclass(frozen=True, slots=True)
class DnsGroup:
    """A ``[[hosts]]`` entry discovered through DNS: one ``V2Host`` per resolved address."""

    name: str
    dns: str
    port: int
    table: dict[str, Any]


def _models(table: Mapping[str, Any]) -> frozenset[str] | None:
    models = table.get("models")
    return frozenset(models) if models else None


def _v2_host(name: str, url: str, table: Mapping[str, Any], settings: Settings) -> HostEntry:
    return HostEntry(
        V2Host(
            name,
            url,
            labels=frozenset(str(v) for v in table.get("labels", ())),
            push=bool(table.get("push", False)),
            conn_limit=int(table.get("conn_limit", 64)),
            timeout_s=settings.host_timeout_s,
        ),
        _models(table),
        float(table.get("weight", 1.0)),
        int(table.get("max_inflight", settings.host_max_inflight)),
    )


def _gateway_batches(host: Host, where: str) -> None:
    """Routed batches are formed (and wait) here, whichever target gets them; a Triton host
    told to wait as well would pay the queue delay twice."""
    if getattr(host, "batching", "gateway") != "gateway":
        raise SettingsError(
            f"{where}: batching = 'triton' is for Triton-only deployments; when the gateway "
            f"routes, it batches before choosing a host (use 'gateway')"
        )


def _triton_host(table: Mapping[str, Any], settings: Settings) -> HostEntry:
    from gateway.backends.triton import triton_hosts

    ((host, models),) = triton_hosts(dataclasses.replace(settings, hosts=(table,)))
    _gateway_batches(host, "hosts[0]")
    return HostEntry(
        host,
        models,
        float(table.get("weight", 1.0)),
        int(table.get("max_inflight", settings.host_max_inflight)),
    )


def host_from_table(
    table: object, settings: Settings, where: str = "host", *, strict: bool = True
) -> HostEntry | DnsGroup:
    """One host (or DNS group) from a host table; ``SettingsError`` naming the field when the
    table is not valid (``gateway.routing.check_host_table``)."""
    checked = check_host_table(table, where, strict=strict)
    name = str(checked["name"])
    if checked["kind"] == "triton":
        try:
            return _triton_host(checked, settings)
        except SettingsError as exc:  # triton_hosts counts tables: say which one it was
            raise SettingsError(exc.message.replace("hosts[0]", where)) from None
    if checked.get("dns") is not None:
        return DnsGroup(name, str(checked["dns"]), int(checked["port"]), checked)
    return _v2_host(name, str(checked["url"]), checked, settings)


def configured_hosts(settings: Settings) -> tuple[list[HostEntry], list[DnsGroup]]:
    """Static hosts (v2 and, when importable, Triton) and DNS groups from ``settings.hosts``."""
    entries: list[HostEntry] = []
    groups: list[DnsGroup] = []
    triton_tables: list[dict[str, Any]] = []
    for i, raw in enumerate(settings.hosts):
        table = check_host_table(raw, f"hosts[{i}]")
        if table["kind"] == "triton":
            triton_tables.append(table)
        elif table.get("dns") is not None:
            groups.append(DnsGroup(str(table["name"]), table["dns"], table["port"], table))
        else:
            entries.append(_v2_host(str(table["name"]), table["url"], table, settings))
    if triton_tables:
        from gateway.backends.triton import triton_hosts

        for (host, models), table in zip(triton_hosts(settings), triton_tables, strict=True):
            _gateway_batches(host, f"Triton host {host.name}")
            entries.append(
                HostEntry(
                    host,
                    models,
                    float(table.get("weight", 1.0)),
                    int(table.get("max_inflight", settings.host_max_inflight)),
                )
            )
    names = [e.host.name for e in entries] + [g.name for g in groups]
    if len(set(names)) != len(names) or LOCAL in names:
        raise SettingsError(f"host names must be unique and not '{LOCAL}', got {names}")
    return entries, groups


def _model_bytes(source: ModelSource, config: ModelConfig) -> int:
    """What moving the model from the origin transfers: its versions' files and config."""
    size = len(json.dumps(config.to_dict()))
    for path in source.version_paths.values():
        with contextlib.suppress(OSError):
            size += path.stat().st_size
    return size


class RoutedBackend:
    """One model version served by the router's targets."""

    def __init__(
        self,
        factory: RoutedFactory,
        source: ModelSource,
        version: int,
        config: ModelConfig,
        local: Backend | None,
    ) -> None:
        self._factory = factory
        self._source = source
        self._version = version
        self._config = config
        self._local = local
        self.key = f"{source.name}/{version}"

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def source(self) -> ModelSource:
        return self._source

    @property
    def version(self) -> int:
        return self._version

    @property
    def instance_count(self) -> int:
        return max(1, self._factory.router.capacity_for(self._source.name))

    def _rows(self, inputs: Tensors) -> int:
        if not self._config.batched or not inputs:
            return 1
        return int(next(iter(inputs.values())).shape[0])

    async def execute(
        self, inputs: Tensors, outputs: Sequence[str], deadline_s: float | None = None
    ) -> Tensors:
        router = self._factory.router
        rows = self._rows(inputs)
        router.budget.start_request()
        try:
            lease = await router.acquire(self._source.name, self.key, rows, deadline_s)
            try:
                return await self._run(lease, inputs, outputs, deadline_s)
            except Unavailable as exc:
                if not self._retryable(deadline_s) or not router.budget.try_retry():
                    raise
                first, original = lease.name, exc
            try:
                try:
                    retry = await router.acquire(
                        self._source.name, self.key, rows, deadline_s, exclude=(first,)
                    )
                except Unavailable:
                    raise original from None  # nowhere else to go: report the original failure
                log.info("retrying %s on %s after %s failed", self.key, retry.name, first)
                return await self._run(retry, inputs, outputs, deadline_s)
            finally:
                router.budget.end_retry()
        finally:
            router.budget.end_request()

    def _retryable(self, deadline_s: float | None) -> bool:
        # A host's 429 / 503 / unreachable / not-ready is worth one more try elsewhere, while
        # time is left; the router's own refusals are raised before any host is tried.
        return deadline_s is None or deadline_s - self._factory.clock() > 0

    async def _run(
        self, lease: Lease, inputs: Tensors, outputs: Sequence[str], deadline_s: float | None
    ) -> Tensors:
        context.executed_on.set(lease.name)
        try:
            if lease.name == LOCAL:
                assert self._local is not None
                result = await self._local.execute(inputs, outputs, deadline_s)
            else:
                host = self._factory.host_for(lease.target)
                if not lease.target.ready.get(self.key, False):
                    await self._factory.prepare_on(host, self._source, self._version, self._config)
                timeout_s = None if deadline_s is None else deadline_s - self._factory.clock()
                result = await host.infer(
                    self._source.name, self._version, inputs, outputs, timeout_s
                )
                check_answer(lease.name, self._config, inputs, outputs, result)
        except (HostUnreachable, ModelNotReady) as exc:
            if isinstance(exc, ModelNotReady):
                self._factory.router.set_ready(lease.name, self.key, False)
                lease.finish(NEUTRAL)
            else:
                lease.finish(FAILURE)
            raise
        except Overloaded:
            lease.finish(NEUTRAL)
            raise
        except (Unavailable, DeadlineExceeded) as exc:
            lease.finish(FAILURE if isinstance(exc, Unavailable) else NEUTRAL)
            raise
        except GatewayError as exc:
            # A host's 5xx counts against it; input the model rejects does not.
            lease.finish(FAILURE if type(exc) is GatewayError else NEUTRAL)
            raise
        except BaseException:
            lease.finish(NEUTRAL)
            raise
        lease.finish(SUCCESS)
        return result

    async def close(self) -> None:
        if self._local is not None:
            await self._local.close()
        await self._factory.backend_closed(self)

    def describe(self) -> dict[str, Any]:
        targets = [t for t in self._factory.router.targets.values() if t.allows(self._source.name)]
        return {
            "backend": "routed",
            "policy": self._factory.router.policy.name,
            "targets": [t.name for t in targets],
        }


class RoutedFactory:
    """``BackendFactory`` over the local runtime and the configured hosts."""

    def __init__(
        self,
        settings: Settings,
        hosts: Sequence[HostEntry] | None = None,
        *,
        local: BackendFactory | None = None,
        dns_groups: Sequence[DnsGroup] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        default_bandwidth_bps: float | None = None,
        default_load_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        if hosts is None:
            entries, groups = configured_hosts(settings)
        else:
            entries, groups = list(hosts), list(dns_groups or ())
        if local is None and settings.local_execution:
            from gateway.backends.onnxruntime import OnnxRuntimeFactory

            local = OnnxRuntimeFactory(settings)
        self._local = local
        try:
            policy = make_policy(settings.routing_policy, rng)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        self.router = Router(
            policy,
            clock=clock,
            outliers=OutlierDetector(
                base_ejection_s=settings.ejection_base_s,
                max_ejected_fraction=settings.max_ejected_fraction,
                clock=clock,
            ),
            budget=RetryBudget(settings.retry_budget_ratio),
            probe_interval_s=settings.host_probe_interval_s,
            max_wait_s=settings.host_wait_s,
            default_bandwidth_bps=(
                settings.host_bandwidth_bps
                if default_bandwidth_bps is None
                else default_bandwidth_bps
            ),
            default_load_s=settings.host_load_s if default_load_s is None else default_load_s,
        )
        self._hosts: dict[str, HostEntry] = {}
        self._draining: list[HostEntry] = []  # removed or replaced, batches still in flight
        for entry in entries:
            self._add(entry)
        if local is not None:
            self.router.add_target(LOCAL, capacity=settings.host_max_inflight)
        self._groups: dict[str, DnsGroup] = {g.name: g for g in groups}
        self._discovery: dict[str, asyncio.Task[None]] = {}  # DNS group name -> its loop
        self._backends: set[RoutedBackend] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._admin = asyncio.Lock()  # one run-time host change at a time
        self._started = False
        self._shutting_down = False
        if not self._hosts and not groups and local is None:
            raise SettingsError("routing needs local_execution or at least one host")

    # -- hosts ------------------------------------------------------------------------------

    def _add(self, entry: HostEntry) -> None:
        """Into the table and the router; one of the same name is replaced (the caller drains
        the old entry)."""
        self._hosts[entry.host.name] = entry
        entry.target = self.router.add_target(
            entry.host.name,
            weight=entry.weight,
            capacity=entry.max_inflight,
            models=entry.models,
        )

    def host(self, name: str) -> Host:
        return self._hosts[name].host

    def host_for(self, target: TargetState) -> Host:
        """The host behind a lease's target, also when it was removed or replaced since (its
        batches in flight finish on the host they were leased on)."""
        entry = self._hosts.get(target.name)
        if entry is not None and entry.target is target:
            return entry.host
        for entry in self._draining:
            if entry.target is target:
                return entry.host
        raise UnknownHost(f"host {target.name} is not in the table")

    def _current(self, host: Host) -> bool:
        entry = self._hosts.get(host.name)
        return entry is not None and entry.host is host

    async def prepare_on(
        self, host: Host, source: ModelSource, version: int, config: ModelConfig
    ) -> None:
        """Make the model servable on ``host``, recording how long that took (cold start)."""
        key = f"{source.name}/{version}"
        started = self.clock()
        await host.prepare(source, version, config)
        if self._current(host):  # not a host removed or replaced meanwhile
            self._record_load(host, key, self.clock() - started)

    def _record_load(self, host: Host, key: str, elapsed_s: float) -> None:
        """Ready after a prepare that took ``elapsed_s``: its load time, unless the host had it
        ready already (nothing was loaded); a push also measures the bandwidth there."""
        pushed = host.pushed_bytes.get(key) if isinstance(host, V2Host) else None
        if pushed == 0:
            self.router.set_ready(host.name, key, True)
            return
        if pushed:
            self.router.observe_transfer(host.name, pushed, elapsed_s)
        self.router.set_ready(host.name, key, True, load_s=elapsed_s)

    async def _prepare_loaded(
        self, entry: HostEntry, backends: Sequence[RoutedBackend]
    ) -> dict[str, tuple[bool, float | str]]:
        """Prepare the loaded versions placed on ``entry`` there: key -> (ready, load time or
        why not). Nothing is recorded in the router: the entry may not be in it yet."""
        placed = [b for b in backends if entry.models is None or b.config.name in entry.models]

        async def one(backend: RoutedBackend) -> tuple[bool, float | str]:
            started = self.clock()
            try:
                await entry.host.prepare(backend.source, backend.version, backend.config)
            except GatewayError as exc:
                return False, exc.message
            except Exception as exc:
                log.exception("preparing %s on %s", backend.key, entry.host.name)
                return False, f"{type(exc).__name__}: {exc}"
            return True, self.clock() - started

        results = await asyncio.gather(*(one(b) for b in placed))
        return {b.key: r for b, r in zip(placed, results, strict=True)}

    def _record_prepared(self, entry: HostEntry, results: dict[str, tuple[bool, Any]]) -> None:
        if entry.target is None or not self.router.is_current(entry.target):
            return
        for key, (ok, detail) in results.items():
            if ok:
                self._record_load(entry.host, key, float(detail))
            else:
                self.router.set_ready(entry.host.name, key, False)
            if not ok:
                log.warning("host %s: %s not ready: %s", entry.host.name, key, detail)

    async def _record_later(self, entry: HostEntry, backends: Sequence[RoutedBackend]) -> None:
        """A host that joined while models were loaded (DNS discovery, or a load during an
        admin change): prepare them there in the background."""
        self._record_prepared(entry, await self._prepare_loaded(entry, backends))

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _retire(self, entry: HostEntry) -> asyncio.Task[bool]:
        """Out of the table and the pool at once (if not replaced already); close its client
        once the batches in flight on it have finished."""
        if self._hosts.get(entry.host.name) is entry:
            del self._hosts[entry.host.name]
            self.router.remove_target(entry.host.name)
        self._draining.append(entry)
        return self._spawn(self._drain_and_close(entry))

    async def _drain_and_close(self, entry: HostEntry) -> bool:
        """Whether every batch in flight there finished before the client closed."""
        drained = True
        try:
            if entry.target is not None:
                drained = await self.router.drained(entry.target, self.settings.host_timeout_s)
            if not drained:
                assert entry.target is not None
                log.warning(
                    "host %s: %d batches still in flight after %.0f s; closing it",
                    entry.host.name,
                    entry.target.in_flight,
                    self.settings.host_timeout_s,
                )
        finally:
            self._draining = [e for e in self._draining if e is not entry]
            await entry.host.close()
            log.info("host %s removed", entry.host.name)
        return drained

    async def _probe(self, name: str) -> bool:
        if name == LOCAL:
            return True
        entry = self._hosts.get(name)
        if entry is None:
            return False
        if not await entry.host.ready():
            return False
        target = self.router.targets.get(name)
        index = None
        if target is not None and isinstance(entry.host, V2Host) and self._backends:
            # One call for every model there; a slow answer must not fail the health probe.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.router.probe_timeout_s / 2):
                    index = await entry.host.repository_index()
        if target is not None and index is not None:
            if self._current(entry.host):
                for backend in list(self._backends):
                    if target.allows(backend.config.name):
                        model = tier_for(index, backend.source.name, backend.version)
                        if model.tier != LOADED and target.ready.get(backend.key):
                            # Gone? Ask the model itself before believing an index (rare).
                            if await entry.host.model_ready(backend.source.name, backend.version):
                                model = HostModel(LOADED)
                            if not self._current(entry.host):
                                return True
                        self.router.set_tier(name, backend.key, model)
        elif target is not None:
            for backend in list(self._backends):
                if target.allows(backend.config.name) and not target.ready.get(backend.key):
                    ok = await entry.host.model_ready(backend.source.name, backend.version)
                    if self._current(entry.host):
                        self.router.set_ready(name, backend.key, ok)
        return True

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self.router.start(self._probe)
        for group in self._groups.values():
            self._discovery[group.name] = self._spawn(self._discover(group))

    def _members(self, group: str) -> dict[str, HostEntry]:
        """The hosts DNS group ``group`` resolved to, by address."""
        prefix = f"{group}@"
        return {n[len(prefix) :]: e for n, e in self._hosts.items() if n.startswith(prefix)}

    async def _resolve(self, group: DnsGroup) -> None:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(group.dns, group.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("DNS %s: %s (keeping the hosts we had)", group.dns, exc)
            return
        if self._groups.get(group.name) is not group:
            return  # removed or replaced while resolving
        urls = {}
        for info in infos:
            ip = str(info[4][0])
            urls[f"{ip}:{group.port}"] = (
                f"http://[{ip}]:{group.port}" if ":" in ip else f"http://{ip}:{group.port}"
            )
        addresses = set(urls)
        current = self._members(group.name)
        for address in sorted(addresses - set(current)):
            entry = _v2_host(f"{group.name}@{address}", urls[address], group.table, self.settings)
            self._add(entry)
            if self._backends:  # the versions loaded so far; load() places the one it loads
                self._spawn(self._record_later(entry, list(self._backends)))
            log.info("DNS %s: added host %s", group.dns, address)
        for address in set(current) - addresses:
            self._retire(current[address])
            log.info("DNS %s: removed host %s", group.dns, address)

    async def _discover(self, group: DnsGroup) -> None:
        while True:
            await self._resolve(group)
            await asyncio.sleep(self.settings.dns_refresh_s)

    # -- run-time changes (the admin API) ---------------------------------------------------

    def _remove_name(self, name: str) -> list[asyncio.Task[bool]]:
        """Retire the host or DNS group called ``name`` (every host it resolved to)."""
        drains = []
        entry = self._hosts.get(name)
        if entry is not None:
            drains.append(self._retire(entry))
        group = self._groups.pop(name, None)
        if group is not None:
            task = self._discovery.pop(name, None)
            if task is not None:
                task.cancel()
            drains += [self._retire(e) for e in self._members(name).values()]
        return drains

    def _check_changeable(self) -> None:
        if self._shutting_down:
            raise HostConflict("the gateway is shutting down")

    async def add_host(self, table: object) -> dict[str, Any]:
        """Add the host (or DNS group) a host table describes, or replace the one of that name
        (placement, weight, URL ...). The loaded model versions placed on it are prepared there
        first; then it joins the pool and the one it replaces drains. ``SettingsError`` for an
        invalid table, ``HostConflict`` when no change is possible now."""
        return await self.add_entry(host_from_table(table, self.settings, strict=True))

    async def add_entry(self, spec: HostEntry | DnsGroup) -> dict[str, Any]:
        """``add_host`` for an already built host (or DNS group)."""
        async with self._admin:
            self._check_changeable()
            self._start()
            name = spec.name if isinstance(spec, DnsGroup) else spec.host.name
            replaced = name in self._hosts or name in self._groups
            if isinstance(spec, DnsGroup):
                self._remove_name(name)
                self._groups[name] = spec
                await self._resolve(spec)  # the first resolution, reported below
                self._discovery[name] = self._spawn(self._discover(spec))
                members = self._members(name)
                log.info("admin: DNS group %s %s", name, "replaced" if replaced else "added")
                return {
                    "name": name,
                    "replaced": replaced,
                    "hosts": sorted(e.host.name for e in members.values()),
                }
            backends = list(self._backends)
            results = await self._prepare_loaded(spec, backends)
            self._check_changeable()
            old = self._hosts.get(name)
            if name in self._groups:
                self._remove_name(name)
            self._add(spec)  # from here on it takes new batches, the one it replaces none
            if old is not None:
                self._retire(old)
            self._record_prepared(spec, results)
            missed = [b for b in self._backends if b not in backends]
            if missed:  # loaded while we prepared: not placed there by load()
                self._spawn(self._record_later(spec, missed))
            log.info("admin: host %s %s", name, "replaced" if replaced else "added")
            return {
                "name": name,
                "replaced": replaced,
                "models": {
                    key: {"ready": True, "load_s": round(float(detail), 6)}
                    if ok
                    else {"ready": False, "error": str(detail)}
                    for key, (ok, detail) in sorted(results.items())
                },
            }

    async def remove_host(self, name: str, *, wait: bool = False) -> dict[str, Any]:
        """Remove a host (or DNS group): no new batches from now on, those in flight finish,
        then its client closes. ``wait``: return once that happened (at most
        ``host_timeout_s``). ``UnknownHost`` when there is none of that name."""
        async with self._admin:
            self._check_changeable()
            if name == LOCAL:
                raise HostConflict("the local runtime is not a host (see local_execution)")
            if name not in self._hosts and name not in self._groups:
                raise UnknownHost(f"no host or DNS group named {name[:200]!r}")
            group, _, _ = name.partition("@")
            if group != name and group in self._groups:
                raise HostConflict(
                    f"host {name!r} was found through DNS group {group!r}: remove the group"
                )
            entries = [self._hosts[name]] if name in self._hosts else []
            entries += list(self._members(name).values()) if name in self._groups else []
            in_flight = sum(e.target.in_flight for e in entries if e.target is not None)
            drains = self._remove_name(name)
            log.info("admin: host %s removed, %d batches in flight drain", name, in_flight)
        result: dict[str, Any] = {
            "name": name,
            "hosts": sorted(e.host.name for e in entries),
            "in_flight": in_flight,
        }
        if wait and drains:
            done, _ = await asyncio.wait(drains, timeout=self.settings.host_timeout_s + 5.0)
            result["drained"] = len(done) == len(drains) and all(
                not t.cancelled() and t.exception() is None and t.result() for t in done
            )
        elif wait:
            result["drained"] = True
        return result

    # -- BackendFactory ---------------------------------------------------------------------

    async def load(self, source: ModelSource, version: int) -> RoutedBackend:
        self._start()
        for group in list(self._groups.values()):  # the first resolution, before placing
            if not self._members(group.name):
                await self._resolve(group)
        key = f"{source.name}/{version}"
        local = await self._local.load(source, version) if self._local is not None else None
        if local is not None:
            config = local.config
            self.router.set_ready(LOCAL, key, True)
        else:
            from gateway.backends.onnxruntime import inspect_config  # reads the graph only

            config = await asyncio.to_thread(
                inspect_config, source, version, self.settings.default_max_batch_size
            )
        hosts = [
            e.host for e in self._hosts.values() if e.models is None or source.name in e.models
        ]
        results = await asyncio.gather(
            *(self.prepare_on(h, source, version, config) for h in hosts), return_exceptions=True
        )
        failures = []
        for host, result in zip(hosts, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, GatewayError):
                    raise result
                if self._current(host):
                    self.router.set_ready(host.name, key, False)
                failures.append(f"{host.name}: {result.message}")
        placed = sum(r is None for r in results)
        if (
            local is None
            and not placed
            and not any(isinstance(r, HostUnreachable) for r in results)
        ):
            raise ModelLoadError(
                f"model '{source.name}' version {version} is not servable on any host: "
                + "; ".join(failures or ["no host is configured for it"])
            )
        for failure in failures:
            log.warning("model %s version %s: %s", source.name, version, failure)
        self.router.set_model_bytes(key, await asyncio.to_thread(_model_bytes, source, config))
        backend = RoutedBackend(self, source, version, config, local)
        self._backends.add(backend)
        return backend

    async def backend_closed(self, backend: RoutedBackend) -> None:
        self._backends.discard(backend)
        if not self._shutting_down:
            name = backend.config.name
            if not any(b.config.name == name for b in self._backends):
                for entry in list(self._hosts.values()):
                    await entry.host.release(name)
        elif not self._backends:
            await self._close_hosts()

    async def close(self) -> None:
        """Gateway shutdown: hosts close with the last backend, after the data plane drained."""
        self._shutting_down = True
        if not self._backends:
            await self._close_hosts()

    async def _close_hosts(self) -> None:
        await self.router.close()
        for task in list(self._tasks):  # DNS loops, preparations; drains close their host
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._discovery.clear()
        await asyncio.gather(
            *(e.host.close() for e in [*self._hosts.values(), *self._draining]),
            return_exceptions=True,
        )

    def table(self) -> dict[str, Any]:
        """The host table for ``GET /admin/hosts``."""
        table = self.router.table()
        for row in table["hosts"]:
            entry = self._hosts.get(row["name"])
            row["host"] = entry.host.describe() if entry is not None else {"kind": "local"}
        table["dns_groups"] = [
            {
                "name": g.name,
                "dns": g.dns,
                "port": g.port,
                "hosts": sorted(e.host.name for e in self._members(g.name).values()),
            }
            for g in self._groups.values()
        ]
        return table

    def metric_families(self) -> list[Any]:
        """Per-host routing state for ``/metrics``: in flight, outcomes, ejection, estimates."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        table = self.router.table()
        in_flight = GaugeMetricFamily(
            "gateway_host_in_flight", "Batches in flight on a host", labels=["host"]
        )
        outcomes = CounterMetricFamily(
            "gateway_host_batches", "Batches sent to a host, by outcome", labels=["host", "outcome"]
        )
        up = GaugeMetricFamily(
            "gateway_host_up", "1: the host takes traffic (not ejected or down)", labels=["host"]
        )
        ejections = CounterMetricFamily(
            "gateway_host_ejections", "Times a host was ejected", labels=["host"]
        )
        estimate = GaugeMetricFamily(
            "gateway_host_latency_estimate_seconds",
            "Peak-EWMA latency estimate per host and model version",
            labels=["host", "model"],
        )
        for row in table["hosts"]:
            host = row["name"]
            in_flight.add_metric([host], row["in_flight"])
            outcomes.add_metric([host, "success"], row["completed"])
            outcomes.add_metric([host, "failure"], row["failed"])
            up.add_metric([host], 1.0 if row["state"] == "up" else 0.0)
            ejections.add_metric([host], row["times_ejected"])
            for key, model in row["models"].items():
                estimate.add_metric([host, key], model["peak_ewma_s"])
        budget = table["retry_budget"]
        retries = CounterMetricFamily(
            "gateway_retries", "Retries on another host, by budget decision", labels=["decision"]
        )
        retries.add_metric(["granted"], budget["granted"])
        retries.add_metric(["denied"], budget["denied"])
        return [in_flight, outcomes, up, ejections, estimate, retries]
