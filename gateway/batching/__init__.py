"""Per-model dynamic batching."""

from gateway.batching.batcher import Batcher, BatchPolicy, Queued

__all__ = ["BatchPolicy", "Batcher", "Queued"]
