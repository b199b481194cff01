"""Command line: ``gateway serve``."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import sys
from collections.abc import Sequence
from typing import Any

from gateway import logs, tracing
from gateway.errors import GatewayError
from gateway.settings import Settings, SettingsError, load_settings


def build_app(settings: Settings) -> Any:
    """Wire the parts: repository -> backend factory -> data plane -> HTTP (+ gRPC) app."""
    from gateway.backends.onnxruntime import OnnxRuntimeFactory
    from gateway.dataplane import DataPlane
    from gateway.repository.local import LocalRepository
    from gateway.server import create_app

    repository = LocalRepository(settings.model_repo_path)
    edge: Any = None
    if "://" in settings.model_repo:  # an origin URL: pull into a verified local cache
        from gateway.repository.edge import EdgeRepository

        repository = edge = EdgeRepository(settings)
    factory: Any = OnnxRuntimeFactory(settings)
    hosts: Any = None  # the router's admin surface, for /admin/hosts
    on_shutdown: list[Any] = []
    if settings.hosts:
        # Hosts of any kind (Triton, v2, DNS groups) and local execution are targets of one
        # router; a Triton-only deployment is that router without the local runtime.
        from gateway.backends.placement import RoutedFactory

        factory = hosts = RoutedFactory(settings)
        on_shutdown.append(factory.close)
    forwarder: Any = None
    metric_sources: list[Any] = []
    if edge is not None:
        on_shutdown.append(edge.close)
        metric_sources.append(edge.metric_families)
        if settings.forward_while_fetching:
            from gateway.forwarding import Forwarder

            forwarder = Forwarder(settings, edge)
            metric_sources.append(forwarder.metric_families)
            on_shutdown.append(forwarder.close)
    if settings.grpc_port and settings.grpc_transport == "asyncio":
        from gateway.grpc import http2

        metric_sources.append(http2.metric_families)
    dataplane = DataPlane(
        settings, repository, factory, forwarder=forwarder, metric_sources=metric_sources
    )
    if edge is not None:
        edge.attach(dataplane)  # loaded models are never evicted; changed ones reload
    if not settings.grpc_port:
        return create_app(dataplane, on_shutdown=on_shutdown, hosts=hosts)
    from gateway.grpc.server import grpc_server as make_grpc_server

    grpc_server = make_grpc_server(dataplane)
    return create_app(
        dataplane,
        on_startup=[grpc_server.start],
        on_shutdown=[grpc_server.stop, *on_shutdown],
        hosts=hosts,
    )


def _fastest(*names: str) -> str:
    """uvicorn's fast implementations when installed, its pure-Python ones otherwise."""
    for name in names:
        module = {"uvloop": "uvloop", "httptools": "httptools"}.get(name)
        if module is None or importlib.util.find_spec(module) is not None:
            return name
    return names[-1]


def _http_protocol(settings: Settings) -> Any:
    """httptools with per-connection timeouts, the head cap and gathered writes; h11 (no header
    timeout, the body timeout kept per request, its own head cap) when httptools is missing."""
    if _fastest("httptools", "h11") == "h11":
        logging.getLogger(__name__).warning("httptools is not installed: no header read timeout")
        return "h11"
    from gateway.server.connections import connection_protocol

    return connection_protocol(
        settings.header_timeout_s, settings.body_timeout_s, settings.max_header_bytes
    )


def tune_interpreter(gc_threshold: int, switch_interval_us: int) -> None:
    """Python's youngest-generation GC threshold and GIL switch interval for this process (0
    leaves Python's own); see ``Settings`` for why."""
    if gc_threshold:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(gc_threshold, older, oldest)
    if switch_interval_us:
        sys.setswitchinterval(switch_interval_us / 1e6)


