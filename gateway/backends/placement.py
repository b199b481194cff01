"""Placing model versions on the router's targets: ``RoutedFactory``, the ``BackendFactory`` of
every deployment with ``[[hosts]]``.

Targets are the in-process ONNX Runtime (``local_execution``, on by default; never in a
Triton-only deployment) and every configured host allowed to serve the model (``models``
placement; empty: all), built from its checked spec (``gateway.routing.hosts.parse_host``):
``kind = "v2"`` hosts are ``V2Host``, ``kind = "triton"`` hosts ``TritonHost``, a ``dns`` +
``port`` entry a DNS group (``gateway.routing.discovery``). The pool
(``gateway.routing.pool``), the probes with cold-start tiers (``gateway.routing.probing``) and
the router treat every kind alike; the execute path is ``gateway.backends.routed``.

``load`` prepares a version on every host it is placed on (a push, or a readiness check);
without the local runtime a version that no host took fails to load, naming each host's
reason. Hosts change at run time (``add_host`` / ``remove_host``, behind ``POST`` and ``DELETE
/admin/hosts``): a new host is prepared with the loaded versions before it takes traffic; a
removed or replaced one takes no new batches at once, finishes those in flight (drain), then
its client is closed.

(Over 400 lines: this is where the pool, DNS discovery, probes and the router meet for loading
and for the admin API; each of those parts is a module of its own in ``gateway.routing``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from gateway.backends.base import BackendFactory, Host
from gateway.backends.hosts import build_host, configured_hosts
from gateway.backends.routed import RoutedBackend
from gateway.errors import GatewayError, HostUnreachable, ModelLoadError
from gateway.repository.config import ModelConfig
from gateway.repository.local import ModelSource
from gateway.routing import (
    HostConflict,
    OutlierDetector,
    RetryBudget,
    Router,
    UnknownHost,
    make_policy,
)
from gateway.routing.aperture import Aperture
from gateway.routing.discovery import DnsDiscovery
from gateway.routing.fds import ensure_fds
from gateway.routing.hosts import (
    LOCAL,
    DnsSpec,
    HostSpec,
    check_upstream_batching,
    kind_of,
    parse_host,
)
from gateway.routing.pool import HostEntry, HostPool
from gateway.routing.probing import Prober
from gateway.routing.report import host_metric_families
from gateway.settings import Settings, SettingsError

__all__ = ["HostEntry", "RoutedFactory"]


log = logging.getLogger(__name__)


def _model_bytes(source: ModelSource, config: ModelConfig) -> int:
    """What moving the model from the origin transfers: its versions' files and config."""
    size = len(json.dumps(config.to_dict()))
    for path in source.version_paths.values():
        with contextlib.suppress(OSError):
            size += path.stat().st_size
    return size


