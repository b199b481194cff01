"""What a host *is*, from its checked spec: ``V2Host`` or ``TritonHost`` with how the router
treats it (``HostEntry``). The spec comes from the one validator,
``gateway.routing.hosts.parse_host``; the Triton client is imported only when a Triton host is
built.
"""

from __future__ import annotations

from gateway.backends.base import Host
from gateway.routing.hosts import (
    DnsSpec,
    HostSpec,
    TritonSpec,
    V2Spec,
    check_upstream_batching,
    kind_of,
    parse_hosts,
    triton_only,
)
from gateway.routing.pool import HostEntry
from gateway.settings import Settings

__all__ = ["build_host", "configured_hosts"]


def build_host(spec: HostSpec, settings: Settings) -> HostEntry:
    """The host a checked spec describes, with how the router treats it."""
    host: Host
    if isinstance(spec, TritonSpec):
        from gateway.backends.triton import triton_host  # tritonclient: only when used

        host = triton_host(
            spec,
            timeout_s=settings.host_timeout_s,
            probe_interval_s=settings.host_probe_interval_s,
            host_concurrency=settings.host_concurrency,
        )
    else:
        from gateway.backends.remote import V2Host

        assert isinstance(spec, V2Spec)
        host = V2Host(
            spec.name,
            spec.url,
            labels=spec.labels,
            push=spec.push,
            conn_limit=spec.conn_limit,
            timeout_s=settings.host_timeout_s,
        )
    return HostEntry(host, spec.models, spec.weight, spec.max_inflight)


def configured_hosts(
    settings: Settings, local: bool | None = None
) -> tuple[list[HostEntry], list[DnsSpec], bool]:
    """Static hosts, DNS groups and whether the local runtime serves too, from
    ``settings.hosts`` (one validator: ``gateway.routing.hosts.parse_hosts``). ``local``: a
    local runtime given by the caller; None: ``local_execution``, except in a Triton-only
    deployment, where every model is served through Triton."""
    specs = parse_hosts(settings)
    if local is None:
        local = settings.local_execution and not triton_only(specs)
    check_upstream_batching(map(kind_of, specs), local=local)
    entries = [build_host(s, settings) for s in specs if isinstance(s, HostSpec)]
    return entries, [s for s in specs if isinstance(s, DnsSpec)], local