def serve(settings: Settings) -> None:
    import socket
    import threading
    import types

    import uvicorn

    logs.configure(settings.log_level, settings.log_format)
    tune_interpreter(settings.gc_threshold, settings.gil_switch_interval_us)
    tracing.setup(settings)
    app = build_app(settings)
    dataplane = app.dataplane

    class DrainingServer(uvicorn.Server):
        """SIGTERM: turn not-ready and refuse new requests at once, keep serving what is in
        flight, close the listener after ``shutdown_delay_s``; a second signal exits now."""

        def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
            if dataplane.draining or settings.shutdown_delay_s <= 0:
                dataplane.draining = True
                super().handle_exit(sig, frame)
                return
            dataplane.draining = True
            timer = threading.Timer(settings.shutdown_delay_s, super().handle_exit, (sig, frame))
            timer.daemon = True
            timer.start()

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            # What start built (modules, models, a fleet's hosts) lives as long as the process:
            # frozen out of the collector's full passes, which otherwise walk all of it (at a
            # thousand hosts 60-120 ms on the shared bench machine: a p99 stall).
            gc.collect()
            gc.freeze()

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop=_fastest("uvloop", "asyncio"),
        http=_http_protocol(settings),
        h11_max_incomplete_event_size=settings.max_header_bytes,  # h11's head cap (400)
        log_level=settings.log_level.lower(),
        log_config=None,
        access_log=False,
        proxy_headers=False,  # nothing here reads the client address; it costs per request
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        limit_concurrency=settings.max_connections or None,
        timeout_keep_alive=int(settings.keepalive_timeout_s),
        ssl_certfile=settings.tls_certfile or None,
        ssl_keyfile=settings.tls_keyfile or None,
    )
    if not settings.admin_port:
        DrainingServer(config).run()
        return
    # One server on two sockets; AdminPortGuard tells them apart by the local port.
    admin_host = settings.admin_host or settings.host
    admin = uvicorn.Config(app, host=admin_host, port=settings.admin_port, proxy_headers=False)
    DrainingServer(config).run(sockets=[config.bind_socket(), admin.bind_socket()])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="serve every model in a repository")
    serve_cmd.add_argument("--model-repo", help="model repository directory [model_repo]")
    serve_cmd.add_argument("--host", help="address to bind [127.0.0.1]")
    serve_cmd.add_argument("--port", type=int, help="HTTP port [8000]")
    serve_cmd.add_argument("--grpc-port", type=int, help="gRPC port; 0 turns gRPC off [0]")
    serve_cmd.add_argument(
        "--admin-port", type=int, help="serve the repository/admin API only on this port [off]"
    )
    serve_cmd.add_argument(
        "--grpc-max-message-bytes", type=int, help="gRPC message size limit [64 MiB]"
    )
    serve_cmd.add_argument("--config", help="TOML settings file (also GATEWAY_CONFIG)")
    serve_cmd.add_argument("--log-level", help="debug, info, warning, error [info]")
    serve_cmd.add_argument("--max-body-bytes", type=int, help="request body limit [64 MiB]")
    serve_cmd.add_argument(
        "--execution-provider", choices=["auto", "cpu", "cuda"], help="ONNX Runtime provider"
    )
    serve_cmd.add_argument("--max-queue-size", type=int, help="default per-model queue bound")
    serve_cmd.add_argument("--trace-endpoint", help="OTLP collector URL; empty: no tracing [off]")
    serve_cmd.add_argument(
        "--trace-sample-ratio", type=float, help="share of requests traced, 0..1 [1.0]"
    )
    serve_cmd.add_argument("--trace-service-name", help="service.name of the spans [gateway]")
    serve_cmd.add_argument(
        "--batching-delay",
        choices=["adaptive", "triton"],
        help="wait for a fuller batch only when traffic says it fills (adaptive), or always "
        "the model's max_queue_delay (triton) [adaptive]",
    )
    serve_cmd.add_argument(
        "--grpc-transport",
        choices=["asyncio", "grpcio"],
        help="serve gRPC with HTTP/2 on the serving loop (asyncio) or with grpc.aio [asyncio]",
    )
    serve_cmd.add_argument(
        "--grpc-send-timeout-s",
        type=float,
        help="close a gRPC connection that takes no answer bytes this long; 0: never [60]",
    )
    serve_cmd.add_argument(
        "--response-cache-bytes", type=int, help="in-process response cache size [0: none]"
    )
    serve_cmd.add_argument(
        "--response-cache-redis-url", help="shared response cache in Redis (redis://host:port)"
    )
    serve_cmd.add_argument(
        "--grpc-tls-certfile", help="gRPC over TLS: certificate (PEM) [tls_certfile, else off]"
    )
    serve_cmd.add_argument("--grpc-tls-keyfile", help="gRPC over TLS: private key [tls_keyfile]")
    serve_cmd.add_argument(
        "--grpc-tls-client-cafile",
        help="mutual TLS: gRPC clients must present a certificate this CA signed [off]",
    )
    _edge_arguments(commands, serve_cmd)
    return parser


