"""Serving through remote Triton Inference Server hosts.

``TritonHost`` is one Triton server seen through the ``Host`` protocol: it pushes model versions
there with Triton's repository API (``--model-control-mode explicit``), sends inference requests
with binary tensors, and probes the host in the background. Everything goes through one pooled
client per host, its *transport*, chosen per host with ``protocol``:

- ``http``: ``tritonclient.http.aio``, keep-alive HTTP/1.1 connections, binary-tensor extension.
- ``grpc``: ``tritonclient.grpc.aio``, one HTTP/2 channel, ``raw_input_contents`` /
  ``raw_output_contents``. The request deadline travels as the gRPC deadline too. The default
  for a host with a ``grpc_url`` (``DEFAULT_PROTOCOL``; measured in ``bench/triton.py``).

Both raise the same things to the host: ``InferenceServerException`` with an HTTP-like status for
what Triton said, ``OSError`` for a connection failure, ``TimeoutError`` for a deadline.

A host that stops answering is marked down at once (its models are not ready there); when it
answers again, models it lost (a restart comes back with an empty repository) are pushed again.

How a model gets there, ``strategy``:

- ``onnxruntime``: ``model.onnx`` with ``backend: "onnxruntime"``, what a stock Triton runs.
- ``python``: the same ``model.onnx`` plus a small python-backend ``model.py`` that runs it with
  ONNX Runtime (``gateway.backends.triton_python_model``), for builds without the onnxruntime
  backend, such as the CPU-only one in the nvidia-pytriton wheel.
- ``auto``: ``onnxruntime`` first; if Triton says that backend is missing, ``python``. The
  host remembers what worked and goes straight to it next time.

Which host gets a batch is not decided here: Triton hosts are hosts of the one router
(``gateway.backends.routed``), a Triton-only deployment included. Host tables are checked and
parsed in ``gateway.routing.hosts`` (``TritonSpec``).

(Over 400 lines: the two transports, pushing with its strategies, and the monitor of one host;
the transports are the natural next module, with the transport seam tests want.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import grpc  # type: ignore[import-untyped]  # no stubs in the venv
import tritonclient.grpc.aio as triton_grpc
import tritonclient.http.aio as triton_http
from tritonclient.utils import InferenceServerException

from gateway import context, tracing
from gateway.backends.base import Host, Tensors, check_dispatch, timed_out
from gateway.backends.triton_python_model import python_backend_config, python_backend_files
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    HostUnreachable,
    InvalidInput,
    ModelLoadError,
    ModelNotReady,
    Unavailable,
)
from gateway.protocol.types import datatype_of
from gateway.repository.config import ModelConfig
from gateway.repository.local import ModelSource
from gateway.routing.hosts import DEFAULT_PROTOCOL, PROTOCOLS, STRATEGIES, TritonSpec

__all__ = [
    "DEFAULT_PROTOCOL",
    "PROTOCOLS",
    "STRATEGIES",
    "TritonHost",
    "triton_host",
]

log = logging.getLogger(__name__)

UP, DOWN, UNKNOWN = "up", "down", "unknown"
# What Triton says when a config names a backend it does not have; for ``onnxruntime`` on the
# nvidia-pytriton build: "... unable to find backend library for backend 'onnxruntime', try
# specifying runtime on the model configuration."
_MISSING_BACKEND = "unable to find backend library for backend 'onnxruntime'"
_CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError)
# DEFAULT_PROTOCOL (gateway.routing.hosts): gRPC for a host with a ``grpc_url``. An earlier ~6x
# for HTTP at 1 MiB was Triton gzipping HTTP responses that aiohttp asked for.
# What Triton's gRPC status codes mean as the HTTP statuses ``TritonHost._error`` reads.
_GRPC_AS_HTTP = {
    "INVALID_ARGUMENT": "400",
    "FAILED_PRECONDITION": "400",
    "OUT_OF_RANGE": "400",
    "UNAUTHENTICATED": "401",
    "PERMISSION_DENIED": "403",
    "NOT_FOUND": "404",
    "ALREADY_EXISTS": "409",
    "RESOURCE_EXHAUSTED": "429",
    "UNIMPLEMENTED": "501",
    "UNAVAILABLE": "503",
    "DEADLINE_EXCEEDED": "504",
}
_GRPC_MAX_MESSAGE_BYTES = 2**31 - 1  # tritonclient's own limit: tensors and pushed models


@dataclass(slots=True)
class _Placement:
    """A model this gateway placed on the host: enough to push it again after a restart."""

    source: ModelSource
    config: ModelConfig
    versions: dict[int, Path] = field(default_factory=dict)
    error: str = ""


def triton_config(
    config: ModelConfig,
    versions: Sequence[int],
    device: str,
    backend: str,
    batching: str = "gateway",
) -> dict[str, Any]:
    """The gateway's model config as Triton's JSON config for a repository-API load.

    With ``batching="gateway"`` the gateway's batcher has already waited ``max_queue_delay``
    for a fuller batch, so Triton gets no delay of its own: it runs what is queued at once.
    Waiting in both places paid the delay twice, on batches that Triton could not fill anyway
    (the gateway holds the rest back), and cost ``mlp`` ~5 ms at p50 (``bench/README.md``).

    The instance group follows the host's ``device``: see :func:`instance_group_for`.
    """
    cfg = config.to_dict()
    batcher = cfg.get("dynamic_batching")
    if batching == "gateway" and isinstance(batcher, dict):
        batcher.pop("max_queue_delay_microseconds", None)
    cfg["platform"], cfg["backend"] = "onnxruntime_onnx", "onnxruntime"
    cfg["version_policy"] = {"specific": {"versions": sorted(versions)}}
    cfg["instance_group"] = [instance_group_for(config, device, backend)]
    if not cfg.get("parameters"):
        cfg.pop("parameters", None)
    return python_backend_config(cfg) if backend == "python" else cfg


def instance_group_for(config: ModelConfig, device: str, backend: str) -> dict[str, Any]:
    """The instance group a model gets on a host of this ``device``.

    On a ``gpu`` host, ``KIND_AUTO`` (and no ``instance_group``) become ``KIND_GPU``, and the
    group's ``gpus`` go along, so the model runs on that host's GPU(s) or fails to load there,
    never quietly on its CPU (Triton itself would fall back to CPU instances for ``KIND_AUTO``
    when it sees no GPU). ``KIND_CPU`` stays: a model may ask for the CPU anywhere. On a ``cpu``
    host every group is ``KIND_CPU`` without ``gpus``: Triton refuses ``KIND_GPU`` there.

    The ``python`` strategy runs ONNX Runtime's CPU provider inside Triton's python backend
    (``triton_python_model``), so it gets ``KIND_CPU`` everywhere: GPU instances would only
    pretend, and the host's GPU is then unused (logged as a warning).
    """
    group = config.instance_group()
    if device == "gpu" and backend != "python":
        if group["kind"] == "KIND_AUTO":
            group["kind"] = "KIND_GPU"
        return group
    if device == "gpu" and config.instance_kind != "KIND_CPU":
        log.warning(
            'model %s goes to a device = "gpu" Triton host through the python backend, which '
            "runs ONNX Runtime on that host's CPU",
            config.name,
        )
    group.pop("gpus", None)
    group["kind"] = "KIND_CPU"
    return group


class _Transport:
    """How a ``TritonHost`` reaches Triton: one pooled client, created in the loop that uses it.

    ``call`` runs one client method within ``limit_s`` and raises only ``InferenceServerException``
    (with an HTTP-like ``status()``), a connection error (``_CONNECTION_ERRORS``) or
    ``TimeoutError``. This base is the HTTP transport: ``tritonclient.http.aio`` already raises
    those (aiohttp errors for the connection).
    """

    module: Any = triton_http
    binary: ClassVar[dict[str, bool]] = {"binary_data": True}

    def __init__(self, address: str, *, ssl: bool, conn_limit: int, conn_timeout_s: float) -> None:
        self.address = address
        self.ssl = ssl
        self.conn_limit = conn_limit
        self.conn_timeout_s = conn_timeout_s
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self) -> Any:
        return triton_http.InferenceServerClient(
            self.address,
            conn_limit=self.conn_limit,
            conn_timeout=self.conn_timeout_s,
            ssl=self.ssl,
        )

    def headers(self, request_id: str) -> dict[str, str] | None:
        """Headers of one inference call, a new dict each time (tritonclient adds its own to
        it). aiohttp asks for gzip by default, and Triton then compresses every response: CPU
        on both sides for nothing on a fast link."""
        plain = {"accept-encoding": "identity"}
        return {**plain, "x-request-id": request_id} if request_id else plain

    def tensors(self, inputs: Tensors, outputs: Sequence[str]) -> tuple[list[Any], list[Any]]:
        """The request's inputs and requested outputs, binary both ways."""
        request = []
        for name, array in inputs.items():
            tensor = self.module.InferInput(name, list(array.shape), datatype_of(array))
            tensor.set_data_from_numpy(array, **self.binary)
            request.append(tensor)
        return request, [self.module.InferRequestedOutput(n, **self.binary) for n in outputs]

    async def call(self, method: str, limit_s: float, *args: Any, **kwargs: Any) -> Any:
        async with asyncio.timeout(limit_s):
            return await getattr(self.client(), method)(*args, **kwargs)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


