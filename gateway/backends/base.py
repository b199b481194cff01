"""The seam between the data plane and whatever executes a model.

A backend executes one *model version*. The data plane hands it whole batches (already merged by
the batcher) and never cares whether they run in-process, on a Triton host or on another gateway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from gateway.batching.batcher import Executed
from gateway.errors import DeadlineExceeded, GatewayError, HostUnreachable, Unavailable
from gateway.repository.config import ModelConfig
from gateway.repository.local import ModelSource
from gateway.routing.tiers import HostModel

Tensors = dict[str, np.ndarray[Any, Any]]

__all__ = [
    "Backend",
    "BackendFactory",
    "Executed",
    "Host",
    "Tensors",
    "check_answer",
    "check_dispatch",
    "timed_out",
]


class Backend(Protocol):
    """One loaded model version, able to run ``instance_count`` batches at once.

    The members after ``describe`` have defaults, which a backend gets by subclassing
    ``Backend``.
    """

    @property
    def config(self) -> ModelConfig:
        """The model's config, auto-completed and checked against the real model."""

    @property
    def instance_count(self) -> int:
        """How many executions may be in flight at once."""

    async def execute(
        self, inputs: Tensors, outputs: Sequence[str], deadline_s: float | None = None
    ) -> Executed:
        """Run one batch: the named outputs, where it ran and (when known) its compute time.

        ``deadline_s`` (on the data plane's monotonic clock) is the earliest deadline of the
        requests in the batch; remote backends pass the remaining budget on to the host.
        """

    async def close(self) -> None:
        """Release sessions, threads and remote state. Called once, after draining."""

    def describe(self) -> dict[str, Any]:
        """Facts about where and how it runs, for metadata and the repository index."""

    # -- members with defaults --------------------------------------------------------------

    def ready(self) -> bool:
        """Whether the version is servable right now (no I/O): remote backends say whether
        some host serves it (``GET .../ready``). Default: True."""
        return True

    @property
    def batches_upstream(self) -> bool:
        """Whether the backend runs its own dynamic batcher with this model's settings (a
        Triton host with ``batching = "triton"``): the gateway's batcher then merges what is
        queued when a slot frees but does not wait ``max_queue_delay`` for more, which would
        pay it twice. Default: False."""
        return False

    def execute_now(self, inputs: Tensors, outputs: Sequence[str]) -> Executed | None:
        """Run one batch on the calling thread (the event loop's, for a lone batch: see
        ``BatchPolicy.inline_max_s``) if it can start at once, else None (the batcher then
        awaits ``execute``). Default: None, always."""
        return None

    def placement(self) -> dict[str, Any]:
        """The facts ``/metrics`` reads on every scrape (``instance_providers``,
        ``cpu_fallback``): a backend whose ``describe`` walks many hosts returns only these.
        Default: ``describe()``."""
        return self.describe()


class BackendFactory(Protocol):
    """Loads model versions into a kind of backend. ``metric_families`` has a default, which
    a factory gets by subclassing ``BackendFactory``."""

    async def load(self, source: ModelSource, version: int) -> Backend:
        """Load one version; raises ``ModelLoadError`` with a reason the user can act on."""

    def metric_families(self) -> list[Any]:
        """Prometheus families of its own for ``/metrics`` (a router's host table), collected
        on each scrape. Default: none."""
        return []


