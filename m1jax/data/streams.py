"""Document streams: the order in which a `Packer` takes documents, as a small checkpointable position.

A stream shows one document at a time: `peek()` is the current document ([n] int32), `advance()`
moves past it, `source` is the index of the corpus it came from. Its `position()` is a short list of
ints (it fits the checkpoint's JSON and a cross-process gather) and `seek(position)` restores it.

- `ShuffledDocs`: one corpus, a seeded permutation per epoch; shard i of n takes documents
  i, i + n, ... of every epoch's permutation (every process draws the same permutation).
- `MixedDocs`: several `ShuffledDocs` with weights. Document k of the stream comes from the
  source drawn for k: draws come in seeded blocks, so the choice sequence depends only on the seed
  (deterministic, and O(1) to resume). Each source keeps its own epochs: a small source with a large
  weight repeats while a large one is still in its first epoch.
"""

from __future__ import annotations

import numpy as np

_BLOCK = 4096  # source draws per seeded block
_CHUNK = 1024  # documents whose ids and spans are computed, and tokens read, together
_CHUNK_TOKENS = 1 << 20  # at most this many tokens read ahead (unless one document is longer)
_MIX_STREAM = 0x6D6978  # keeps the mixture's draws apart from the permutations' seeds
_ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's multipliers

# Document orders: "feistel" (default) computes any position of an epoch's permutation on demand,
# with no per-document memory; "numpy" (np.random.Generator.permutation, held whole) is the order
# of checkpoints saved before "order" was recorded, kept so that they resume exactly.
ORDERS = ("feistel", "numpy")


def feistel_keys(seed: int, epoch: int, key: tuple = ()) -> np.ndarray:
    """[_ROUNDS] uint64 round keys of one epoch's permutation."""
    return np.random.default_rng([seed, epoch, *key]).integers(0, 2**63, size=_ROUNDS, dtype=np.uint64)


