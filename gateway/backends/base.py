"""The seam between the data plane and whatever executes a model.

A backend executes one *model version*. The data plane hands it whole batches (already merged by
the batcher) and never cares whether they run in-process, on a Triton host or on another gateway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from gateway.repository.config import ModelConfig
from gateway.repository.local import ModelSource

Tensors = dict[str, np.ndarray[Any, Any]]


class Backend(Protocol):
    """One loaded model version, able to run ``instance_count`` batches at once."""

    @property
    def config(self) -> ModelConfig:
        """The model's config, auto-completed and checked against the real model."""

    @property
    def instance_count(self) -> int:
        """How many executions may be in flight at once."""

    async def execute(self, inputs: Tensors, outputs: Sequence[str]) -> Tensors:
        """Run one batch and return the named outputs."""

    async def close(self) -> None:
        """Release sessions, threads and remote state. Called once, after draining."""

    def describe(self) -> dict[str, Any]:
        """Facts about where and how it runs, for metadata and the repository index."""


class BackendFactory(Protocol):
    """Loads model versions into a kind of backend."""

    async def load(self, source: ModelSource, version: int) -> Backend:
        """Load one version; raises ``ModelLoadError`` with a reason the user can act on."""
