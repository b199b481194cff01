"""Fixtures that start the real gateway (uvicorn, subprocess) on free loopback ports.

Fixtures only: the helpers they use (and test modules share) are in ``tests/helpers.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import models
from tests.helpers import GatewayProcess, start_gateway, stop_leftovers


@pytest.fixture(scope="session", autouse=True)
def _no_gateway_left_behind() -> Iterator[None]:
    """Tests stop what they start; one that failed half-way is stopped here, by PID."""
    yield
    stop_leftovers()


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of tiny models, built once per test session."""
    root = tmp_path_factory.mktemp("repo")
    models.add_sub(root, "simple")
    models.dense(
        root,
        "dense",
        config=(
            'name: "dense"\nmax_batch_size: 32\n'
            "dynamic_batching { max_queue_delay_microseconds: 100000 "
            "preferred_batch_size: [ 32 ] }"
        ),
    )
    models.fixed_double(root)
    models.strings(root)
    bad = root / "broken"
    (bad / "1").mkdir(parents=True)
    (bad / "1" / "model.onnx").write_bytes(b"not an onnx file")
    return root


@pytest.fixture(scope="session")
def gateway(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = start_gateway(repo, tmp_path_factory.mktemp("logs"))
    try:
        yield gw
    finally:
        gw.stop()