def permute(positions: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """A seeded bijection of [0, n) evaluated at `positions` ([k] ints in [0, n)) -> [k] int64.

    A balanced Feistel network on 2h bits (2^(2h) >= n) permutes [0, 2^(2h)); a value that lands at
    n or above is permuted again until it falls inside (cycle walking), which keeps it a bijection of
    [0, n). Vectorised: a chunk of positions costs a few dozen array operations. (Grain's
    `index_shuffle` is the same idea, one Python call per index: ~4 us, more than packing a short
    document.)"""
    h = max(1, ((n - 1).bit_length() + 1) // 2)
    shift, mask = np.uint64(h), np.uint64((1 << h) - 1)
    out = np.asarray(positions, np.uint64).copy()
    todo = np.arange(len(out))
    while len(todo):
        left, right = out[todo] >> shift, out[todo] & mask
        for k in keys:
            z = (right ^ k) * _M1
            z = (z ^ (z >> np.uint64(31))) * _M2
            left, right = right, left ^ ((z ^ (z >> np.uint64(29))) & mask)
        out[todo] = (left << shift) | right
        todo = todo[out[todo] >= n]
    return out.astype(np.int64)


class ShuffledDocs:
    """Documents of `corpus` (len, doc(d)) in a per-epoch order; position [epoch, index]. `key`
    (ints) tells apart the permutations of corpora that share a seed (a mixture's sources).
    `order`: one of ORDERS."""

    source = 0

    def __init__(
        self,
        corpus,
        *,
        seed: int = 0,
        key: tuple = (),
        shuffle: bool = True,
        shard: int = 0,
        num_shards: int = 1,
        order: str = "feistel",
    ):
        if len(corpus) == 0:
            raise ValueError("cannot take documents from an empty corpus")
        if order not in ORDERS:
            raise ValueError(f"document order {order!r} is not one of {ORDERS}")
        self.corpus, self.seed, self.key, self.shuffle = corpus, seed, tuple(key), shuffle
        self.shard, self.num_shards, self.order = shard, num_shards, order
        self._len = len(range(shard, len(corpus), num_shards))
        self._spans = hasattr(corpus, "spans") and hasattr(
            corpus, "read_many"
        )  # batched lookups; else any object with len and doc(d) will do
        self.seek([0, 0])

    def ids(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Documents start..stop-1 of this shard's share of `epoch`: positions shard, shard +
        num_shards, ... of the epoch's permutation of the corpus. The permutation depends only on
        (seed, epoch, key), so every process takes its positions of the same one."""
        positions = self.shard + self.num_shards * np.arange(start, stop, dtype=np.int64)
        if not self.shuffle:
            return positions
        if self.order == "numpy":
            if self._numpy_epoch != epoch:  # [D] ids: held for the epoch
                self._numpy_perm = np.random.default_rng([self.seed, epoch, *self.key]).permutation(len(self.corpus))
                self._numpy_epoch = epoch
            return self._numpy_perm[positions]
        return permute(positions, len(self.corpus), feistel_keys(self.seed, epoch, self.key))

    def __len__(self) -> int:
        """Documents in one of this shard's epochs."""
        return self._len

    def peek(self) -> np.ndarray:
        i = self.index - self._chunk_start
        if i >= len(self._docs):
            self._read_chunk()
            i = 0
        return self._docs[i]

    def _read_chunk(self) -> None:
        """The next documents (up to _CHUNK of them and _CHUNK_TOKENS tokens, at least one), read at
        once: the per-document work then runs in one tight loop."""
        ids = self.ids(self.epoch, self.index, min(self.index + _CHUNK, self._len))
        self._chunk_start = self.index
        if not self._spans:
            self._docs = [self.corpus.doc(d) for d in ids[:64].tolist()]
            return
        part, lo, hi = self.corpus.spans(ids)
        keep = max(1, int(np.searchsorted(np.cumsum(hi - lo), _CHUNK_TOKENS, side="right")))
        self._docs = self.corpus.read_many(part[:keep].tolist(), lo[:keep].tolist(), hi[:keep].tolist())

    def advance(self) -> None:
        self.index += 1
        if self.index == self._len:  # this shard's share of the epoch is done
            self.epoch, self.index = self.epoch + 1, 0
            self._chunk_start, self._docs = 0, []

    def position(self) -> list[int]:
        return [self.epoch, self.index]

    def seek(self, position) -> None:
        epoch, index = (int(p) for p in position)
        if not 0 <= index < self._len:
            raise ValueError(f"data position: document {index} of an epoch of {self._len} documents")
        self.epoch, self.index = epoch, index
        self._chunk_start, self._docs = index, []  # documents _chunk_start.. of this epoch, read ahead
        self._numpy_epoch = None

    def epochs(self) -> float:
        """Epochs of this shard's documents taken so far (fractional)."""
        return self.epoch + self.index / self._len


class MixedDocs:
    """Documents drawn from `streams` with probabilities `weights` (summing to 1); position
    [k, epoch_0, index_0, epoch_1, index_1, ...] where k counts the documents taken."""

    def __init__(self, streams, weights, *, seed: int = 0):
        if len(streams) != len(weights) or not streams:
            raise ValueError(f"{len(streams)} source(s) and {len(weights)} weight(s): one weight per source")
        w = np.asarray(weights, np.float64)
        if not np.all(w > 0) or not np.all(np.isfinite(w)):
            raise ValueError(f"mixture weights must be positive and finite, got {list(weights)}")
        self.streams, self.weights, self.seed = list(streams), w / w.sum(), seed
        self.k, self._block, self._draws = 0, -1, None

    def _choice(self, k: int) -> int:
        block = k // _BLOCK
        if block != self._block:
            rng = np.random.default_rng([self.seed, _MIX_STREAM, block])
            self._draws = rng.choice(len(self.streams), size=_BLOCK, p=self.weights)
            self._block = block
        return int(self._draws[k % _BLOCK])

    @property
    def source(self) -> int:
        return self._choice(self.k)

    def peek(self) -> np.ndarray:
        return self.streams[self.source].peek()

    def advance(self) -> None:
        self.streams[self.source].advance()
        self.k += 1

    def position(self) -> list[int]:
        return [self.k] + [p for s in self.streams for p in s.position()]

    def seek(self, position) -> None:
        position = [int(p) for p in position]
        if len(position) != 1 + 2 * len(self.streams):
            raise ValueError(
                f"data position {position} does not match a mixture of {len(self.streams)} source(s): "
                "resume with the same data.mixture"
            )
        for i, s in enumerate(self.streams):
            s.seek(position[1 + 2 * i : 3 + 2 * i])
        self.k = position[0]

    def epochs(self) -> list[float]:
        return [s.epochs() for s in self.streams]
