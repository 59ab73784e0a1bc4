"""The pretraining loader: a Grain `IterDataset` of packed batches, prefetched in a thread.

Grain serves here as the iterator protocol (`get_state` / `set_state`, which the orbax checkpoint
stores as JSON beside the train state) and as the prefetcher: a background thread packs the next
batches while the device runs the step, and the state it reports is that of the batches consumed,
not of those packed ahead. The document order and the packing are `streams` / `pipeline.Packer`
(vectorised numpy over memory-mapped shards): Grain's per-record MapDataset chain costs
microseconds per document, too slow for short documents (see experiments/benchmarks/loader.py).

Each element is `(batch, source_tokens)`: batch {"tokens", "segment_ids"} [B, T] int32, and
source_tokens [S] int64, the tokens each source of a mixture put in it.
"""

from __future__ import annotations

import grain
import numpy as np
from jax.experimental import multihost_utils

from m1jax.data.pipeline import Packer


class _PackerIterator(grain.DatasetIterator):
    def __init__(self, packer: Packer):
        super().__init__()
        self.packer = packer

    def __next__(self):
        batch = self.packer.next_batch()
        return batch, self.packer.source_tokens.copy()

    def get_state(self) -> dict:
        return self.packer.state

    def set_state(self, state: dict) -> None:
        self.packer.restore(state)


class PackedBatches(grain.IterDataset):
    """An endless Grain dataset of `packer`'s batches (every `iter` restarts from its position)."""

    def __init__(self, packer: Packer):
        super().__init__()
        self.packer = packer

    def __iter__(self) -> grain.DatasetIterator:
        return _PackerIterator(self.packer)

    def __str__(self) -> str:
        return f"PackedBatches(seq_len={self.packer.seq_len}, batch_size={self.packer.batch_size})"


def make_iterator(packer: Packer, prefetch: int = 2) -> grain.DatasetIterator:
    """A checkpointable iterator of `packer`'s batches; `prefetch` > 0 packs that many ahead in a thread."""
    ds = PackedBatches(packer)
    if prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return iter(ds)


def gather_state(packer: Packer, state: dict) -> dict:
    """{"shards": [state of process 0, 1, ...]} from this process's iterator `state`, the same on
    every process: only the primary process writes the checkpoint's JSON, so it must hold every
    process's position. A collective: every process calls it at the same step (as it does
    `Checkpointer.save`)."""
    moving = state["mixture"] if packer.mixed else [state["epoch"], state["index"]]
    position = [state["offset"], *moving]
    # As two int32 halves: the gather goes through JAX, where int64 needs x64 mode, and a mixture's
    # document count can pass 2^31.
    pos = np.asarray(position, np.int64)
    halves = np.stack([pos >> 31, pos & (2**31 - 1)]).astype(np.int32)
    every = np.asarray(multihost_utils.process_allgather(halves)).reshape(packer.num_shards, 2, len(position))
    every = (every[:, 0].astype(np.int64) << 31) | every[:, 1]
    return {"shards": [packer.state_at(row, shard=i) for i, row in enumerate(every.tolist())]}
