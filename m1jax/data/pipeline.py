"""Corpora as flat token arrays, and a deterministic, checkpointable packer.

A `Corpus` is every document's token ids concatenated ([N] int32) plus document offsets ([D + 1]).
It is built through `datasets` (the embedded task corpus with `Dataset.from_generator`, or the
user's text / jsonl / parquet files or a hub dataset) and cached in the workdir as `.npz`. A
directory prepared by `experiments.prepare_data` is read in place instead, through memory maps
(`m1jax.data.prepared`): nothing is tokenized or loaded.

`Packer` fills rows of `seq_len` tokens with whole documents in a seeded per-epoch order; a
document longer than a row continues in the next row (as a new segment). Segment ids number the
documents of a row 1, 2, ...; 0 marks padding. Its position (epoch, document, offset) is a small
dict saved with every checkpoint, so a resumed run sees exactly the batches it would have seen.

With several processes each packs only its own rows: every process draws the same per-epoch
permutation and shard i of n takes its documents i, i+n, i+2n, ... (disjoint shards that together
cover the corpus every epoch). One shard (n = 1) is exactly the unsharded packer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from m1jax.data import prepared
from m1jax.data import tasks as task_lib


@dataclasses.dataclass(frozen=True)
class Corpus:
    tokens: np.ndarray  # [N] int32, documents concatenated
    offsets: np.ndarray  # [D + 1] int64, document d is tokens[offsets[d]:offsets[d + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def doc(self, d: int) -> np.ndarray:
        return self.tokens[self.offsets[d] : self.offsets[d + 1]]


def _from_lists(docs) -> Corpus:
    lengths = np.fromiter((len(d) for d in docs), np.int64, count=len(docs))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.concatenate([np.asarray(d, np.int32) for d in docs]) if len(docs) else np.zeros(0, np.int32)
    return Corpus(tokens, offsets)


def _task_rows(seed: int, split: str, num: int, tasks: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    for _, ex in zip(range(num), task_lib.examples(seed, split, tasks), strict=False):
        yield {"text": ex.text, "task": ex.task, "difficulty": ex.difficulty}


# A file extension -> the `datasets` builder that reads it.
FILE_BUILDERS = {"txt": "text", "text": "text", "jsonl": "json", "json": "json", "parquet": "parquet"}


def _raw_dataset(data, split: str, cache_dir: str):
    """The untokenised `datasets.Dataset` of one split ("train" or "eval")."""
    import datasets

    datasets.disable_progress_bars()
    if data.source == "tasks":
        num = data.num_train_docs if split == "train" else data.num_eval_docs
        kwargs = dict(seed=data.seed, split="train" if split == "train" else "test", num=num, tasks=tuple(data.tasks))
        return datasets.Dataset.from_generator(_task_rows, gen_kwargs=kwargs, cache_dir=cache_dir)
    files = [f for f in data.source.split(",") if f]
    if all(os.path.exists(f) for f in files):
        ext = os.path.splitext(files[0])[1].lstrip(".").lower()
        builder = FILE_BUILDERS.get(ext)
        if builder is None:
            raise ValueError(f"data.source {files[0]!r}: unsupported extension {ext!r} (txt, jsonl, json, parquet)")
        full = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
    else:  # a hub dataset name; needs the network
        full = datasets.load_dataset(data.source, split="train", cache_dir=cache_dir)
    if data.text_field not in full.column_names:
        raise ValueError(f"data.text_field {data.text_field!r} not in the dataset's columns {full.column_names}")
    # Held-out documents: the last `num_eval_docs` rows, never trained on.
    n_eval = min(data.num_eval_docs, max(len(full) // 10, 1))
    return full.select(range(len(full) - n_eval, len(full)) if split == "eval" else range(len(full) - n_eval))


def load_corpus(data, tokenizer, workdir: str, split: str = "train") -> Corpus:
    """Tokenise one split of `data` (an ml_collections/dataclass-like config) with `tokenizer`.

    Every document is `<bos> text <eos>`. Cached under `workdir/data/` by a hash of the data
    config and the tokenizer, so a resumed run reuses it. `data.source` a prepared directory: its
    memory-mapped `PreparedCorpus` (checked against `tokenizer`; the last documents held out).
    """
    if os.path.isdir(data.source):  # a prepared corpus (an unfinished one: its error)
        return prepared.open_prepared(data.source, tokenizer, split=split, num_eval_docs=data.num_eval_docs)
    cache_dir = os.path.join(workdir, "data")
    os.makedirs(cache_dir, exist_ok=True)
    spec = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(data).items()}
    key = json.dumps({"data": spec, "split": split, "tokenizer": repr(tokenizer)}, sort_keys=True, default=str)
    path = os.path.join(cache_dir, f"{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            return Corpus(f["tokens"], f["offsets"])
    raw = _raw_dataset(data, split, cache_dir)
    field = "text" if data.source == "tasks" else data.text_field
    docs = [tokenizer.encode(t, bos=True, eos=True) for t in raw[field] if t]
    corpus = _from_lists(docs)
    if len(corpus) == 0:
        raise ValueError(f"data.source {data.source!r} gave no documents for split {split!r}")
    tmp = path + ".tmp.npz"
    np.savez(tmp, tokens=corpus.tokens, offsets=corpus.offsets)
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache
    return corpus


class Packer:
    """Rows of `seq_len` tokens from `corpus`, `batch_size` rows per batch, deterministic in `seed`.

    `next_batch()` -> {"tokens": [B, T] int32, "segment_ids": [B, T] int32}. `state` / `restore`
    give and set the position (a JSON-able dict). `shuffle=False` keeps corpus order (eval).
    `shard` / `num_shards`: pack only documents shard, shard + num_shards, ... of each epoch's order
    (one process's share of the global batch; `batch_size` is then the rows of this shard).
    """

    def __init__(
        self,
        corpus: Corpus,
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        shard: int = 0,
        num_shards: int = 1,
    ):
        if len(corpus) == 0:
            raise ValueError("cannot pack an empty corpus")
        _check_shard(shard, num_shards, len(corpus))
        self.corpus, self.seq_len, self.batch_size = corpus, seq_len, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.shard, self.num_shards = shard, num_shards
        self.epoch, self.index, self.offset = 0, 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """This shard's documents of `epoch`, in packing order ([ceil or floor of D / num_shards])."""
        n = len(self.corpus)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        # The permutation depends only on (seed, epoch), so every process slices the same one.
        return order[self.shard :: self.num_shards]

    @property
    def state(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "offset": self.offset,
            "seed": self.seed,
            "shard": self.shard,
            "num_shards": self.num_shards,
        }

    def restore(self, state: dict) -> None:
        """Set the position from `state`: this packer's own `state`, a {"shards": [state of shard 0,
        1, ...]} dict of every process (entry `shard` is used), or a state saved before sharding
        existed (no shard fields: shard 0 of 1). Raises ValueError when it belongs to another
        shard layout (process count) or seed."""
        if "shards" in state:
            shards = state["shards"]
            if len(shards) != self.num_shards:
                raise ValueError(
                    f"data state was saved by {len(shards)} process(es), this run has {self.num_shards}: "
                    "each process's data position cannot be split differently; resume with the same process count"
                )
            state = shards[self.shard]
        saved = (int(state.get("shard", 0)), int(state.get("num_shards", 1)))
        if saved != (self.shard, self.num_shards):
            raise ValueError(
                f"data state belongs to shard {saved[0]} of {saved[1]} (process count {saved[1]}), this packer "
                f"is shard {self.shard} of {self.num_shards}; resume with the same process count"
            )
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, the config has seed {self.seed}")
        self.epoch, self.index, self.offset = int(state["epoch"]), int(state["index"]), int(state["offset"])
        self._order = self._epoch_order(self.epoch)

    def _row(self) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.zeros(self.seq_len, np.int32)
        segs = np.zeros(self.seq_len, np.int32)
        filled, seg = 0, 0
        while filled < self.seq_len:
            doc = self.corpus.doc(int(self._order[self.index]))
            rest = len(doc) - self.offset
            space = self.seq_len - filled
            if rest > space and filled > 0 and len(doc) <= self.seq_len:
                break  # a document that fits a row is never split: it starts the next row
            take = min(rest, space)
            seg += 1
            tokens[filled : filled + take] = doc[self.offset : self.offset + take]
            segs[filled : filled + take] = seg
            filled += take
            self.offset += take
            if self.offset == len(doc):
                self.offset = 0
                self.index += 1
                if self.index == len(self._order):  # this shard's share of the epoch is done
                    self.epoch, self.index = self.epoch + 1, 0
                    self._order = self._epoch_order(self.epoch)
        return tokens, segs

    def next_batch(self) -> dict[str, np.ndarray]:
        rows = [self._row() for _ in range(self.batch_size)]
        return {"tokens": np.stack([r[0] for r in rows]), "segment_ids": np.stack([r[1] for r in rows])}


def _check_shard(shard: int, num_shards: int, num_docs: int) -> None:
    """ValueError unless 0 <= shard < num_shards <= num_docs (every shard gets documents)."""
    if not (isinstance(shard, int | np.integer) and isinstance(num_shards, int | np.integer)):
        raise ValueError(f"shard={shard!r} and num_shards={num_shards!r} must be integers")
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard={shard} must lie in [0, num_shards={num_shards}) with num_shards >= 1")
    if num_shards > num_docs:
        raise ValueError(
            f"num_shards={num_shards} exceeds the corpus's {num_docs} documents: some shards would be empty"
        )


def loss_mask(segment_ids):
    """[B, T] -> [B, T-1] bool: token t+1 is a target for position t (same document, not padding).
    Works on numpy and jax arrays; the training loss uses it too."""
    return (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] != 0)
