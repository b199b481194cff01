"""DNS discovery: a ``kind = "v2"`` host table with ``dns`` + ``port`` stands for every address
that name resolves to, re-resolved every ``refresh_s``.

Each address becomes one pool member named ``group@address``; an address that disappears is
retired from the pool (it drains). A failed resolution keeps the members there were, and so
does one whose new members would not fit in the file-descriptor limit (``gateway.routing.fds``;
logged as an error). A large group joins ``JOIN_BATCH`` members at a time, the event loop served
in between, so thousands of addresses do not stall traffic. A resolution that finds the same
addresses as the last one, with the pool unchanged since, ends there (the common refresh costs
one set of the addresses); one that differs compares them ``SCAN_BATCH`` at a time.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.routing.fds import ensure_fds
from gateway.routing.hosts import DnsSpec, V2Spec
from gateway.routing.pool import HostEntry, HostPool
from gateway.settings import SettingsError

__all__ = ["JOIN_BATCH", "SCAN_BATCH", "DnsDiscovery"]

log = logging.getLogger(__name__)

JOIN_BATCH = 50  # members joined (or retired) between two turns of the event loop
SCAN_BATCH = 1000  # addresses looked at between two turns, when a resolution changed
Resolver = Callable[[str, int], Awaitable[list[tuple[Any, ...]]]]


class DnsDiscovery:
    """The DNS groups of one pool, and one resolve loop per group."""

    def __init__(
        self,
        pool: HostPool,
        make_entry: Callable[[V2Spec], HostEntry],
        on_added: Callable[[HostEntry], None],
        refresh_s: float,
        resolver: Resolver | None = None,
    ) -> None:
        self._pool = pool
        self._resolver = resolver  # (name, port) -> getaddrinfo's answer; None: the loop's
        self._lock: asyncio.Lock | None = None
        self._make_entry = make_entry  # a member's host, from the group's template
        self._on_added = on_added  # a member joined (prepare what is loaded there)
        self.refresh_s = refresh_s
        self.groups: dict[str, DnsSpec] = {}
        self._loops: dict[str, asyncio.Task[None]] = {}
        # group -> the addresses its last resolution applied, and the pool's ``changes`` then
        self._applied: dict[str, tuple[frozenset[str], int]] = {}

    def add(self, group: DnsSpec) -> None:
        self.groups[group.name] = group

    def start(self, group: DnsSpec) -> None:
        """Resolve ``group`` every ``refresh_s`` in the background (once per group)."""
        if group.name not in self._loops:
            self._loops[group.name] = self._pool.spawn(self._loop(group))

    def start_all(self) -> None:
        for group in self.groups.values():
            self.start(group)

    def remove(self, name: str) -> list[asyncio.Task[bool]]:
        """Forget group ``name`` and retire every host it resolved to (they drain)."""
        if self.groups.pop(name, None) is None:
            return []
        self._applied.pop(name, None)
        task = self._loops.pop(name, None)
        if task is not None:
            task.cancel()
        return [self._pool.retire(e) for e in self._pool.members(name).values()]

    def member_of(self, name: str) -> str | None:
        """The group a host called ``name`` was found through, if any."""
        group, at, _ = name.partition("@")
        return group if at and group in self.groups else None

    async def resolve(self, group: DnsSpec) -> None:
        """One resolution: members for new addresses join, those for gone ones retire (one
        resolution at a time: a large one yields to the loop while it adds)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            await self._resolve(group)

    async def _resolve(self, group: DnsSpec) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._resolver is not None:
                infos = await self._resolver(group.dns, group.port)
            else:
                infos = await loop.getaddrinfo(group.dns, group.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("DNS %s: %s (keeping the hosts we had)", group.dns, exc)
            return
        if self.groups.get(group.name) is not group:
            return  # removed or replaced while resolving
        ips = frozenset([str(info[4][0]) for info in infos])
        if self._applied.get(group.name) == (ips, self._pool.changes):
            return  # the same answer, and nothing joined or left the pool since
        found = {}  # address -> ip; specs are built only for the members that join
        for i, ip in enumerate(ips):
            found[group.address(ip)] = ip
            if i % SCAN_BATCH == SCAN_BATCH - 1:
                await asyncio.sleep(0)
        if self.groups.get(group.name) is not group:
            return
        current = self._pool.members(group.name)
        complete = True
        added = sorted(found.keys() - current.keys())
        removed = sorted(current.keys() - found.keys())
        if len(added) > len(removed):
            try:
                ensure_fds(len(self._pool.hosts) + len(added) - len(removed))
            except SettingsError as exc:
                log.error("DNS %s: %d new addresses not added: %s", group.dns, len(added), exc)
                added, complete = [], False
        for i, address in enumerate(removed):
            self._pool.retire(current[address])
            log.info("DNS %s: removed host %s", group.dns, address)
            if i % JOIN_BATCH == JOIN_BATCH - 1:
                await asyncio.sleep(0)
        for i, address in enumerate(added):
            if self.groups.get(group.name) is not group:
                return  # removed or replaced meanwhile
            entry = self._make_entry(group.member(found[address]))
            self._pool.add(entry)
            self._on_added(entry)
            log.info("DNS %s: added host %s", group.dns, address)
            if i % JOIN_BATCH == JOIN_BATCH - 1:
                await asyncio.sleep(0)
        if complete and self.groups.get(group.name) is group:
            self._applied[group.name] = (ips, self._pool.changes)

    async def resolve_unresolved(self) -> None:
        """The first resolution of each group that has no member yet (before placing)."""
        for group in list(self.groups.values()):
            if not self._pool.members(group.name):
                await self.resolve(group)

    async def _loop(self, group: DnsSpec) -> None:
        while True:
            await self.resolve(group)
            await asyncio.sleep(self.refresh_s)

    def close(self) -> None:
        """The loops are the pool's tasks (cancelled with it); forget them."""
        self._loops.clear()

    def table(self) -> list[dict[str, object]]:
        """The DNS groups for ``GET /admin/hosts``."""
        return [
            {
                "name": g.name,
                "dns": g.dns,
                "port": g.port,
                "hosts": sorted(e.name for e in self._pool.members(g.name).values()),
            }
            for g in self.groups.values()
        ]
