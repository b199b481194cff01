"""Per-model-version dynamic batching: everything that decides when a batch runs.

``Batcher`` owns one model version's bounded queue and the task that forms batches from it
(preferred sizes, queue delay, one input signature per batch, as many batches in flight as the
backend has instances), hands each batch to the backend's ``execute`` and each caller its own
rows of the outputs through a future (``Queued``). ``PriorityQueue`` is its queue: one FIFO per
priority level, each under its own ``QueuePolicy`` (bound, timeout, reject or delay).
``BatchPolicy`` is what it decides with, read from the model's config; ``Executed`` is what a
backend's ``execute`` gives back. Deadlines and batching are timed on an injected clock.
"""

from gateway.batching.batcher import Batcher, BatchPolicy, Executed, Queued
from gateway.batching.queue import PriorityQueue, QueuePolicy

__all__ = ["BatchPolicy", "Batcher", "Executed", "PriorityQueue", "QueuePolicy", "Queued"]