class Host(Protocol):
    """A remote machine that speaks the Open Inference Protocol (a Triton server or another
    gateway node) and can serve models the gateway places on it.

    Connection-level failures raise ``HostUnreachable`` (safe to retry elsewhere); a host that
    answers with an error raises the matching ``GatewayError``.

    What differs between kinds of host is a member here; the members after ``describe`` have
    defaults, which a host gets by subclassing ``Host``. One router
    (``gateway.backends.routed``) serves every kind through these members only.
    """

    @property
    def name(self) -> str:
        """Unique name from the configuration (or the resolved address)."""

    @property
    def labels(self) -> frozenset[str]:
        """Free-form labels such as ``gpu`` / ``cpu``."""

    async def prepare(self, source: ModelSource, version: int, config: ModelConfig) -> None:
        """Make the model version servable there (push it, or check it is loaded)."""

    async def infer(
        self,
        model: str,
        version: int,
        inputs: Tensors,
        outputs: Sequence[str],
        timeout_s: float | None = None,
    ) -> Tensors:
        """One inference request; binary tensors on the wire."""

    async def ready(self) -> bool:
        """Server readiness (``/v2/health/ready``), never raising."""

    async def model_ready(self, model: str, version: int) -> bool:
        """Model readiness on that host, never raising."""

    async def release(self, model: str) -> None:
        """Undo ``prepare`` (unload what the gateway pushed)."""

    async def close(self) -> None:
        """Close pooled connections."""

    def describe(self) -> dict[str, Any]:
        """Facts for metadata, the admin API and the repository index."""

    # -- members with defaults --------------------------------------------------------------

    kind: str = "v2"  # "triton" for a Triton server: what its table said (``[[hosts]] kind``)

    async def health(self) -> bool:
        """The router's probe: whether the host takes batches now, never raising. Default: its
        server readiness."""
        return await self.ready()

    async def repository_index(self) -> dict[str, HostModel] | None:
        """Where each model is there (``gateway.routing.tiers``), for cold-start tiers; None
        when not known (the default: the router asks ``model_ready`` per model instead)."""
        return None

    def pushed_bytes(self, key: str) -> int | None:
        """Bytes the last ``prepare`` of ``"model/version"`` moved there (a bandwidth sample;
        0: it was there already); None when not known (the default)."""
        return None

    def serving(self, model: str) -> bool:
        """Whether the host believes it serves ``model`` now (no I/O); False takes it out of
        the candidates before the router's next probe. Default: True."""
        return True

    def concurrency(self, config: ModelConfig) -> int | None:
        """Batches of this model to keep in flight there at once; None (the default): only the
        host's ``max_inflight`` over all models applies."""
        return None

    @property
    def batches_upstream(self) -> bool:
        """Whether the host runs its own dynamic batcher with the model's queue delay (a Triton
        host with ``batching = "triton"``). Default: False."""
        return False


def check_answer(
    host: str, config: ModelConfig, inputs: Tensors, outputs: Sequence[str], result: Tensors
) -> None:
    """A remote host's answer must hold every requested output, one row per input row when the
    model batches (the batcher slices it per request); else it is the host's failure (503, may
    be retried elsewhere), rather than handing callers missing or misaligned rows."""
    missing = [name for name in outputs if result.get(name) is None]
    if missing:
        raise Unavailable(f"host {host} answered without output(s) {missing}", 1.0)
    if config.batched and inputs:
        rows = int(next(iter(inputs.values())).shape[0])
        for name in outputs:
            shape = result[name].shape
            if not shape or shape[0] != rows:
                raise Unavailable(
                    f"host {host} answered {name} with shape {list(shape)} for {rows} row(s)", 1.0
                )


def check_dispatch(host: str, closed: bool, timeout_s: float | None) -> None:
    """Before a call to a remote host: not to a closed client, not with no time left."""
    if closed:
        raise HostUnreachable(f"{host} is closed")
    if timeout_s is not None and timeout_s <= 0:
        raise DeadlineExceeded(f"request timeout expired before reaching {host}")


def timed_out(
    host: str, timeout_s: float | None, default_s: float, retry_after_s: float
) -> GatewayError:
    """A host call that ran out of time: the caller's deadline passed (504), or the host did not
    answer within the gateway's own limit (unreachable: another host may be tried)."""
    if timeout_s is not None:
        return DeadlineExceeded(f"request timed out after {timeout_s:.3f} s on {host}")
    return HostUnreachable(
        f"{host} did not answer within {default_s:.1f} s", retry_after_s=retry_after_s
    )
