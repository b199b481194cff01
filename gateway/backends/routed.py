"""The execute path: one model version served by the router's targets, one batch at a time.

Per batch, ``RoutedBackend.execute`` asks the router for a target (policy, health, in-flight
caps, predictive admission against the deadline) among the local runtime and the hosts placed
for the model, runs there with the remaining deadline, and on ``HostUnreachable`` or a 503
tries once more on another target when the deadline and the retry budget allow. A host that
says it does not serve the model now (``Host.serving``: a Triton host marked down) is not a
candidate.

Every kind of host goes this one way: Triton hosts, v2 hosts, DNS-discovered ones, and the local
ONNX Runtime; what differs between them is a member of the ``Host`` protocol. Which hosts there
are, loading and the admin API are ``gateway.backends.placement.RoutedFactory``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gateway import tracing
from gateway.backends.base import Backend, Executed, Tensors, check_answer
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    HostUnreachable,
    ModelNotReady,
    Overloaded,
    Unavailable,
)
from gateway.repository.config import ModelConfig
from gateway.repository.local import ModelSource
from gateway.routing import FAILURE, NEUTRAL, SUCCESS, Lease
from gateway.routing.hosts import LOCAL
from gateway.routing.pool import HostEntry

if TYPE_CHECKING:
    from gateway.backends.placement import RoutedFactory

__all__ = ["RoutedBackend"]

log = logging.getLogger(__name__)

_NONE: frozenset[str] = frozenset()  # no target excluded

# Model metadata is open to every inference client: hosts by name and state, not their
# addresses or error texts (GET /admin/hosts has those). Why a Triton host runs the python
# strategy is Triton's own words about its build, no address.
_PUBLIC_HOST_FACTS = frozenset(
    {
        "name",
        "kind",
        "protocol",
        "device",
        "state",
        "strategy",
        "batching",
        "onnxruntime_backend_error",
    }
)


class RoutedBackend(Backend):
    """One model version served by the router's targets."""

    def __init__(
        self,
        factory: RoutedFactory,
        source: ModelSource,
        version: int,
        config: ModelConfig,
        local: Backend | None,
    ) -> None:
        self._factory = factory
        self._source = source
        self._version = version
        self._config = config
        self._local = local
        self.key = f"{source.name}/{version}"
        self._count: tuple[int, int] | None = None  # (pool changes, instance_count) cached

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def source(self) -> ModelSource:
        return self._source

    @property
    def model(self) -> str:
        return self._source.name

    @property
    def version(self) -> int:
        return self._version

    def _hosts(self) -> list[HostEntry]:
        return [e for e in self._factory.pool.hosts.values() if e.allows(self.model)]

    @property
    def instance_count(self) -> int:
        """Batches in flight at once: per target its ``max_inflight``, or less where the host
        keeps fewer of this model in flight (a Triton host's ``host_concurrency``). Asked as
        each batch forms: summed again only when the pool changed."""
        changes = self._factory.pool.changes
        if self._count is not None and self._count[0] == changes:
            return self._count[1]
        count = self._factory.local_capacity if self._local is not None else 0
        for entry in self._hosts():
            wanted = entry.host.concurrency(self._config)
            count += entry.max_inflight if wanted is None else min(wanted, entry.max_inflight)
        self._count = (changes, max(1, count))
        return self._count[1]

    @property
    def batches_upstream(self) -> bool:
        """Every target batches for itself (Triton hosts with ``batching = "triton"``): the
        gateway's batcher merges what is queued but does not wait (``base.Backend``)."""
        hosts = self._hosts()
        return self._local is None and bool(hosts) and all(e.host.batches_upstream for e in hosts)

    def ready(self) -> bool:
        """Whether some target serves this version now (no I/O)."""
        if self._local is not None:
            return True
        outliers = self._factory.router.outliers
        return any(e.host.serving(self.model) and outliers.available(e.name) for e in self._hosts())

    def _rows(self, inputs: Tensors) -> int:
        if not self._config.batched or not inputs:
            return 1
        return int(next(iter(inputs.values())).shape[0])

    async def execute(
        self, inputs: Tensors, outputs: Sequence[str], deadline_s: float | None = None
    ) -> Executed:
        router = self._factory.router
        rows = self._rows(inputs)
        router.budget.start_request()
        try:
            lease = await self._acquire(rows, deadline_s)
            try:
                with tracing.span(tracing.EXECUTE, {"gateway.host": lease.name}):
                    return await self._run(lease, inputs, outputs, deadline_s)
            except Unavailable as exc:
                if not self._retryable(deadline_s) or not router.budget.try_retry():
                    raise
                first, original = lease.name, exc
            try:
                try:
                    retry = await router.acquire(
                        self.model, self.key, rows, deadline_s, (first,), self._serving
                    )
                except Unavailable:
                    raise original from None  # nowhere else to go: report the original failure
                log.info("retrying %s on %s after %s failed", self.key, retry.name, first)
                with tracing.span(tracing.EXECUTE, {"gateway.host": retry.name, "retry": True}):
                    return await self._run(retry, inputs, outputs, deadline_s)
            finally:
                router.budget.end_retry()
        finally:
            router.budget.end_request()

    def _serving(self, name: str) -> bool:
        """Hosts that know they do not serve the model now (down, model lost) are not
        candidates; asked only of the targets a decision looks at."""
        entry = self._factory.pool.hosts.get(name)
        return entry is None or entry.host.serving(self.model)

    async def _acquire(self, rows: int, deadline_s: float | None) -> Lease:
        router = self._factory.router
        try:
            # Most batches find a free target at once: no waiting coroutine for them.
            lease = router.try_acquire(self.model, self.key, rows, deadline_s, _NONE, self._serving)
            if lease is not None:
                return lease
            return await router.acquire(
                self.model, self.key, rows, deadline_s, serving=self._serving
            )
        except Overloaded:
            raise
        except Unavailable as exc:  # no target at all: say what each host is doing
            hosts = self._hosts()
            if not hosts:
                raise
            states = ", ".join(self._factory.host_state(e.name) for e in hosts)
            raise Unavailable(f"{exc.message} ({states})", exc.retry_after_s) from None

    def _retryable(self, deadline_s: float | None) -> bool:
        # A host's 429 / 503 / unreachable / not-ready is worth one more try elsewhere, while
        # time is left; the router's own refusals are raised before any host is tried.
        return deadline_s is None or deadline_s - self._factory.clock() > 0

    async def _run(
        self, lease: Lease, inputs: Tensors, outputs: Sequence[str], deadline_s: float | None
    ) -> Executed:
        try:
            if lease.name == LOCAL:
                assert self._local is not None
                local = await self._local.execute(inputs, outputs, deadline_s)
                result = Executed(
                    local.outputs, LOCAL, local.compute_s, local.input_s, local.output_s
                )
            else:
                host = self._factory.pool.host_for(lease.target)
                if not lease.target.ready.get(self.key, False):
                    await self._factory.prepare_on(host, self._source, self._version, self._config)
                timeout_s = None if deadline_s is None else deadline_s - self._factory.clock()
                answer = await host.infer(self.model, self._version, inputs, outputs, timeout_s)
                check_answer(lease.name, self._config, inputs, outputs, answer)
                result = Executed(answer, lease.name)
        except (HostUnreachable, ModelNotReady) as exc:
            if isinstance(exc, ModelNotReady):
                self._factory.router.set_ready(lease.name, self.key, False)
                lease.finish(NEUTRAL)
            else:
                lease.finish(FAILURE)
            raise
        except Overloaded:
            lease.finish(NEUTRAL)
            raise
        except (Unavailable, DeadlineExceeded) as exc:
            lease.finish(FAILURE if isinstance(exc, Unavailable) else NEUTRAL)
            raise
        except GatewayError as exc:
            # A host's 5xx counts against it; input the model rejects does not.
            lease.finish(FAILURE if type(exc) is GatewayError else NEUTRAL)
            raise
        except BaseException:
            lease.finish(NEUTRAL)
            raise
        lease.finish(SUCCESS)
        return result

    async def close(self) -> None:
        if self._local is not None:
            await self._local.close()
        await self._factory.backend_closed(self)

    def placement(self) -> dict[str, Any]:
        """Where the local instances run; not the hosts (``describe`` walks every one)."""
        if self._local is None:
            return {}
        local = self._local.placement()
        return {k: local[k] for k in ("instance_providers", "cpu_fallback") if k in local}

    def describe(self) -> dict[str, Any]:
        hosts = self._hosts()
        targets = ([LOCAL] if self._local is not None else []) + [e.name for e in hosts]
        facts = [e.host.describe() for e in hosts]
        only_triton = self._local is None and bool(hosts)
        only_triton = only_triton and all(e.host.kind == "triton" for e in hosts)
        out: dict[str, Any] = {
            "backend": "triton" if only_triton else "routed",
            "policy": self._factory.router.policy.name,
            "targets": targets,
            "batching": "triton" if self.batches_upstream else "gateway",
        }
        strategies = sorted({str(f["strategy"]) for f in facts if "strategy" in f})
        if strategies:
            out["strategy"] = ",".join(strategies)
        concurrency = [c for e in hosts if (c := e.host.concurrency(self._config)) is not None]
        if concurrency:
            out["host_concurrency"] = max(concurrency)
        out["hosts"] = [
            {
                **{k: v for k, v in f.items() if k in _PUBLIC_HOST_FACTS},
                "model_ready": e.host.serving(self.model)
                and self._factory.router.outliers.available(e.name),
            }
            for e, f in zip(hosts, facts, strict=True)
        ]
        if self._local is not None:  # where the local instances run (the provider metrics)
            local = self._local.describe()
            out.update({k: local[k] for k in ("instance_providers", "cpu_fallback") if k in local})
        return out
