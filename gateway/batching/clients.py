"""Who could still send a request on an event loop: the front ends' open connections.

A batch whose instance is free waits for company only if some may come (the adaptive delay,
``gateway.batching.batcher``). An arrival rate cannot see that a closed population is all in
already: 4 clients that each wait for their answer before sending again arrive together, then
nothing comes until their batch is answered; the rate says "busy traffic", so the batch waited
the whole ``max_queue_delay`` for nobody (``mlp`` at 4 connections: 4.7 ms of a 12 ms request).

A connection that carries one request at a time (HTTP/1.1; httptools answers pipelined requests
one after another) can send nothing more while its request is outstanding. So when every such
connection open on the loop has a request outstanding in the batchers, no connection carrying
several at once is open (HTTP/2: gRPC), and no connection was opened lately (clients that open
one per request would send their next on a new one), no request can join a batch before it is
answered: waiting is pure loss. Front ends report their connections here; the core knows
nothing of HTTP. A loop no front end reported on (the batcher used on its own) is unknown:
anyone may send.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

# A connection opened this recently says clients may be connecting per request: the rule is off.
RECENT_OPEN_S = 1.0


@dataclass(slots=True)
class Connections:
    """The connections open on one loop, as its front ends report them."""

    single: int = 0  # carrying one request at a time (HTTP/1.1)
    multiplexed: int = 0  # carrying any number at once (HTTP/2), or not seen one by one
    opened_s: float = 0.0  # when the last one opened (time.monotonic)


_BY_LOOP: dict[asyncio.AbstractEventLoop, Connections] = {}


def opened(loop: asyncio.AbstractEventLoop, multiplexed: bool = False) -> None:
    """A connection opened on ``loop`` (or a server whose connections are not seen opened)."""
    connections = _BY_LOOP.get(loop)
    if connections is None:
        connections = _BY_LOOP[loop] = Connections()
    if multiplexed:
        connections.multiplexed += 1
    else:
        connections.single += 1
    connections.opened_s = time.monotonic()


def closed(loop: asyncio.AbstractEventLoop, multiplexed: bool = False) -> None:
    """A connection ``opened`` before closed."""
    connections = _BY_LOOP.get(loop)
    if connections is None:
        return
    if multiplexed:
        connections.multiplexed -= 1
    else:
        connections.single -= 1
    if connections.single <= 0 and connections.multiplexed <= 0:
        del _BY_LOOP[loop]  # (a loop that had connections and has none: unknown again)


def may_send(loop: asyncio.AbstractEventLoop, outstanding: int) -> int | None:
    """How many requests at most can still arrive on ``loop`` before one of the
    ``outstanding`` ones (all the loop's batchers hold) is answered; None: no bound known (see
    the module docstring)."""
    connections = _BY_LOOP.get(loop)
    if (
        connections is None
        or connections.multiplexed
        or time.monotonic() - connections.opened_s < RECENT_OPEN_S
    ):
        return None
    return max(0, connections.single - outstanding)


__all__ = ["RECENT_OPEN_S", "Connections", "closed", "may_send", "opened"]
