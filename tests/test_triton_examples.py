"""Triton's own Python client examples for ``simple``, run unchanged against a real gateway.

The scripts are NVIDIA's (triton-inference-server/client, src/python/examples, BSD-3-Clause),
third-party test inputs rather than the project's code: ``scripts/triton_examples.sh`` fetches
them at a pinned tag into ``.cache/triton_examples`` (or ``TRITON_EXAMPLES_DIR``), and each test
skips, saying so, where a script is not there (no network here). The repository holds the models
they use (Triton's ``simple``, ``simple_string`` and ``simple_identity``). The gateway names
itself "triton", as the health/metadata scripts check. The system shared-memory scripts run
where the gateway advertises that extension (it does since the shared-memory work merged).

Each model-control script runs on a gateway of its own, whose repository holds as many models as
that script counts (read from the script: the HTTP and gRPC ones count 7 and 8), and which it
may leave with ``simple`` unloaded without the shared-memory scripts, which infer on ``simple``,
seeing it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.http as httpclient

from tests import models
from tests.helpers import ROOT, GatewayProcess, free_port, start_gateway

EXAMPLES = Path(os.environ.get("TRITON_EXAMPLES_DIR", ROOT / ".cache" / "triton_examples"))

HTTP = [
    "simple_http_infer_client.py",
    "simple_http_async_infer_client.py",
    "simple_http_aio_infer_client.py",
    "simple_http_string_infer_client.py",
    "simple_http_health_metadata.py",
]
GRPC = [
    "simple_grpc_infer_client.py",
    "simple_grpc_async_infer_client.py",
    "simple_grpc_aio_infer_client.py",
    "simple_grpc_string_infer_client.py",
    "simple_grpc_health_metadata.py",
]
MODEL_CONTROL = ["simple_http_model_control.py", "simple_grpc_model_control.py"]
SHARED_MEMORY = [
    "simple_http_shm_client.py",
    "simple_grpc_shm_client.py",
    "simple_http_shm_string_client.py",
    "simple_grpc_shm_string_client.py",
]
_COUNT = re.compile(r"get_model_repository_index\(\)[^\n]*!=\s*(\d+)")


def _script(name: str) -> Path:
    path = EXAMPLES / name
    if not path.is_file():
        pytest.skip(f"{name} not fetched: run scripts/triton_examples.sh (needs network)")
    return path


def _models_counted(path: Path) -> int:
    """The repository size a model-control script checks (7 or 8 by script and revision)."""
    match = _COUNT.search(path.read_text())
    return int(match[1]) if match is not None else 3


def _start(tmp_path_factory: pytest.TempPathFactory, count: int = 3) -> tuple[GatewayProcess, int]:
    """A gateway (HTTP, and gRPC on the port returned) over the examples' models and fillers."""
    repo = tmp_path_factory.mktemp("examples-repo")
    models.add_sub(repo, "simple")
    models.string_add_sub(repo, "simple_string")
    models.bytes_identity(repo, "simple_identity")  # the string examples' second model
    for index in range(count - 3):
        models.add_sub(repo, f"filler_{index}")
    grpc_port = free_port()
    gateway = start_gateway(
        repo,
        tmp_path_factory.mktemp("examples-logs"),
        "--grpc-port",
        str(grpc_port),
        env={"GATEWAY_SERVER_NAME": "triton", "GATEWAY_ACCESS_LOG": "false"},
    )
    return gateway, grpc_port


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, int]]:
    gateway, grpc_port = _start(tmp_path_factory)
    try:
        yield gateway, grpc_port
    finally:
        gateway.stop()


def _run(path: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(path), "-u", url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=path.parent,
    )


@pytest.mark.parametrize("name", HTTP + GRPC)
def test_example_passes_unchanged(name: str, served: tuple[GatewayProcess, int]) -> None:
    gateway, grpc_port = served
    path = _script(name)
    url = gateway.address if "_http_" in name else f"127.0.0.1:{grpc_port}"
    done = _run(path, url)
    assert done.returncode == 0, f"{name}:\n{done.stdout}\n{done.stderr}\n{gateway.log()[-3000:]}"


@pytest.mark.parametrize("name", MODEL_CONTROL)
def test_model_control_example(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = _script(name)
    gateway, grpc_port = _start(tmp_path_factory, _models_counted(path))
    try:
        url = gateway.address if "_http_" in name else f"127.0.0.1:{grpc_port}"
        done = _run(path, url)
        log = gateway.log()[-3000:]
    finally:
        gateway.stop()
    assert done.returncode == 0, f"{name}:\n{done.stdout}\n{done.stderr}\n{log}"
    # It exits 0 on some failures too; this line is its verdict.
    assert "PASS: model control" in done.stdout, done.stdout


@pytest.mark.parametrize("name", SHARED_MEMORY)
def test_shared_memory_example(name: str, served: tuple[GatewayProcess, int]) -> None:
    gateway, grpc_port = served
    path = _script(name)
    extensions = httpclient.InferenceServerClient(gateway.address).get_server_metadata()
    assert "system_shared_memory" in extensions["extensions"]
    url = gateway.address if "_http_" in name else f"127.0.0.1:{grpc_port}"
    done = _run(path, url)
    assert done.returncode == 0, f"{name}:\n{done.stdout}\n{done.stderr}"
