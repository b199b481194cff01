"""Request-scoped context that crosses layers without widening every signature.

``request_id`` is set by a front end for the request's task. The batcher copies the ids of the
requests it merges into ``batch_request_ids`` for the task that executes the batch, so a remote
backend can propagate them upstream. How a request ran goes back by value: a backend's
``execute`` returns an ``Executed`` record (``gateway.batching``), and the batcher hands each
request an ``Execution``, which the access log reads.
"""

from __future__ import annotations

import itertools
import os
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Execution:
    """How one request was executed: the batch it rode in and where the time went."""

    batch_size: int
    queue_ns: int
    compute_ns: int
    host: str = ""


request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
batch_request_ids: ContextVar[tuple[str, ...]] = ContextVar("batch_request_ids", default=())

_PROCESS_TAG = os.urandom(6).hex()
_counter = itertools.count(1)


MAX_REQUEST_ID_CHARS = 128  # a client's X-Request-ID beyond this is cut (echoed and logged)


def client_request_id(value: bytes) -> str:
    """A client's ``X-Request-ID`` as echoed and logged: at most ``MAX_REQUEST_ID_CHARS``."""
    return value[:MAX_REQUEST_ID_CHARS].decode("latin-1")


def new_request_id() -> str:
    """Unique across processes (a random tag per process) and cheap (a counter, no syscall)."""
    return f"{_PROCESS_TAG}-{next(_counter):x}"


def upstream_request_id() -> str:
    """The ids of the requests in the batch being executed (else this request's id), joined,
    for the host that runs it (``X-Request-ID``, Triton's request ``id``)."""
    ids = batch_request_ids.get()
    if not ids:
        one = request_id.get()
        ids = (one,) if one else ()
    return ",".join(ids)[:256]
