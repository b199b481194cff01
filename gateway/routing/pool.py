"""The host pool: which hosts are in the router now, and which still drain.

A host joins with its ``HostEntry`` (placement, weight, in-flight cap) and becomes a router
target of the same name. Removing or replacing one takes it out of the router at once (no new
batches); the batches in flight there finish (drain, at most ``drain_timeout_s``), then its
client closes. A lease keeps working on the host it was leased on, also after a replacement
(``host_for``).

Hosts are anything with the ``gateway.backends.base.Host`` protocol; the pool only names them,
closes them, and asks nothing else of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.routing.hosts import UnknownHost
from gateway.routing.router import Router, TargetState

if TYPE_CHECKING:  # backends.base imports routing.tiers: no import cycle at run time
    from gateway.backends.base import Host

__all__ = ["HostEntry", "HostPool"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class HostEntry:
    """One host and how the router should treat it."""

    host: Host
    models: frozenset[str] | None = None  # placement; None: every model
    weight: float = 1.0
    max_inflight: int = 16
    target: TargetState | None = None  # its router state, once added

    @property
    def name(self) -> str:
        return self.host.name

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


class HostPool:
    """Hosts by name, in the router; the retired ones until they drained."""

    def __init__(self, router: Router, drain_timeout_s: float) -> None:
        self.router = router
        self.drain_timeout_s = drain_timeout_s
        self.hosts: dict[str, HostEntry] = {}
        self.draining: list[HostEntry] = []  # removed or replaced, batches still in flight
        self.tasks: set[asyncio.Task[Any]] = set()  # background work: drains, preparations
        self.changes = 0  # counts adds and removals: what is computed over the hosts is cached

    def add(self, entry: HostEntry) -> None:
        """Into the table and the router; one of the same name is replaced (the caller retires
        the old entry)."""
        self.hosts[entry.name] = entry
        self.changes += 1
        entry.target = self.router.add_target(
            entry.name, weight=entry.weight, capacity=entry.max_inflight, models=entry.models
        )

    def host_for(self, target: TargetState) -> Host:
        """The host behind a lease's target, also when it was removed or replaced since (its
        batches in flight finish on the host they were leased on)."""
        entry = self.hosts.get(target.name)
        if entry is not None and entry.target is target:
            return entry.host
        for entry in self.draining:
            if entry.target is target:
                return entry.host
        raise UnknownHost(f"host {target.name} is not in the table")

    def current(self, host: Host) -> bool:
        """Whether ``host`` is still in the pool (not removed or replaced meanwhile)."""
        entry = self.hosts.get(host.name)
        return entry is not None and entry.host is host

    def members(self, group: str) -> dict[str, HostEntry]:
        """The hosts DNS group ``group`` resolved to, by address (named ``group@address``)."""
        prefix = f"{group}@"
        return {n[len(prefix) :]: e for n, e in self.hosts.items() if n.startswith(prefix)}

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def retire(self, entry: HostEntry) -> asyncio.Task[bool]:
        """Out of the table and the router at once (if not replaced already); close its
        client once the batches in flight on it have finished."""
        if self.hosts.get(entry.name) is entry:
            del self.hosts[entry.name]
            self.changes += 1
            self.router.remove_target(entry.name)
        self.draining.append(entry)
        return self.spawn(self._drain_and_close(entry))

    async def _drain_and_close(self, entry: HostEntry) -> bool:
        """Whether every batch in flight there finished before the client closed."""
        drained = True
        try:
            if entry.target is not None:
                drained = await self.router.drained(entry.target, self.drain_timeout_s)
            if not drained:
                assert entry.target is not None
                log.warning(
                    "host %s: %d batches still in flight after %.0f s; closing it",
                    entry.name,
                    entry.target.in_flight,
                    self.drain_timeout_s,
                )
        finally:
            self.draining = [e for e in self.draining if e is not entry]
            await entry.host.close()
            log.info("host %s removed", entry.name)
        return drained

    async def close(self) -> None:
        """Stop background work, then close every host's client (in the pool or draining)."""
        for task in list(self.tasks):
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("host pool task failed")
        self.tasks.clear()
        await asyncio.gather(
            *(e.host.close() for e in [*self.hosts.values(), *self.draining]),
            return_exceptions=True,
        )
