"""Typed, validated, frozen configuration.

Precedence, lowest first: defaults < TOML file (``--config``) < ``GATEWAY_*`` environment
variables < command-line flags. Every field is a top-level TOML key and an environment variable
named ``GATEWAY_`` + the field name in upper case (``model_repo`` -> ``GATEWAY_MODEL_REPO``).
Tables (``[[hosts]]``) are only read from the file.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import GatewayError

BATCHING_PLACES = ("gateway", "triton")
_TRACE_SCHEMES = ("http", "https", "grpc")  # where a Triton-served model's requests are batched


class SettingsError(GatewayError):
    """The configuration is invalid; raised at start-up."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``gateway serve`` can be told. Units are in the names."""

    model_repo: str = "model_repo"
    # Edge cache, used when model_repo is an origin URL (file://, http(s)://, s3://).
    cache_dir: str = ""  # empty: $XDG_CACHE_HOME/gateway/<hash of the origin URL>
    cache_size_bytes: int = 10 * 1024**3
    peers: tuple[str, ...] = ()  # other edges' base URLs, asked for blobs before the origin
    # Build files from the chunks a manifest lists, fetching only those the cache lacks; false:
    # fetch files whole, as edges did before chunk lists
    edge_chunks: bool = True
    # Seconds between an edge's index checks while it runs (HTTP origins; 0: only when a load
    # asks): each is one conditional GET, and it keeps the origin connection open for the
    # next pull (a gateway node closes idle ones after keepalive_timeout_s, 5 s by default);
    # a model it holds gets the manifest of its newest version fetched as soon as it is listed
    edge_poll_s: float = 4.0
    prefetch: tuple[str, ...] = ()  # pulled (and loaded) at start; never evicted
    # v2 base URLs (``origin``: the origin, a gateway node) that serve a model's requests while
    # this edge fetches it; empty: those requests wait for the fetch
    forward_while_fetching: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 0  # 0: no gRPC front end
    log_level: str = "info"
    # Request limits.
    max_body_bytes: int = 64 * 1024 * 1024
    grpc_max_message_bytes: int = 64 * 1024 * 1024
    # Request line + headers, on every HTTP listener; larger heads get 431 and the connection
    # is closed (the header parser's cost grows faster than linearly with a value's size).
    max_header_bytes: int = 64 * 1024
    # Requests of one gRPC ModelStreamInfer stream read but not yet answered and written; at the
    # bound the stream is not read further until the client takes answers (flow control).
    grpc_stream_max_inflight: int = 16
    # How gRPC is served: asyncio (HTTP/2 read on the serving loop, gateway/grpc/http2.py) or
    # grpcio (grpc.aio; ~10x the CPU per call, and its calls do not batch together)
    grpc_transport: str = "asyncio"
    # asyncio transport: a connection whose client takes no answer bytes for this long while
    # answers wait (zero window, a socket never read) is closed; 0: never. Its other limits
    # are max_connections, header_timeout_s (preface + SETTINGS) and grpc_idle_timeout_s.
    grpc_send_timeout_s: float = 60.0
    # asyncio transport: a connection with no stream and no PING this long is closed (GOAWAY
    # NO_ERROR); 0: never. Longer than keepalive_timeout_s: gRPC clients hold one channel for
    # many calls and reconnect on GOAWAY, and grpc's own servers never close idle ones.
    grpc_idle_timeout_s: float = 300.0
    # gRPC over TLS (both transports): on when a certificate and key are set, the REST ones
    # (tls_certfile, tls_keyfile) unless these name others. grpc_tls_client_cafile: clients
    # must present a certificate this CA signed (mutual TLS), as Triton's --grpc-use-ssl-mutual.
    grpc_tls_certfile: str = ""
    grpc_tls_keyfile: str = ""
    grpc_tls_client_cafile: str = ""
    # Edge replicas: the largest models.json or manifest.json accepted from an origin or peer.
    max_index_bytes: int = 16 * 1024 * 1024
    # Execution.
    # auto: KIND_GPU and KIND_AUTO models (no instance_group is KIND_AUTO) on CUDA where this
    # ONNX Runtime has it, KIND_CPU ones on the CPU; a KIND_GPU model that gets the CPU is logged
    # as an error (gateway_model_cpu_fallback = 1). cpu: never CUDA. cuda: every model on CUDA,
    # or its load fails.
    execution_provider: str = "auto"  # auto | cpu | cuda
    # CUDA sessions (ignored on the CPU). The device of models whose instance_group names no
    # ``gpus``; the arena limit per session, 0: no limit; how the arena grows.
    cuda_device_id: int = 0
    cuda_mem_limit_bytes: int = 0
    cuda_arena_extend_strategy: str = "next_power_of_two"  # next_power_of_two | same_as_requested
    # cuDNN's convolution algorithm search: "exhaustive" (ORT's default) benchmarks every
    # algorithm the first time each input shape is seen, which stalls the batch that brings a
    # new batch size; "heuristic" picks from cuDNN's heuristics at once; "default": one fixed.
    cudnn_conv_algo_search: str = "heuristic"  # heuristic | exhaustive | default
    # 0: one per usable core (ORT's count, within the affinity and cgroup quota; README,
    # "ONNX Runtime threads"); below the cores where other work shares them.
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # ORT's pool threads busy-wait between ops and after a run by default; in a server that
    # shares its cores with the event loop the spinning after a run costs more than it saves.
    # False: threads spin only while a run goes, and only where every instance's pool fits.
    ort_spinning: bool = False
    # Spinning while a run goes saves each op's thread wake-up (tens of us), which only short
    # runs feel, and burns a core whenever a pool thread waits on a preempted one, which long
    # runs feel most (resnet50 on 2 cores beside the event loop: 1.5x the CPU per request;
    # mlp at 64 connections 1.3-1.5x the throughput without). So a pool that may spin does
    # only for models whose batch-1 run, timed at load on a session that does not spin, takes
    # at most this much CPU on its calling thread (README, "ONNX Runtime threads"). 0: no model
    # spins; 10: mlp spins too (a lone mlp request up to 0.8 ms faster on idle cores).
    ort_spin_max_run_ms: float = 0.5
    # A model that does not spin (above) but whose batch-1 run is within ``inline_max_ms`` gets
    # a second session, for lone batches only (those run on the event loop's thread, with
    # nothing else outstanding): its pool spins, idle threads at most this many microseconds
    # (ORT 1.26+'s session.intra_op.spin_duration_us), so a lone request pays no thread
    # wake-up per op while loaded batches keep the session that does not spin. It costs a
    # second session's memory (mlp: +77-100 MiB RSS). 0: none (README, "ONNX Runtime threads").
    ort_lone_spin_us: int = 0
    # A model that does not spin (its runs too long, above) still spins while a run goes, each
    # wait of a pool thread at most this many microseconds (ORT's spin_duration_us): the next
    # op finds the threads awake (resnet50 has ~120 parallel ops a run, each a futex wake-up
    # without), while a thread waiting on a preempted one burns at most this much, not ORT's
    # ~1M pauses. 0: such models do not spin at all (README, "ONNX Runtime threads").
    ort_long_spin_us: int = 0
    warmup: bool = True
    # Python's cyclic GC runs its youngest generation every N net container allocations (700 by
    # default). Each request allocates and frees short-lived objects that outlive that window
    # (they live as long as the batch they wait in), so at 700 the collector took ~10 % of the
    # event loop's CPU and its full collections paused the loop for ~40 ms. 0: Python's default.
    gc_threshold: int = 10_000
    # How long a thread waiting for the GIL lets the holder run before asking for it (Python's
    # default: 5000 us). An ORT worker finishing a batch needs the GIL for a moment to hand
    # results over and start the next batch, while the event loop holds it almost all the time:
    # ORT sat idle ~0.19 ms between batches at the default, ~0.07 ms at 200 us. 0: Python's.
    gil_switch_interval_us: int = 200
    # Batching and queues.
    max_queue_size: int = 1024  # used where a model's config sets none
    # Batches formed ahead per model version while all its instances are busy (0: form a batch
    # only when an instance is free: larger batches, but the backend idles between them).
    batch_pipeline: int = 1
    # adaptive: with an instance free, a short batch waits for more only when the recent arrival
    # rate says a request will join within the delay left (README, "Batching"); triton: every
    # short batch waits the model's whole max_queue_delay_microseconds, as Triton does.
    batching_delay: str = "adaptive"  # adaptive | triton
    # A lone batch (nothing else outstanding, arrivals rare) of a model whose recent executions
    # took at most this long runs on the event loop's thread instead of a worker's: no thread
    # hand-off there and back (README, "Lone requests"). 0: always on a worker thread.
    inline_max_ms: float = 5.0
    default_max_batch_size: int = 4  # for auto-completed batchable models (Triton's default)
    # Loading.
    load_models: tuple[str, ...] = ()  # empty: every model in the repository
    strict_readiness: bool = False  # ready only when every model loaded
    drain_timeout_s: float = 30.0
    # On SIGTERM: report not-ready and refuse new requests (503) for this long before the
    # listener closes, so load balancers stop sending first (Kubernetes' preStop pattern).
    shutdown_delay_s: float = 0.0
    # Security and connection limits.
    api_keys: tuple[str, ...] = ()  # inference credential(s); empty: no authentication
    admin_keys: tuple[str, ...] = ()  # repository load/unload and admin API credential(s)
    admin_api: bool = True  # false: no repository or admin endpoints at all
    # Non-zero: repository/admin endpoints answer only on this port (bound on admin_host, default
    # ``host``), and not on ``port``; e.g. a loopback-only or network-policy-guarded listener.
    admin_port: int = 0
    admin_host: str = ""
    max_connections: int = 0  # concurrent connections + requests before 503; 0: unlimited
    keepalive_timeout_s: float = 5.0
    body_timeout_s: float = 30.0  # a client must deliver its whole body within this
    header_timeout_s: float = 10.0  # the request line and headers must arrive within this
    # Plain inference POSTs (HTTP/1.1, body <= 64 KiB, no auth) answered by the connection
    # layer without an ASGI cycle (gateway/server/connections.py); false: all through uvicorn.
    raw_infer: bool = True
    # System shared memory (Triton's extension, gateway/shared_memory.py): regions clients may
    # have registered at once (each one mapping and one file descriptor); 0 turns it off.
    shared_memory_max_regions: int = 256
    tls_certfile: str = ""  # with tls_keyfile: serve HTTPS
    tls_keyfile: str = ""
    # Observability.
    access_log: bool = True  # one JSON line per inference request on the gateway.access logger
    log_format: str = "json"  # json | text
    # The name in server metadata (GET /v2, gRPC ServerMetadata); "triton" for clients that
    # check it (Triton's health/metadata examples do).
    server_name: str = "gateway"
    hosts: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    # Remote Triton hosts (``[[hosts]]`` tables with ``kind = "triton"``).
    triton_strategy: str = "auto"  # auto | onnxruntime | python: the backend models get there
    # Where requests for a Triton-served model are batched: "gateway" (the gateway waits the
    # model's max_queue_delay, Triton runs what arrives: one wait) or "triton" (the gateway
    # forwards at once and Triton waits; for a Triton host that other clients also use).
    triton_batching: str = "gateway"
    host_probe_interval_s: float = 2.0  # health probe period; a host back up gets its models again
    # Batches in flight per model version and host (summed over its hosts); 0: the model's
    # instance count + 1, so every instance has a batch and one more waits (Triton merges it).
    host_concurrency: int = 0
    host_timeout_s: float = 30.0  # one request to a host, when the caller set no deadline
    # Multi-host routing (``gateway.routing``; used when there is any ``[[hosts]]`` table).
    # Host tables: name, url (or dns + port: re-resolved every dns_refresh_s, one host per
    # address), kind = "v2" | "triton", labels, weight, models (placement; empty: all),
    # max_inflight, push (v2: load missing models there through the repository API).
    routing_policy: str = "latency"  # latency | least_request | round_robin
    local_execution: bool = True  # the in-process ONNX Runtime is one of the targets
    host_max_inflight: int = 16  # batches in flight per host (all models); then wait, then 429
    host_wait_s: float = 1.0  # longest wait for a free slot when every host is full
    retry_budget_ratio: float = 0.2  # retries in flight <= this fraction of requests in flight
    ejection_base_s: float = 2.0  # passive ejection: base_s * times ejected (capped at 30 s)
    max_ejected_fraction: float = 0.5  # never eject more than this share of hosts
    dns_refresh_s: float = 10.0
    # Cold-start pricing until measured: a host's bandwidth from the origin, a model's load time.
    host_bandwidth_bps: float = 12.5e6  # bytes/s (100 Mbit/s)
    host_load_s: float = 5.0
    # Routing at fleet sizes (hundreds to thousands of hosts).
    host_probe_jitter: float = 0.2  # a probe moves by up to this fraction of its period
    host_probe_rate: float = 100.0  # probes/s over all hosts, at most: the period stretches
    host_unhealthy_threshold: int = 2  # failed probes in a row before a host is marked down
    host_healthy_threshold: int = 2  # successful probes in a row before it is marked up again
    # Aperture (gateway/routing/aperture.py): above this many hosts, traffic goes to a subset of
    # at least this many, grown while more than host_aperture_load batches per host are in
    # flight; 0: every host. host_aperture_coordinate: this front's place on the hosts' ring in
    # [0, 1) (front i of k: i / k, so fronts cover the fleet between them); -1: random.
    host_aperture: int = 12
    host_aperture_load: float = 2.0
    host_aperture_coordinate: float = -1.0
    host_probe_idle_interval_s: float = 60.0  # probe period of hosts outside the aperture
    # /metrics: per-host series up to this many hosts; above, families aggregated over hosts.
    metrics_host_series_max: int = 100
    # Tracing (OpenTelemetry, gateway/tracing.py): spans sent over OTLP to this collector URL
    # (a path, e.g. http://collector:4318/v1/traces: OTLP/HTTP; none, http://collector:4317:
    # OTLP/gRPC); empty: tracing off, at no cost. Requests without a caller's traceparent are
    # sampled at this ratio (the trace extension's trace_rate changes it at run time).
    trace_endpoint: str = ""
    trace_sample_ratio: float = 1.0
    trace_service_name: str = "gateway"
    # Response cache (models whose config.pbtxt says ``response_cache { enable: true }``): in
    # this process, LRU within this many bytes (0: none), or shared in Redis when a URL is set
    # (redis://host:port/db); each Redis call gives up after the timeout and counts as a miss.
    response_cache_bytes: int = 0
    response_cache_redis_url: str = ""
    response_cache_redis_timeout_s: float = 0.05
    response_cache_redis_ttl_s: float = 0.0  # 0: entries never expire (Redis' maxmemory evicts)
    response_cache_redis_prefix: str = "gateway:response:"
    # Traffic splits between versions (``[[version_weights]]`` tables, file only): model,
    # weights = {"1" = 90, "2" = 10}, sticky_header (same value, same version), shadow (a
    # version that gets a copy of each request, answer dropped), shadow_fraction. Changed at
    # run time with the admin API (/admin/splits).
    version_weights: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not 0 <= self.admin_port < 65536 or (self.admin_port and self.admin_port == self.port):
            raise SettingsError(f"admin_port must be 0 or differ from port, got {self.admin_port}")
        if not 0 < self.port < 65536:
            raise SettingsError(f"port must be 1..65535, got {self.port}")
        if not 0 <= self.grpc_port < 65536 or (self.grpc_port and self.grpc_port == self.port):
            raise SettingsError(
                f"grpc_port must be 0 (off) or 1..65535, not the HTTP port; got {self.grpc_port}"
            )
        if self.grpc_max_message_bytes < 1024:
            raise SettingsError("grpc_max_message_bytes must be at least 1024")
        if self.max_body_bytes < 1024:
            raise SettingsError("max_body_bytes must be at least 1024")
        if self.max_header_bytes < 1024:
            raise SettingsError("max_header_bytes must be at least 1024")
        if self.grpc_stream_max_inflight < 1:
            raise SettingsError("grpc_stream_max_inflight must be at least 1")
        if self.grpc_send_timeout_s < 0:
            raise SettingsError("grpc_send_timeout_s must be >= 0")
        if self.grpc_idle_timeout_s < 0:
            raise SettingsError("grpc_idle_timeout_s must be >= 0")
        if self.grpc_transport not in ("asyncio", "grpcio"):
            raise SettingsError(
                f"grpc_transport must be asyncio or grpcio, got {self.grpc_transport!r}"
            )
        if bool(self.grpc_tls_certfile) != bool(self.grpc_tls_keyfile):
            raise SettingsError("grpc_tls_certfile and grpc_tls_keyfile go together")
        if self.grpc_tls_client_cafile and self.grpc_tls is None:
            raise SettingsError(
                "grpc_tls_client_cafile needs a certificate and key (grpc_tls_certfile and "
                "grpc_tls_keyfile, or tls_certfile and tls_keyfile)"
            )
        if self.max_index_bytes < 1024:
            raise SettingsError("max_index_bytes must be at least 1024")
        if self.execution_provider not in ("auto", "cpu", "cuda"):
            raise SettingsError(
                f"execution_provider must be auto, cpu or cuda, got {self.execution_provider!r}"
            )
        if self.cuda_device_id < 0 or self.cuda_mem_limit_bytes < 0:
            raise SettingsError("cuda_device_id and cuda_mem_limit_bytes must be >= 0")
        if self.cuda_arena_extend_strategy not in ("next_power_of_two", "same_as_requested"):
            raise SettingsError(
                "cuda_arena_extend_strategy must be next_power_of_two or same_as_requested, "
                f"got {self.cuda_arena_extend_strategy!r}"
            )
        if self.cudnn_conv_algo_search not in ("heuristic", "exhaustive", "default"):
            raise SettingsError(
                "cudnn_conv_algo_search must be heuristic, exhaustive or default, "
                f"got {self.cudnn_conv_algo_search!r}"
            )
        if self.shared_memory_max_regions < 0:
            raise SettingsError("shared_memory_max_regions must be >= 0")
        if self.max_queue_size < 1:
            raise SettingsError("max_queue_size must be >= 1")
        if self.default_max_batch_size < 0:
            raise SettingsError("default_max_batch_size must be >= 0")
        if not self.server_name.strip() or len(self.server_name) > 128:
            raise SettingsError("server_name must be 1 to 128 characters")
        if self.log_format not in ("json", "text"):
            raise SettingsError(f"log_format must be json or text, got {self.log_format!r}")
        if self.shutdown_delay_s < 0 or self.drain_timeout_s < 0:
            raise SettingsError("shutdown_delay_s and drain_timeout_s must be >= 0")
        if self.triton_strategy not in ("auto", "onnxruntime", "python"):
            raise SettingsError(
                f"triton_strategy must be auto, onnxruntime or python, got {self.triton_strategy!r}"
            )
        if self.triton_batching not in BATCHING_PLACES:
            raise SettingsError(
                f"triton_batching must be gateway or triton, got {self.triton_batching!r}"
            )
        if self.host_probe_interval_s <= 0 or self.host_timeout_s <= 0 or self.host_concurrency < 0:
            raise SettingsError(
                "host_probe_interval_s and host_timeout_s must be > 0, host_concurrency >= 0"
            )
        if self.routing_policy not in ("latency", "least_request", "round_robin"):
            raise SettingsError(
                "routing_policy must be latency, least_request or round_robin, "
                f"got {self.routing_policy!r}"
            )
        if self.host_max_inflight < 1 or self.host_wait_s < 0 or self.dns_refresh_s <= 0:
            raise SettingsError("host_max_inflight >= 1, host_wait_s >= 0, dns_refresh_s > 0")
        if not 0 <= self.retry_budget_ratio <= 1 or not 0 <= self.max_ejected_fraction <= 1:
            raise SettingsError("retry_budget_ratio and max_ejected_fraction must be in 0..1")
        if self.host_bandwidth_bps <= 0 or self.host_load_s < 0:
            raise SettingsError("host_bandwidth_bps must be > 0 and host_load_s >= 0")
        if self.ejection_base_s <= 0:
            raise SettingsError("ejection_base_s must be > 0")
        if not 0 <= self.host_probe_jitter < 1 or self.host_probe_rate <= 0:
            raise SettingsError("host_probe_jitter must be in [0, 1) and host_probe_rate > 0")
        if self.host_unhealthy_threshold < 1 or self.host_healthy_threshold < 1:
            raise SettingsError("host_unhealthy_threshold and host_healthy_threshold must be >= 1")
        if self.host_aperture < 0 or self.host_aperture_load <= 0:
            raise SettingsError("host_aperture must be >= 0 and host_aperture_load > 0")
        if self.host_probe_idle_interval_s <= 0:
            raise SettingsError("host_probe_idle_interval_s must be > 0")
        if not (0 <= self.host_aperture_coordinate < 1 or self.host_aperture_coordinate == -1):
            raise SettingsError("host_aperture_coordinate must be in [0, 1), or -1 (random)")
        if self.metrics_host_series_max < 0:
            raise SettingsError("metrics_host_series_max must be >= 0")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise SettingsError(f"log_level {self.log_level!r} is not a logging level")
        if not 0 <= self.batch_pipeline <= 16:
            raise SettingsError(f"batch_pipeline must be in 0..16, got {self.batch_pipeline}")
        if self.batching_delay not in ("adaptive", "triton"):
            raise SettingsError(
                f"batching_delay must be adaptive or triton, got {self.batching_delay!r}"
            )
        if self.ort_spin_max_run_ms < 0:
            raise SettingsError(f"ort_spin_max_run_ms must be >= 0, got {self.ort_spin_max_run_ms}")
        if self.ort_lone_spin_us < 0:
            raise SettingsError(f"ort_lone_spin_us must be >= 0, got {self.ort_lone_spin_us}")
        if self.ort_long_spin_us < 0:
            raise SettingsError(f"ort_long_spin_us must be >= 0, got {self.ort_long_spin_us}")
        if self.inline_max_ms < 0:
            raise SettingsError(f"inline_max_ms must be >= 0, got {self.inline_max_ms}")
        if self.gc_threshold < 0 or self.gil_switch_interval_us < 0:
            raise SettingsError(
                "gc_threshold and gil_switch_interval_us must be >= 0 (0: Python's default)"
            )
        if self.header_timeout_s <= 0:
            raise SettingsError("header_timeout_s must be > 0")
        if self.cache_size_bytes < 1:
            raise SettingsError("cache_size_bytes must be >= 1")
        if not 0 <= self.trace_sample_ratio <= 1:
            raise SettingsError(f"trace_sample_ratio must be 0..1, got {self.trace_sample_ratio}")
        if self.trace_endpoint and urlsplit(self.trace_endpoint).scheme not in _TRACE_SCHEMES:
            raise SettingsError(
                f"trace_endpoint must be an http://, https:// or grpc:// URL, "
                f"got {self.trace_endpoint!r}"
            )
        if self.response_cache_bytes < 0 or self.response_cache_redis_ttl_s < 0:
            raise SettingsError("response_cache_bytes and response_cache_redis_ttl_s must be >= 0")
        if self.response_cache_redis_timeout_s <= 0:
            raise SettingsError("response_cache_redis_timeout_s must be > 0")
        if self.response_cache_redis_url and not self.response_cache_redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise SettingsError(
                "response_cache_redis_url must be a redis://, rediss:// or unix:// URL"
            )
        if self.version_weights:  # checked here, so a bad table stops the start with its reason
            from gateway.splits import VersionSplits  # imports this module: only at call time

            VersionSplits(self.version_weights)
        for name in ("api_keys", "admin_keys"):
            keys: tuple[str, ...] = getattr(self, name)
            # An empty key would match a request that sends no credential at all.
            if any(not key.strip() or key != key.strip() for key in keys):
                raise SettingsError(
                    f"{name}: keys must be non-empty and have no leading or trailing whitespace"
                )

    @property
    def model_repo_path(self) -> Path:
        return Path(self.model_repo)

    @property
    def grpc_tls(self) -> tuple[str, str] | None:
        """gRPC's certificate and key files, or None for plaintext: its own pair when set, else
        the REST listener's (a gateway that serves HTTPS does not serve gRPC in the clear)."""
        if self.grpc_tls_certfile:
            return self.grpc_tls_certfile, self.grpc_tls_keyfile
        if self.tls_certfile and self.tls_keyfile:
            return self.tls_certfile, self.tls_keyfile
        return None


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """Convert a file or environment value to the field's type, with a message naming it."""
    text_kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    try:
        if text_kind == "bool":
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if text_kind == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if text_kind == "float":
            return float(value)
        if text_kind == "str":
            if not isinstance(value, str):
                raise ValueError(value)
            return value
        if text_kind.startswith("tuple[str"):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        if text_kind.startswith("tuple[Mapping"):
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ValueError(value)
            return tuple(value)
    except (TypeError, ValueError):
        raise SettingsError(f"setting '{name}': {value!r} is not a valid {text_kind}") from None
    raise SettingsError(f"setting '{name}' has an unsupported type {text_kind}")


def load_settings(
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge defaults, the TOML file, ``GATEWAY_*`` variables and explicit overrides."""
    env = os.environ if env is None else env
    known = {f.name: f.type for f in fields(Settings)}
    values: dict[str, Any] = {}
    if config_file is None and env.get("GATEWAY_CONFIG"):
        config_file = env["GATEWAY_CONFIG"]
    if config_file is not None:
        try:
            data = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"config file {config_file}: {exc}") from None
        for key, value in data.items():
            if key not in known:
                raise SettingsError(f"config file {config_file}: unknown setting '{key}'")
            values[key] = _coerce(key, value, known[key])
    for key, kind in known.items():
        env_value = env.get(f"GATEWAY_{key.upper()}")
        if env_value is not None and key not in ("hosts", "version_weights"):
            values[key] = _coerce(key, env_value, kind)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in known:
            raise SettingsError(f"unknown setting '{key}'")
        values[key] = _coerce(key, value, known[key])
    return dataclasses.replace(Settings(), **values) if values else Settings()
