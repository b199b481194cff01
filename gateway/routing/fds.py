"""File descriptors for a fleet of hosts: ``RLIMIT_NOFILE`` against the host count.

Every host costs sockets (traffic connections, a probe's), and a process out of descriptors
fails in ways that say nothing of the cause (a listener that never opens, accept loops that
spin). So the gateway counts before it starts: ``FDS_RESERVED`` for itself (listeners, clients,
model files, logs) plus ``FDS_PER_HOST`` per host. Below that, it raises the soft limit up to
the hard one when it can; when even the hard limit is short, start-up fails with a message that
says how many descriptors are needed and how to get them.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable

from gateway.settings import SettingsError

__all__ = ["FDS_PER_HOST", "FDS_RESERVED", "ensure_fds", "fds_needed"]

log = logging.getLogger(__name__)

FDS_RESERVED = 256
FDS_PER_HOST = 3  # a traffic connection or two in use, a probe's (closed between probes)

GetLimit = Callable[[int], tuple[int, int]]
SetLimit = Callable[[int, tuple[int, int]], None]


def fds_needed(hosts: int) -> int:
    return FDS_RESERVED + FDS_PER_HOST * hosts


def ensure_fds(
    hosts: int,
    *,
    getrlimit: GetLimit = resource.getrlimit,
    setrlimit: SetLimit = resource.setrlimit,
) -> int:
    """Make sure ``hosts`` hosts fit in this process's descriptors; returns the soft limit now.
    Raises ``SettingsError`` (a clear start-up failure) when they cannot."""
    need = fds_needed(hosts)
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        raise SettingsError(
            f"{hosts} hosts need about {need} file descriptors ({FDS_RESERVED} + "
            f"{FDS_PER_HOST} per host); the limit is {soft} (hard limit {hard}). Raise it "
            f"(ulimit -n {need}, LimitNOFILE= in systemd, --ulimit nofile= in Docker) or "
            "configure fewer hosts"
        )
    target = need if hard == resource.RLIM_INFINITY else max(need, min(hard, 65536))
    try:
        setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        raise SettingsError(
            f"{hosts} hosts need about {need} file descriptors; the limit is {soft} and "
            f"raising it to {target} failed ({exc}). Raise it (ulimit -n {need}) or configure "
            "fewer hosts"
        ) from None
    log.info("file descriptor limit raised from %d to %d for %d hosts", soft, target, hosts)
    return target
