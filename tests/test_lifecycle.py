"""``gateway.lifecycle.ModelLifecycle`` on its own, with no data plane: what is loaded, its
loads and unloads, and the repository index, over a real repository and ONNX Runtime."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.backends.onnxruntime import OnnxRuntimeFactory
from gateway.errors import ModelLoadError, ModelNotFound, ModelNotReady, Unavailable
from gateway.lifecycle import READY, ModelLifecycle
from gateway.repository.local import LocalRepository
from gateway.settings import Settings
from tests import models


def lifecycle_of(repo: Path) -> ModelLifecycle:
    settings = Settings(warmup=False)
    factory = OnnxRuntimeFactory(settings)
    return ModelLifecycle(settings, LocalRepository(repo), factory, time.monotonic)


async def test_load_resolve_unload_and_index_without_a_data_plane(tmp_path: Path) -> None:
    both = models.SIMPLE_CONFIG + "version_policy: { all: {} }\n"
    models.add_sub(tmp_path, "simple", config=both)
    models.add_sub(tmp_path, "simple", version=2, config=both, offset=1)
    lifecycle = lifecycle_of(tmp_path)
    await lifecycle.load("simple")
    try:
        assert lifecycle.models["simple"].state == READY and lifecycle.in_use("simple")
        assert lifecycle.resolve("simple").version == 2  # the newest when none is named
        assert lifecycle.resolve("simple", "1").version == 1
        with pytest.raises(ModelNotFound):
            lifecycle.resolve("simple", "3")
        index = lifecycle.repository_index()
        assert [(e["version"], e["state"]) for e in index] == [("1", READY), ("2", READY)]

        await lifecycle.unload("simple")
        assert not lifecycle.in_use("simple")
        with pytest.raises(ModelNotReady):
            lifecycle.resolve("simple")
        assert lifecycle.repository_index() == [
            {"name": "simple", "state": "UNAVAILABLE", "reason": "unloaded"}
        ]
    finally:
        await lifecycle.stop()
    with pytest.raises(Unavailable):  # drained: nothing is served any more
        lifecycle.resolve("simple")


async def test_a_failed_load_of_an_unknown_name_leaves_no_entry(tmp_path: Path) -> None:
    lifecycle = lifecycle_of(tmp_path)
    with pytest.raises((ModelNotFound, ModelLoadError)):
        await lifecycle.load("ghost")
    assert "ghost" not in lifecycle.models and lifecycle.repository_index() == []
    with pytest.raises(ModelNotFound):
        lifecycle.check_known("ghost")