class _GrpcTransport(_Transport):
    """``tritonclient.grpc.aio``: one HTTP/2 channel, tensors in ``raw_*_contents``.

    The limit goes along as the gRPC deadline. gRPC reports a lost or refused connection as
    ``UNAVAILABLE``, the code Triton itself uses for "Exceeds maximum queue size"; what tells
    them apart is the channel, which is no longer ``READY`` after a connection failure.
    """

    module = triton_grpc
    binary: ClassVar[dict[str, bool]] = {}  # always raw bytes

    def __init__(self, address: str, *, reconnect_s: float) -> None:
        super().__init__(address, ssl=False, conn_limit=1, conn_timeout_s=reconnect_s)
        self.reconnect_s = reconnect_s

    def _connect(self) -> Any:
        # Reconnect backoff capped near the probe interval (gRPC's default grows to 120 s), so
        # a host that comes back is seen by the next probe.
        backoff_ms = int(1000 * max(0.1, min(self.reconnect_s, 5.0)))
        return triton_grpc.InferenceServerClient(
            self.address,
            channel_args=[
                ("grpc.max_send_message_length", _GRPC_MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", _GRPC_MAX_MESSAGE_BYTES),
                ("grpc.initial_reconnect_backoff_ms", min(backoff_ms, 1000)),
                ("grpc.max_reconnect_backoff_ms", backoff_ms),
            ],
        )

    def headers(self, request_id: str) -> dict[str, str] | None:
        """gRPC metadata of one call: the request id only (gRPC negotiates compression itself)."""
        return {"x-request-id": request_id} if request_id else None

    async def call(self, method: str, limit_s: float, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().call(method, limit_s, *args, client_timeout=limit_s, **kwargs)
        except InferenceServerException as exc:
            raise self._translate(exc) from None

    def _translate(self, exc: InferenceServerException) -> Exception:
        code = str(exc.status() or "").rpartition(".")[2]  # "StatusCode.NOT_FOUND"
        message = str(exc.message() or code)
        if code == "DEADLINE_EXCEEDED":
            return TimeoutError(message)
        if code == "UNAVAILABLE" and not self._connected():
            return ConnectionError(message)
        said: Exception = InferenceServerException(
            msg=message, status=_GRPC_AS_HTTP.get(code, "500"), debug_details=exc.debug_details()
        )
        return said

    def _connected(self) -> bool:
        channel = getattr(self._client, "_channel", None)  # tritonclient keeps it private
        return channel is not None and channel.get_state() == grpc.ChannelConnectivity.READY


class TritonHost(Host):
    """One Triton server: push models, infer, probe. Implements ``gateway.backends.base.Host``.

    ``prepare`` registers the model version before pushing it. If it raises ``HostUnreachable``
    the registration stays (the monitor pushes it when the host is back; ``release`` gives up
    on it); any other error leaves nothing behind. ``release`` forgets the model (every version)
    and unloads it from Triton.

    Its own monitor re-pushes what a restarted server lost; the router's probe (``health``)
    only asks whether the server is live.
    """

    kind = "triton"

    def __init__(
        self,
        name: str,
        url: str,
        *,
        grpc_url: str | None = None,
        protocol: str | None = None,
        labels: frozenset[str] = frozenset(),
        device: str = "cpu",
        strategy: str = "auto",
        batching: str = "gateway",
        conn_limit: int = 64,
        timeout_s: float = 30.0,
        load_timeout_s: float = 300.0,
        probe_interval_s: float = 2.0,
        host_concurrency: int = 0,
    ) -> None:
        # Values checked where host tables are parsed (gateway.routing.hosts.check_host_table).
        assert strategy in STRATEGIES and protocol in (None, *PROTOCOLS)
        if protocol is None:
            protocol = DEFAULT_PROTOCOL if grpc_url else "http"
        self._name = name
        self.url = url if "://" in url else f"http://{url}"
        self.grpc_url = grpc_url
        self.protocol = protocol
        self._labels = labels | {device}
        self.device = device
        self.strategy = strategy
        self.batching = batching
        self.conn_limit = conn_limit
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = max(0.5, min(2.0, probe_interval_s))
        self.host_concurrency = host_concurrency  # 0: the model's instance count + 1
        self.state = UNKNOWN
        self.reason = ""
        self._downs = 0  # times marked down: a probe out across one must not mark it up
        self._probe_error = ""
        self.used_strategy: str | None = None  # the strategy that worked here
        self.onnxruntime_error = ""  # Triton's words when the onnxruntime backend was missing
        self._models: dict[str, _Placement] = {}
        self._ready: set[str] = set()  # models believed loaded and ready there
        self._lock = asyncio.Lock()  # one repository operation at a time
        self._transport: _Transport
        if protocol == "grpc":
            assert grpc_url is not None
            self._transport = _GrpcTransport(grpc_url, reconnect_s=probe_interval_s)
        else:
            self._transport = _Transport(
                self.url.split("://", 1)[1].rstrip("/"),
                ssl=self.url.startswith("https://"),
                conn_limit=conn_limit,
                conn_timeout_s=load_timeout_s,
            )
        self._monitor: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False

    # -- Host protocol ----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def labels(self) -> frozenset[str]:
        return self._labels

    def serving(self, model: str) -> bool:
        """Whether requests for ``model`` should go here now (no I/O)."""
        return self.state != DOWN and model in self._ready

    def concurrency(self, config: ModelConfig) -> int:
        """``host_concurrency``, or the model's instance count + 1: every instance there has a
        batch and one more waits in Triton's queue."""
        return self.host_concurrency or config.instance_count + 1

    @property
    def batches_upstream(self) -> bool:
        return self.batching == "triton"

    async def health(self) -> bool:
        """Live counts as up: Triton's ``/v2/health/ready`` says no while any model (anyone's)
        failed to load; each of our models is judged by its own readiness."""
        return await self.ready() or await self._probe_call("is_server_live")

    async def prepare(self, source: ModelSource, version: int, config: ModelConfig) -> None:
        self.start()
        async with self._lock:
            old = self._models.get(source.name)
            # A new source (a reload) starts over; more versions of the same one add up.
            kept = old.versions if old is not None and old.source == source else {}
            placement = _Placement(source, config, {**kept, version: source.version_paths[version]})
            self._models[source.name] = placement
            try:
                await self._push(placement)
            except HostUnreachable:
                raise  # the registration stays: the monitor pushes it when the host is back
            except BaseException:
                if old is not None:
                    self._models[source.name] = old
                else:
                    del self._models[source.name]
                raise

    async def infer(
        self,
        model: str,
        version: int,
        inputs: Tensors,
        outputs: Sequence[str],
        timeout_s: float | None = None,
    ) -> Tensors:
        check_dispatch(f"Triton host {self._name}", self._closed, timeout_s)
        request, wanted = self._transport.tensors(inputs, outputs)
        request_id = context.upstream_request_id()
        try:
            result = await self._transport.call(
                "infer",
                timeout_s if timeout_s is not None else self.timeout_s,
                model,
                request,
                model_version=str(version),
                outputs=wanted,
                request_id=request_id,
                headers=tracing.outbound(self._transport.headers(request_id)),
                timeout=int(timeout_s * 1e6) if timeout_s is not None else None,
            )
        except InferenceServerException as exc:
            raise self._error(exc, model) from None
        except TimeoutError:
            raise timed_out(
                f"Triton host {self._name}", timeout_s, self.timeout_s, self.probe_interval_s
            ) from None
        except _CONNECTION_ERRORS as exc:
            raise self._lost(exc) from None
        except (aiohttp.ClientError, ValueError) as exc:  # not HTTP, or a body that lies
            raise Unavailable(
                f"Triton host {self._name} sent a malformed response: {type(exc).__name__}: {exc}",
                retry_after_s=1.0,
            ) from None
        try:
            return {name: result.as_numpy(name) for name in outputs}
        except (ValueError, TypeError, KeyError) as exc:
            raise Unavailable(
                f"Triton host {self._name} sent malformed tensors: {type(exc).__name__}: {exc}",
                retry_after_s=1.0,
            ) from None

    async def ready(self) -> bool:
        return await self._probe_call("is_server_ready")

    async def model_ready(self, model: str, version: int) -> bool:
        return await self._probe_call("is_model_ready", model, str(version))

    async def release(self, model: str) -> None:
        async with self._lock:
            placement = self._models.pop(model, None)
            if placement is None:
                return
            was_ready = model in self._ready
            self._ready.discard(model)
            if self._closed or (self.state == DOWN and not was_ready):
                return
            try:
                await self._transport.call("unload_model", self.probe_timeout_s + 5.0, model)
            except (InferenceServerException, TimeoutError, *_CONNECTION_ERRORS) as exc:
                log.warning("Triton host %s: unloading %s failed: %s", self._name, model, exc)

    async def close(self) -> None:
        self._closed = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        await self._transport.close()

    def describe(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "name": self._name,
            "kind": self.kind,
            "url": self.url,
            "protocol": self.protocol,
            "device": self.device,
            "state": self.state,
            "strategy": self.used_strategy or self.strategy,
            "batching": self.batching,
            "models": sorted(self._ready),
        }
        if self.grpc_url:
            facts["grpc_url"] = self.grpc_url
        if self.reason:
            facts["reason"] = self.reason
        if self.onnxruntime_error:
            facts["onnxruntime_backend_error"] = self.onnxruntime_error
        return facts

    # -- pushing ----------------------------------------------------------------------------

    async def _push(self, placement: _Placement) -> None:
        """Load (or reload) every registered version of the model; caller holds the lock."""
        name = placement.source.name
        versions = sorted(placement.versions)
        payload = await asyncio.to_thread(
            lambda: {v: placement.versions[v].read_bytes() for v in versions}
        )
        strategy = self.used_strategy or self.strategy
        if strategy in ("auto", "onnxruntime"):
            try:
                await self._load(name, placement, versions, "onnxruntime", payload)
                self.used_strategy = "onnxruntime"
                return
            except ModelLoadError as exc:
                if strategy != "auto" or _MISSING_BACKEND not in exc.message:
                    placement.error = exc.message
                    raise
                self.onnxruntime_error = exc.message
                log.warning(
                    "Triton host %s has no onnxruntime backend; using the python backend (%s)",
                    self._name,
                    exc.message,
                )
        await self._load(name, placement, versions, "python", payload)
        self.used_strategy = "python"

    async def _load(
        self,
        name: str,
        placement: _Placement,
        versions: list[int],
        backend: str,
        payload: dict[int, bytes],
    ) -> None:
        cfg = triton_config(placement.config, versions, self.device, backend, self.batching)
        files: dict[str, bytes] = {}
        for version, data in payload.items():
            if backend == "python":
                files.update(python_backend_files(data, version))
            else:
                files[f"file:{version}/model.onnx"] = data
        try:
            await self._transport.call(
                "load_model", self.load_timeout_s, name, config=json.dumps(cfg), files=files
            )
        except InferenceServerException as exc:
            message = f"Triton host {self._name}: {str(exc.message()).strip()}"
            placement.error = message
            raise ModelLoadError(message) from None
        except TimeoutError:
            raise HostUnreachable(
                f"Triton host {self._name}: loading '{name}' took over {self.load_timeout_s} s"
            ) from None
        except _CONNECTION_ERRORS as exc:
            raise self._lost(exc) from None
        placement.error = ""
        self._ready.add(name)
        log.info("Triton host %s: %s versions %s loaded (%s)", self._name, name, versions, backend)

    # -- health -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background monitor (needs a running event loop)."""
        if self._monitor is None and not self._closed:
            self._monitor = asyncio.get_running_loop().create_task(
                self._watch(), name=f"triton-monitor-{self._name}"
            )

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.probe_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.probe()
            except Exception:
                log.exception("Triton host %s: probe failed", self._name)

    async def probe(self) -> None:
        """Check the server and each placed model; push back what it lost.

        Triton's ``/v2/health/ready`` is strict: one model that failed to load (anyone's) makes
        the whole server not ready. So a server that is not ready but live counts as up, and
        each of our models is judged by its own readiness.
        """
        downs = self._downs  # its answers are older than a down seen while it is out
        if not await self.ready() and not await self._probe_call("is_server_live"):
            self._mark_down(self._probe_error or "not live (/v2/health/live)")
            return
        if self._downs != downs:
            return  # marked down (a failed batch) while this probe was out: that is newer
        if self.state != UP:
            log.info("Triton host %s is up", self._name)
        # Up now: each model serves as soon as it is ready there (``serving``), not once every
        # lost one is pushed again (a restart with four models took over 15 s under load).
        self.state, self.reason = UP, ""
        for name in list(self._models):
            async with self._lock:
                placement = self._models.get(name)
                if placement is None:
                    continue
                if await self.model_ready(name, max(placement.versions)):
                    if self._downs != downs:
                        return  # marked down since this probe began; the next one decides
                    self._ready.add(name)
                    continue
                self._ready.discard(name)
                log.warning("Triton host %s lost model %s; pushing it again", self._name, name)
                try:
                    await self._push(placement)
                except HostUnreachable as exc:
                    self._mark_down(exc.message)
                    return
                except GatewayError as exc:
                    log.error("Triton host %s: %s", self._name, exc.message)

    def _mark_down(self, reason: str) -> None:
        if self.state != DOWN:
            log.warning("Triton host %s is down: %s", self._name, reason)
        self.state, self.reason = DOWN, reason
        self._downs += 1
        self._ready.clear()

    def _lost(self, exc: BaseException) -> HostUnreachable:
        """A connection-level failure: mark down, probe again now, and say so."""
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self._mark_down(reason)  # the whole text for the log and GET /admin/hosts
        self._wake.set()
        return HostUnreachable(
            f"Triton host {self._name} is unreachable ({type(exc).__name__})",
            retry_after_s=self.probe_interval_s,
        )

    async def _probe_call(self, method: str, *args: Any) -> bool:
        if self._closed:
            return False
        self._probe_error = ""
        try:
            return bool(await self._transport.call(method, self.probe_timeout_s, *args))
        except (InferenceServerException, TimeoutError, *_CONNECTION_ERRORS) as exc:
            self._probe_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return False

    # -- plumbing ---------------------------------------------------------------------------

    def _error(self, exc: InferenceServerException, model: str) -> GatewayError:
        status = str(exc.status() or "")
        message = f"Triton host {self._name}: {str(exc.message()).strip()}"
        if status == "404" or "unknown model" in message:
            self._ready.discard(model)
            self._wake.set()
            return ModelNotReady(message, retry_after_s=self.probe_interval_s)
        if status in ("503", "429"):
            return Unavailable(message, retry_after_s=self.probe_interval_s)
        if status == "504" or "timeout" in message.lower():
            return DeadlineExceeded(message)
        if status.startswith("4"):
            return InvalidInput(message)
        return GatewayError(message)


def triton_host(
    spec: TritonSpec, *, timeout_s: float, probe_interval_s: float, host_concurrency: int
) -> TritonHost:
    """The host a checked ``[[hosts]]`` table describes (``gateway.routing.hosts.parse_host``)."""
    return TritonHost(
        spec.name,
        spec.url,
        grpc_url=spec.grpc_url,
        protocol=spec.protocol,
        labels=spec.labels,
        device=spec.device,
        strategy=spec.strategy,
        batching=spec.batching,
        conn_limit=spec.conn_limit,
        timeout_s=timeout_s,
        probe_interval_s=probe_interval_s,
        host_concurrency=host_concurrency,
    )
