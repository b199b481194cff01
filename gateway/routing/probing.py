"""Probing one host for the router: its health, then where each loaded model version is there.

A host answers its own ``health`` (a v2 server's readiness; a Triton server's liveness). Then,
for the versions placed there: a host that lists its repository (``repository_index``, one call
per host per probe; a v2 host's) gives each a cold-start tier (``gateway.routing.tiers``);
for any other host, the versions not ready there are asked about one by one (``model_ready``).

One request per probe where it can be: the index is asked first, and a host that answers one
is up (answering it is being up), so a fleet of v2 hosts costs one request per host and period,
not two; health is asked only of hosts without an index. Once a host has answered an index,
a failed index is a failed probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.routing.hosts import LOCAL
from gateway.routing.pool import HostEntry, HostPool
from gateway.routing.tiers import LOADED, HostModel, tier_for

__all__ = ["Loaded", "Prober"]


class Loaded(Protocol):
    """A model version loaded on the gateway (``gateway.backends.routed.RoutedBackend``)."""

    @property
    def model(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def key(self) -> str: ...


class Prober:
    """The router's probe (``Router.start``): ``await prober(name)`` is whether ``name`` is up."""

    def __init__(self, pool: HostPool, loaded: Callable[[], Sequence[Loaded]]) -> None:
        self._pool = pool
        self._loaded = loaded
        self._indexed: weakref.WeakSet[object] = weakref.WeakSet()  # hosts that gave an index

    async def __call__(self, name: str) -> bool:
        if name == LOCAL:
            return True
        entry = self._pool.hosts.get(name)
        if entry is None:
            return False
        target = self._pool.router.targets.get(name)
        placed = [v for v in self._loaded() if target is not None and target.allows(v.model)]
        if placed and entry.host in self._indexed:
            index = await entry.host.repository_index()  # the one request of this probe
            if index is None:
                return False
            await self._tiers(entry, index, placed)
            return True
        if placed:
            # Try the index first: a host that answers one is up, and the probe was one
            # request (a host without one answers None at once, or fails, then health).
            index = None
            with contextlib.suppress(TimeoutError):  # a slow index must not fail the probe
                async with asyncio.timeout(self._pool.router.probe_timeout_s / 2):
                    index = await entry.host.repository_index()
            if index is not None:
                self._indexed.add(entry.host)
                await self._tiers(entry, index, placed)
                return True
        if not await entry.host.health():
            return False
        if placed:
            await self._readiness(entry, placed)
        return True

    async def _tiers(
        self, entry: HostEntry, index: dict[str, HostModel], placed: Sequence[Loaded]
    ) -> None:
        host, router = entry.host, self._pool.router
        target = router.targets.get(entry.name)
        for version in placed:
            if not self._pool.current(host) or target is None:
                return
            model = tier_for(index, version.model, version.version)
            if model.tier != LOADED and target.ready.get(version.key):
                # Gone? Ask the model itself before believing an index (rare).
                if await host.model_ready(version.model, version.version):
                    model = HostModel(LOADED)
                if not self._pool.current(host):
                    return
            router.set_tier(entry.name, version.key, model)

    async def _readiness(self, entry: HostEntry, placed: Sequence[Loaded]) -> None:
        host, router = entry.host, self._pool.router
        target = router.targets.get(entry.name)
        for version in placed:
            if target is not None and not target.ready.get(version.key):
                ok = await host.model_ready(version.model, version.version)
                if self._pool.current(host):
                    router.set_ready(entry.name, version.key, ok)
