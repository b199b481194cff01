"""Who could still send a request on an event loop: the front ends' open connections.

A batch whose instance is free waits for company only if some may come (the adaptive delay,
``gateway.batching.batcher``). An arrival rate cannot see that a closed population is all in
already: 4 clients that each wait for their answer before sending again arrive together, then
nothing comes until their batch is answered; the rate says "busy traffic", so the batch waited
the whole ``max_queue_delay`` for nobody (``mlp`` at 4 connections: 4.7 ms of a 12 ms request).

A connection that carries one request at a time (HTTP/1.1; httptools answers pipelined requests
one after another) can send nothing more while its request is outstanding. A connection that
carries several at once (HTTP/2: gRPC) is counted at the most requests it has carried at once
(``ModelInfer`` calls): clients that share one (perf_analyzer's gRPC clients, a pool behind one
channel) wait for their answers as HTTP/1.1 clients do, so the most requests the connection
ever had open is how many clients are behind it. That is a guess, not a bound: more may come (a
client raising its concurrency); the guess then costs one batch that went without waiting for
company, the batch Triton would send with no delay, and the count grows with the first request
past it.

A connection counts from its first request that may reach a batcher (a POST, a ``ModelInfer``
call): connections that only ever ask for health, metadata, statistics or metrics (a load
balancer's probes, a Prometheus scrape, perf_analyzer's statistics) send nothing to batch
with. The same guess: a keep-alive client's first request may find a batch gone without it.
And clients that connect per request show there: a connection's first request came lately.

So when the connections open on the loop can carry no more than the requests outstanding in
the batchers, no connection of unknown reach is open (a server whose connections are not seen
one by one: grpc.aio; a streaming call), and no connection sent its first request lately, no
request can join a batch before it is answered: waiting is pure loss. Front ends report their
connections here; the core knows nothing of HTTP. A loop no front end reported on (the batcher
used on its own) is unknown: anyone may send.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

# A connection's first request this recently says clients may connect per request: rule off.
RECENT_FIRST_S = 1.0


@dataclass(slots=True)
class Connections:
    """The connections open on one loop, as its front ends report them."""

    open: int = 0  # connections (and servers or streams of unseen ones) reported open
    carry: int = 0  # the most requests each seen connection has carried at once, summed
    unbounded: int = 0  # those that may carry any number: not seen request by request
    first_s: float = 0.0  # a connection's first request, the latest (time.monotonic)


_BY_LOOP: dict[asyncio.AbstractEventLoop, Connections] = {}


def opened(loop: asyncio.AbstractEventLoop, carries: int | None = 0) -> None:
    """A connection opened on ``loop``: it carries ``carries`` requests at once so far (0 until
    its first, ``carries_more``), or None: any number, not seen one by one."""
    connections = _BY_LOOP.get(loop)
    if connections is None:
        connections = _BY_LOOP[loop] = Connections()
    connections.open += 1
    if carries is None:
        connections.unbounded += 1
    else:
        connections.carry += carries


def carries_more(loop: asyncio.AbstractEventLoop, more: int = 1, first: bool = False) -> None:
    """A connection ``opened`` carried ``more`` requests at once than it ever had; ``first``:
    these are its first."""
    connections = _BY_LOOP.get(loop)
    if connections is not None:
        connections.carry += more
        if first:
            connections.first_s = time.monotonic()


def closed(loop: asyncio.AbstractEventLoop, carries: int | None = 0) -> None:
    """A connection ``opened`` before closed, having carried ``carries`` at most at once."""
    connections = _BY_LOOP.get(loop)
    if connections is None:
        return
    connections.open -= 1
    if carries is None:
        connections.unbounded -= 1
    else:
        connections.carry -= carries
    if connections.open <= 0:
        del _BY_LOOP[loop]  # (a loop that had connections and has none: unknown again)


def may_send(loop: asyncio.AbstractEventLoop, outstanding: int) -> int | None:
    """How many requests at most can still arrive on ``loop`` before one of the
    ``outstanding`` ones (all the loop's batchers hold) is answered; None: no bound known (see
    the module docstring)."""
    connections = _BY_LOOP.get(loop)
    if (
        connections is None
        or connections.unbounded
        or time.monotonic() - connections.first_s < RECENT_FIRST_S
    ):
        return None
    return max(0, connections.carry - outstanding)


__all__ = ["RECENT_FIRST_S", "Connections", "carries_more", "closed", "may_send", "opened"]
