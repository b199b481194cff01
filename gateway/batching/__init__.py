"""Per-model dynamic batching."""

from gateway.batching.batcher import Batcher, BatchPolicy

__all__ = ["BatchPolicy", "Batcher"]
