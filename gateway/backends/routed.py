"""Serving each model version on several targets, picked per batch by ``gateway.routing``.

Targets are the in-process ONNX Runtime (``local_execution``, on by default) and every
configured ``[[hosts]]`` entry allowed to serve the model (``models`` placement; empty: all):
``kind = "v2"`` hosts are ``V2Host`` (another gateway node or any v2 server), ``kind =
"triton"`` hosts are ``gateway.backends.triton.TritonHost`` when that module is importable. A
``v2`` entry with ``dns`` + ``port`` instead of ``url`` is re-resolved every ``dns_refresh_s``,
one host per address.

Per batch, ``RoutedBackend.execute`` asks the router for a target (policy, health, in-flight
caps, predictive admission against the deadline), runs there with the remaining deadline, and
on ``HostUnreachable`` or a 503 tries once more on another target when the deadline and the
retry budget allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway import context
from gateway.backends.base import Backend, BackendFactory, Host, Tensors
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
    Lease,
    OutlierDetector,
    RetryBudget,
    Router,
    make_policy,
)
from gateway.settings import Settings, SettingsError

__all__ = ["LOCAL", "HostEntry", "RoutedBackend", "RoutedFactory", "configured_hosts"]

log = logging.getLogger(__name__)

LOCAL = "local"


@dataclass(slots=True)
class HostEntry:
    """One configured host and how the router should treat it."""

    host: Host
    models: frozenset[str] | None = None
    weight: float = 1.0
    max_inflight: int = 16


@dataclass(frozen=True, slots=True)
class DnsGroup:
    """A ``[[hosts]]`` entry discovered through DNS: one ``V2Host`` per resolved address."""

    name: str
    dns: str
    port: int
    table: dict[str, Any]


def _models(table: dict[str, Any], where: str) -> frozenset[str] | None:
    models = table.get("models")
    if models is None or models == []:
        return None
    if not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
        raise SettingsError(f"{where}: 'models' must be a list of model names")
    return frozenset(models)


def _v2_host(name: str, url: str, table: dict[str, Any], settings: Settings) -> HostEntry:
    return HostEntry(
        V2Host(
            name,
            url,
            labels=frozenset(str(v) for v in table.get("labels", ())),
            push=bool(table.get("push", False)),
            conn_limit=int(table.get("conn_limit", 64)),
            timeout_s=settings.host_timeout_s,
        ),
        _models(table, name),
        float(table.get("weight", 1.0)),
        int(table.get("max_inflight", settings.host_max_inflight)),
    )


def configured_hosts(settings: Settings) -> tuple[list[HostEntry], list[DnsGroup]]:
    """Static hosts (v2 and, when importable, Triton) and DNS groups from ``settings.hosts``."""
    entries: list[HostEntry] = []
    groups: list[DnsGroup] = []
    triton_tables: list[dict[str, Any]] = []
    for i, raw in enumerate(settings.hosts):
        table = dict(raw)
        kind = table.get("kind", "triton")
        where = f"hosts[{i}]"
        if kind == "triton":
            triton_tables.append(table)
            continue
        if kind != "v2":
            raise SettingsError(f"{where}: kind must be 'v2' or 'triton', got {kind!r}")
        if table.get("dns"):
            port = table.get("port")
            if not isinstance(port, int) or not 0 < port < 65536:
                raise SettingsError(f"{where}: 'dns' needs an integer 'port'")
            groups.append(
                DnsGroup(str(table.get("name") or table["dns"]), table["dns"], port, table)
            )
            continue
        url = table.get("url")
        if not isinstance(url, str) or not url:
            raise SettingsError(f"{where}: 'url' (or 'dns' + 'port') is required")
        entries.append(_v2_host(str(table.get("name") or url), url, table, settings))
    if triton_tables:
        from gateway.backends.triton import triton_hosts

        for (host, models), table in zip(triton_hosts(settings), triton_tables, strict=True):
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


def _inspect_config(source: ModelSource, version: int, default_max_batch_size: int) -> ModelConfig:
    """Auto-complete the config from the ONNX graph without running anything locally."""
    import onnxruntime as ort

    from gateway.backends.onnxruntime import complete_config

    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(
            str(source.version_paths[version]), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise ModelLoadError(f"model '{source.name}' version {version}: {exc}") from None
    return complete_config(source.config, session, default_max_batch_size)


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
                host = self._factory.host(lease.name)
                if not lease.target.ready.get(self.key, False):
                    await self._factory.prepare_on(host, self._source, self._version, self._config)
                timeout_s = None if deadline_s is None else deadline_s - self._factory.clock()
                result = await host.infer(
                    self._source.name, self._version, inputs, outputs, timeout_s
                )
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
        )
        self._hosts: dict[str, HostEntry] = {}
        for entry in entries:
            self._add(entry)
        if local is not None:
            self.router.add_target(LOCAL, capacity=settings.host_max_inflight)
        self._groups = groups
        self._backends: set[RoutedBackend] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._shutting_down = False
        if not self._hosts and not groups and local is None:
            raise SettingsError("routing needs local_execution or at least one host")

    # -- hosts ------------------------------------------------------------------------------

    def _add(self, entry: HostEntry) -> None:
        self._hosts[entry.host.name] = entry
        self.router.add_target(
            entry.host.name,
            weight=entry.weight,
            capacity=entry.max_inflight,
            models=entry.models,
        )

    def host(self, name: str) -> Host:
        return self._hosts[name].host

    async def prepare_on(
        self, host: Host, source: ModelSource, version: int, config: ModelConfig
    ) -> None:
        """Make the model servable on ``host``, recording how long that took (cold start)."""
        key = f"{source.name}/{version}"
        started = self.clock()
        await host.prepare(source, version, config)
        self.router.set_ready(host.name, key, True, load_s=self.clock() - started)

    async def _probe(self, name: str) -> bool:
        if name == LOCAL:
            return True
        entry = self._hosts.get(name)
        if entry is None:
            return False
        if not await entry.host.ready():
            return False
        target = self.router.targets.get(name)
        if target is not None:
            for backend in list(self._backends):
                if target.allows(backend.config.name) and not target.ready.get(backend.key):
                    name_, version = backend.key.rsplit("/", 1)
                    ok = await entry.host.model_ready(name_, int(version))
                    self.router.set_ready(name, backend.key, ok)
        return True

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self.router.start(self._probe)
        loop = asyncio.get_running_loop()
        for group in self._groups:
            self._tasks.append(loop.create_task(self._discover(group)))

    async def _resolve(self, group: DnsGroup) -> None:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(group.dns, group.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("DNS %s: %s (keeping the hosts we had)", group.dns, exc)
            return
        urls = {}
        for info in infos:
            ip = str(info[4][0])
            urls[f"{ip}:{group.port}"] = (
                f"http://[{ip}]:{group.port}" if ":" in ip else f"http://{ip}:{group.port}"
            )
        addresses = set(urls)
        prefix = f"{group.name}@"
        current = {n[len(prefix) :] for n in self._hosts if n.startswith(prefix)}
        for address in sorted(addresses - current):
            self._add(_v2_host(prefix + address, urls[address], group.table, self.settings))
            log.info("DNS %s: added host %s", group.dns, address)
        for address in current - addresses:
            entry = self._hosts.pop(prefix + address)
            self.router.remove_target(prefix + address)
            log.info("DNS %s: removed host %s", group.dns, address)
            self._tasks.append(asyncio.get_running_loop().create_task(self._close_later(entry)))

    async def _close_later(self, entry: HostEntry) -> None:
        await asyncio.sleep(self.settings.host_timeout_s)  # let in-flight requests finish
        await entry.host.close()

    async def _discover(self, group: DnsGroup) -> None:
        while True:
            await self._resolve(group)
            await asyncio.sleep(self.settings.dns_refresh_s)

    # -- BackendFactory ---------------------------------------------------------------------

    async def load(self, source: ModelSource, version: int) -> RoutedBackend:
        self._start()
        for group in self._groups:  # the first resolution, before placing models
            if not any(n.startswith(f"{group.name}@") for n in self._hosts):
                await self._resolve(group)
        key = f"{source.name}/{version}"
        local = await self._local.load(source, version) if self._local is not None else None
        if local is not None:
            config = local.config
            self.router.set_ready(LOCAL, key, True)
        else:
            config = await asyncio.to_thread(
                _inspect_config, source, version, self.settings.default_max_batch_size
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
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await asyncio.gather(
            *(e.host.close() for e in self._hosts.values()), return_exceptions=True
        )

    def table(self) -> dict[str, Any]:
        """The host table for ``GET /admin/hosts``."""
        table = self.router.table()
        for row in table["hosts"]:
            entry = self._hosts.get(row["name"])
            row["host"] = entry.host.describe() if entry is not None else {"kind": "local"}
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

