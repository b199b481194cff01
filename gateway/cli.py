"""Command line: ``gateway serve``."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from typing import Any

from gateway import logs
from gateway.errors import GatewayError
from gateway.settings import Settings, load_settings


def build_app(settings: Settings) -> Any:
    """Wire the parts: repository -> backend factory -> data plane -> HTTP (+ gRPC) app."""
    from gateway.backends.onnxruntime import OnnxRuntimeFactory
    from gateway.dataplane import DataPlane
    from gateway.repository.local import LocalRepository
    from gateway.server import create_app

    repository = LocalRepository(settings.model_repo_path)
    dataplane = DataPlane(settings, repository, OnnxRuntimeFactory(settings))
    if not settings.grpc_port:
        return create_app(dataplane)
    from gateway.grpc import GrpcServer

    grpc_server = GrpcServer(
        dataplane,
        settings.host,
        settings.grpc_port,
        settings.grpc_max_message_bytes,
        grace_s=settings.drain_timeout_s,
    )
    return create_app(dataplane, on_startup=[grpc_server.start], on_shutdown=[grpc_server.stop])


def _fastest(*names: str) -> str:
    """uvicorn's fast implementations when installed, its pure-Python ones otherwise."""
    for name in names:
        module = {"uvloop": "uvloop", "httptools": "httptools"}.get(name)
        if module is None or importlib.util.find_spec(module) is not None:
            return name
    return names[-1]


def serve(settings: Settings) -> None:
    import threading
    import types

    import uvicorn

    logs.configure(settings.log_level, settings.log_format)
    app = build_app(settings)
    dataplane = app.state.dataplane

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

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop=_fastest("uvloop", "asyncio"),
        http=_fastest("httptools", "h11"),
        log_level=settings.log_level.lower(),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        limit_concurrency=settings.max_connections or None,
        timeout_keep_alive=int(settings.keepalive_timeout_s),
        ssl_certfile=settings.tls_certfile or None,
        ssl_keyfile=settings.tls_keyfile or None,
    )
    DrainingServer(config).run()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="serve every model in a repository")
    serve_cmd.add_argument("--model-repo", help="model repository directory [model_repo]")
    serve_cmd.add_argument("--host", help="address to bind [127.0.0.1]")
    serve_cmd.add_argument("--port", type=int, help="HTTP port [8000]")
    serve_cmd.add_argument("--grpc-port", type=int, help="gRPC port; 0 turns gRPC off [0]")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        settings = load_settings(args.config, overrides=overrides)
    except GatewayError as exc:
        print(f"gateway: {exc.message}", file=sys.stderr)
        return 2
    if args.command == "serve":
        serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