class RoutedFactory(BackendFactory):
    """``BackendFactory`` over the local runtime and the hosts: the pool, its DNS groups and
    probes, the router, and the admin changes that tie them together."""

    def __init__(
        self,
        settings: Settings,
        hosts: Sequence[HostEntry] | None = None,
        *,
        local: BackendFactory | None = None,
        dns_groups: Sequence[DnsSpec] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        default_bandwidth_bps: float | None = None,
        default_load_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        use_local = settings.local_execution
        if hosts is None:
            entries, groups, use_local = configured_hosts(settings, True if local else None)
        else:
            entries, groups = list(hosts), list(dns_groups or ())
        if local is None and use_local:
            from gateway.backends.onnxruntime import OnnxRuntimeFactory

            local = OnnxRuntimeFactory(settings)
        self._local = local
        self.local_capacity = settings.host_max_inflight
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
                unhealthy_threshold=settings.host_unhealthy_threshold,
                healthy_threshold=settings.host_healthy_threshold,
            ),
            budget=RetryBudget(settings.retry_budget_ratio),
            probe_interval_s=settings.host_probe_interval_s,
            probe_jitter=settings.host_probe_jitter,
            probe_rate=settings.host_probe_rate,
            probe_idle_interval_s=settings.host_probe_idle_interval_s,
            max_wait_s=settings.host_wait_s,
            default_bandwidth_bps=(
                settings.host_bandwidth_bps
                if default_bandwidth_bps is None
                else default_bandwidth_bps
            ),
            default_load_s=settings.host_load_s if default_load_s is None else default_load_s,
            aperture=Aperture(
                settings.host_aperture,
                settings.host_aperture_load,
                settings.host_aperture_coordinate
                if settings.host_aperture_coordinate >= 0
                else random.random(),
            ),
        )
        ensure_fds(len(entries))  # DNS groups are counted as they resolve
        self.pool = HostPool(self.router, settings.host_timeout_s)
        for entry in entries:
            self.pool.add(entry)
        if local is not None:
            self.router.add_target(LOCAL, capacity=self.local_capacity)
        self.discovery = DnsDiscovery(
            self.pool,
            lambda spec: build_host(spec, settings),
            self._joined,
            settings.dns_refresh_s,
        )
        for group in groups:
            self.discovery.add(group)
        self._backends: set[RoutedBackend] = set()
        self._admin = asyncio.Lock()  # one run-time host change at a time
        self._started = False
        self._shutting_down = False
        if not entries and not groups and local is None:
            raise SettingsError("routing needs local_execution or at least one host")

    # -- hosts ------------------------------------------------------------------------------

    def host_state(self, name: str) -> str:
        """``name state[: reason]`` for messages that say why no host serves a model."""
        entry = self.pool.hosts.get(name)
        if entry is None:
            return f"{name} removed"
        facts = entry.host.describe()
        state = facts.get("state") or self.router.outliers.to_dict(name).get("state", "unknown")
        reason = facts.get("reason")
        return f"{name} {state}{': ' + reason if reason else ''}"

    async def prepare_on(
        self, host: Host, source: ModelSource, version: int, config: ModelConfig
    ) -> None:
        """Make the model servable on ``host``, recording how long that took (cold start)."""
        key = f"{source.name}/{version}"
        started = self.clock()
        await host.prepare(source, version, config)
        if self.pool.current(host):  # not a host removed or replaced meanwhile
            self._record_load(host, key, self.clock() - started)

    def _record_load(self, host: Host, key: str, elapsed_s: float) -> None:
        """Ready after a prepare that took ``elapsed_s``: its load time, unless the host had it
        ready already (nothing was loaded); a push also measures the bandwidth there."""
        pushed = host.pushed_bytes(key)
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
        placed = [b for b in backends if entry.allows(b.model)]

        async def one(backend: RoutedBackend) -> tuple[bool, float | str]:
            started = self.clock()
            try:
                await entry.host.prepare(backend.source, backend.version, backend.config)
            except GatewayError as exc:
                return False, exc.message
            except Exception as exc:
                log.exception("preparing %s on %s", backend.key, entry.name)
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
                self.router.set_ready(entry.name, key, False)
                log.warning("host %s: %s not ready: %s", entry.name, key, detail)

    async def _record_later(self, entry: HostEntry, backends: Sequence[RoutedBackend]) -> None:
        """A host that joined while models were loaded (DNS discovery, or a load during an
        admin change): prepare them there in the background."""
        self._record_prepared(entry, await self._prepare_loaded(entry, backends))

    def _joined(self, entry: HostEntry) -> None:
        """A DNS member joined: the versions loaded so far go there (``load`` places the one
        it is loading)."""
        if self._backends:
            self.pool.spawn(self._record_later(entry, list(self._backends)))

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self.router.start(Prober(self.pool, lambda: list(self._backends)))
        self.discovery.start_all()

    # -- run-time changes (the admin API) ---------------------------------------------------

    def _remove_name(self, name: str) -> list[asyncio.Task[bool]]:
        """Retire the host or DNS group called ``name`` (every host it resolved to)."""
        drains = []
        entry = self.pool.hosts.get(name)
        if entry is not None:
            drains.append(self.pool.retire(entry))
        return drains + self.discovery.remove(name)

    def _check_changeable(self) -> None:
        if self._shutting_down:
            raise HostConflict("the gateway is shutting down")

    def _check_batching(self, spec: HostSpec | DnsSpec) -> None:
        """``batching = "triton"`` stays coherent after the change (``check_upstream_batching``)."""
        targets = {
            e.name: (e.name, e.host.kind, e.host.batches_upstream) for e in self.pool.hosts.values()
        }
        targets.update({g: (g, "v2", False) for g in self.discovery.groups})
        targets[spec.name] = kind_of(spec)
        check_upstream_batching(targets.values(), local=self._local is not None)

    async def add_host(self, table: object) -> dict[str, Any]:
        """Add the host (or DNS group) a host table describes, or replace the one of that name
        (placement, weight, URL ...). The loaded model versions placed on it are prepared there
        first; then it joins the pool and the one it replaces drains. ``SettingsError`` for an
        invalid table, ``HostConflict`` when no change is possible now."""
        spec = parse_host(table, self.settings, strict=True)
        self._check_batching(spec)
        if isinstance(spec, DnsSpec):
            return await self.add_entry(spec)
        return await self.add_entry(build_host(spec, self.settings))

    async def add_entry(self, spec: HostEntry | DnsSpec) -> dict[str, Any]:
        """``add_host`` for an already built host (or DNS group)."""
        async with self._admin:
            self._check_changeable()
            self._start()
            name = spec.name
            replaced = name in self.pool.hosts or name in self.discovery.groups
            if isinstance(spec, DnsSpec):
                self._remove_name(name)
                self.discovery.add(spec)
                await self.discovery.resolve(spec)  # the first resolution, reported below
                self.discovery.start(spec)
                log.info("admin: DNS group %s %s", name, "replaced" if replaced else "added")
                return {
                    "name": name,
                    "replaced": replaced,
                    "hosts": sorted(e.name for e in self.pool.members(name).values()),
                }
            backends = list(self._backends)
            results = await self._prepare_loaded(spec, backends)
            self._check_changeable()
            old = self.pool.hosts.get(name)
            self.discovery.remove(name)
            self.pool.add(spec)  # from here on it takes new batches, the one it replaces none
            if old is not None:
                self.pool.retire(old)
            self._record_prepared(spec, results)
            missed = [b for b in self._backends if b not in backends]
            if missed:  # loaded while we prepared: not placed there by load()
                self.pool.spawn(self._record_later(spec, missed))
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
            if name not in self.pool.hosts and name not in self.discovery.groups:
                raise UnknownHost(f"no host or DNS group named {name[:200]!r}")
            group = self.discovery.member_of(name)
            if group is not None:
                raise HostConflict(
                    f"host {name!r} was found through DNS group {group!r}: remove the group"
                )
            entries = [self.pool.hosts[name]] if name in self.pool.hosts else []
            if name in self.discovery.groups:
                entries += list(self.pool.members(name).values())
            in_flight = sum(e.target.in_flight for e in entries if e.target is not None)
            drains = self._remove_name(name)
            log.info("admin: host %s removed, %d batches in flight drain", name, in_flight)
        result: dict[str, Any] = {
            "name": name,
            "hosts": sorted(e.name for e in entries),
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
        """Load locally (when local execution is on) and prepare the version on every host it
        is placed on. Without the local runtime, a version no host took fails to load, with
        each host's reason; a host that was unreachable gets it when it is back."""
        self._start()
        await self.discovery.resolve_unresolved()  # the first resolution, before placing
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
        hosts = [e.host for e in self.pool.hosts.values() if e.allows(source.name)]
        results = await asyncio.gather(
            *(self.prepare_on(h, source, version, config) for h in hosts), return_exceptions=True
        )
        failures = []
        for host, result in zip(hosts, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, GatewayError):
                    raise result
                if self.pool.current(host):
                    self.router.set_ready(host.name, key, False)
                failures.append(f"{host.name}: {result.message}")
        if local is None and not any(r is None for r in results):
            if not any(b.model == source.name for b in self._backends):
                for host, result in zip(hosts, results, strict=True):
                    if isinstance(result, HostUnreachable):
                        await host.release(source.name)  # give up its pending registration
            kinds = {h.kind for h in hosts}
            where = "Triton host" if kinds == {"triton"} else "host"
            raise ModelLoadError(
                f"model '{source.name}' version {version} could not be loaded on any {where}: "
                + "; ".join(failures or ["no host is configured for it"])
            )
        for failure in failures:
            log.warning("model %s version %s: %s", source.name, version, failure)
        self.router.set_model_bytes(key, await asyncio.to_thread(_model_bytes, source, config))
        backend = RoutedBackend(self, source, version, config, local)
        self._backends.add(backend)
        return backend

    async def backend_closed(self, backend: RoutedBackend) -> None:
        """The last version of a model closed: release it on the hosts (not on shutdown: other
        gateway replicas may be using what is there)."""
        self._backends.discard(backend)
        if not self._shutting_down:
            if not any(b.model == backend.model for b in self._backends):
                for entry in list(self.pool.hosts.values()):
                    await entry.host.release(backend.model)
        elif not self._backends:
            await self._close_hosts()

    async def close(self) -> None:
        """Gateway shutdown: hosts close with the last backend, after the data plane drained."""
        self._shutting_down = True
        if not self._backends:
            await self._close_hosts()

    async def _close_hosts(self) -> None:
        await self.router.close()
        self.discovery.close()
        await self.pool.close()

    def table(self, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        """The host table for ``GET /admin/hosts``: hosts ``offset`` to ``offset + limit``
        (all when ``limit`` is None)."""
        table = self.router.table(offset, limit)
        for row in table["hosts"]:
            entry = self.pool.hosts.get(row["name"])
            row["host"] = entry.host.describe() if entry is not None else {"kind": "local"}
        table["dns_groups"] = self.discovery.table()
        return table

    def metric_families(self) -> list[Any]:
        """Per-host routing state for ``/metrics``: in flight, outcomes, ejection, estimates."""
        return host_metric_families(self.router, self.settings.metrics_host_series_max)