def _edge_arguments(commands: Any, serve_cmd: argparse.ArgumentParser) -> None:
    """Edge caches: ``serve --cache-dir/--cache-size``, ``gateway pull``, ``gateway manifest``."""
    from gateway.repository.cache import parse_size

    pull_cmd = commands.add_parser("pull", help="fetch models from an origin into the cache")
    pull_cmd.add_argument("models", nargs="*", help="model names [every model of the origin]")
    pull_cmd.add_argument("--model-repo", help="origin URL: file://, http(s)://, s3://")
    pull_cmd.add_argument("--config", help="TOML settings file (also GATEWAY_CONFIG)")
    for cmd in (serve_cmd, pull_cmd):
        cmd.add_argument("--cache-dir", help="edge cache directory [~/.cache/gateway/...]")
        cmd.add_argument(
            "--cache-size", dest="cache_size_bytes", type=parse_size, help="bytes, e.g. 10GiB"
        )
        cmd.add_argument("--peers", help="comma-separated peer edge URLs, asked before the origin")
    serve_cmd.add_argument("--prefetch", help="comma-separated models to pull and load at start")
    serve_cmd.add_argument(
        "--edge-poll", dest="edge_poll_s", type=float, help="seconds between index checks [4]"
    )
    serve_cmd.add_argument(
        "--forward-while-fetching",
        help="comma-separated v2 base URLs ('origin': the origin node) to serve a model's "
        "requests while it is fetched",
    )
    manifest_cmd = commands.add_parser(
        "manifest", help="write manifest.json files and models.json for an origin"
    )
    manifest_cmd.add_argument("--model-repo", required=True, help="repository directory")
    manifest_cmd.add_argument(
        "--chunk-size",
        type=parse_size,
        help="average content-defined chunk size, e.g. 1MiB [64KiB]; 0: no chunk lists",
    )


def _manifest(model_repo: str, chunk_avg_bytes: int | None = None) -> int:
    from pathlib import Path

    from gateway.repository.manifest import CHUNK_AVG_BYTES, write_manifests

    avg = CHUNK_AVG_BYTES if chunk_avg_bytes is None else chunk_avg_bytes
    if avg and not 1024 <= avg <= 4 * 1024**2:
        print("gateway manifest: --chunk-size must be 0 or 1KiB..4MiB", file=sys.stderr)
        return 2
    for name, versions in write_manifests(Path(model_repo), avg).items():
        print(f"{name}: {versions} version(s)", file=sys.stderr)
    return 0


def _pull(settings: Settings, names: Sequence[str]) -> int:
    """Fetch into the cache with a progress line per model on stderr; no model is loaded."""
    import asyncio
    import time

    from gateway.repository.edge import EdgeRepository

    if "://" not in settings.model_repo:
        print("gateway pull: --model-repo must be an origin URL", file=sys.stderr)
        return 2

    async def run() -> None:
        edge = EdgeRepository(settings)
        try:
            for name in names or sorted(await edge.refresh_index()):
                started, done = time.monotonic(), 0

                def advance(delta: int, name: str = name, started: float = started) -> None:
                    nonlocal done
                    done += delta
                    rate = done / max(time.monotonic() - started, 1e-6) / 1e6
                    print(
                        f"\r{name}: {done / 1e6:9.1f} MB  {rate:7.1f} MB/s",
                        end="",
                        file=sys.stderr,
                        flush=True,
                    )

                await edge.pull(name, advance)
                print(f"\r{name}: {done / 1e6:9.1f} MB  done", file=sys.stderr)
        finally:
            await edge.close()

    try:
        asyncio.run(run())
    except GatewayError as exc:
        print(f"\ngateway pull: {exc.message}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "manifest":
        return _manifest(args.model_repo, args.chunk_size)
    skip = ("command", "config", "models")
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    try:
        settings = load_settings(args.config, overrides=overrides)
    except GatewayError as exc:
        print(f"gateway: {exc.message}", file=sys.stderr)
        return 2
    if args.command == "serve":
        try:
            serve(settings)
        except SettingsError as exc:  # found while building (the hosts' file descriptors)
            print(f"gateway: {exc.message}", file=sys.stderr)
            return 2
    if args.command == "pull":
        return _pull(settings, args.models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
