"""Cold-start forwarding: while an edge fetches a model, its requests go to hosts that have it.

A :class:`Forwarder` holds one :class:`~gateway.backends.remote.V2Host` per configured target
(``forward_while_fetching``: v2 base URLs; ``origin``: the edge's origin, when that is a gateway
node). The data plane asks it to run a request whose model is still being loaded on first use;
it answers ``None`` when the model is not being fetched (e.g. it is loading from the cache) or
every target failed, and the data plane then waits for the local load as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from gateway.backends.base import Tensors
from gateway.backends.remote import V2Host
from gateway.errors import GatewayError
from gateway.repository.edge import EdgeRepository
from gateway.repository.local import is_version
from gateway.settings import Settings, SettingsError

log = logging.getLogger(__name__)

ORIGIN = "origin"


def _origin_url(model_repo: str) -> str:
    parts = urlsplit(model_repo)
    if parts.scheme not in ("http", "https") or parts.path.strip("/") or not parts.netloc:
        raise SettingsError(
            f"forward_while_fetching: 'origin' needs the origin to be a gateway node "
            f"(http(s)://host:port), not {model_repo!r}"
        )
    return f"{parts.scheme}://{parts.netloc}"


class Forwarder:
    """Runs requests for models an edge is fetching on the first target that answers."""

    def __init__(self, settings: Settings, edge: EdgeRepository) -> None:
        self.edge = edge
        self.hosts: list[V2Host] = []
        for target in settings.forward_while_fetching:
            if target == ORIGIN:
                self.hosts.append(V2Host(ORIGIN, _origin_url(settings.model_repo)))
            elif urlsplit(target if "://" in target else f"http://{target}").netloc:
                self.hosts.append(V2Host(target, target))
            else:
                raise SettingsError(f"forward_while_fetching: {target!r} is not a base URL")
        self.forwarded: dict[str, int] = {h.name: 0 for h in self.hosts}
        self.failed: dict[str, int] = {h.name: 0 for h in self.hosts}

    async def infer(
        self,
        model: str,
        version: str | None,
        inputs: Tensors,
        outputs: Sequence[str],
        timeout_s: float | None,
    ) -> tuple[str, int, Tensors] | None:
        """(target, version, outputs) from the first target that answers; None when ``model``
        is not being fetched or no target could run it."""
        fetching = self.edge.fetching_version(model)
        if fetching is None:
            return None
        chosen = int(version) if version and is_version(version) else fetching
        started = time.monotonic()
        for host in self.hosts:
            left_s = None if timeout_s is None else timeout_s - (time.monotonic() - started)
            if left_s is not None and left_s <= 0:
                break
            try:
                result = await host.infer(model, chosen, inputs, outputs, left_s)
            except GatewayError as exc:
                self.failed[host.name] += 1
                log.info("forwarding %s to %s failed: %s", model, host.name, exc.message)
                continue
            self.forwarded[host.name] += 1
            return host.name, chosen, result
        return None

    def metric_families(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily

        done = CounterMetricFamily(
            "gateway_forwarded_requests",
            "Requests for a model being fetched, answered by another host",
            labels=["target"],
        )
        failed = CounterMetricFamily(
            "gateway_forward_failures",
            "Forwarding attempts that failed (the next target or the local load was used)",
            labels=["target"],
        )
        for name in self.forwarded:
            done.add_metric([name], self.forwarded[name])
            failed.add_metric([name], self.failed[name])
        return [done, failed]

    async def close(self) -> None:
        for host in self.hosts:
            await host.close()


__all__ = ["Forwarder"]
