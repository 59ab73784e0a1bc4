"""Corpora as flat token arrays, and a deterministic, checkpointable packer.

A `Corpus` is every document's token ids concatenated ([N] int32) plus document offsets ([D + 1]).
It is built through `datasets` (the embedded task corpus with `Dataset.from_generator`, or the
user's text / jsonl / parquet files or a hub dataset) and cached in the workdir as `.npz`. A
directory prepared by `experiments.prepare_data` is read in place instead, through memory maps
(`m1jax.data.prepared`): nothing is tokenized or loaded.

`Packer` fills rows of `seq_len` tokens with whole documents in a seeded per-epoch order (a
`streams.ShuffledDocs`, or a weighted `streams.MixedDocs` of several corpora: `data.mixture`); a
document longer than a row continues in the next row (as a new segment). Segment ids number the
documents of a row 1, 2, ...; 0 marks padding. Its position (epoch, document, offset) is a small
dict saved with every checkpoint, so a resumed run sees exactly the batches it would have seen.

With several processes each packs only its own rows: every process computes the same per-epoch
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

from m1jax.data import prepared, streams
from m1jax.data import tasks as task_lib


@dataclasses.dataclass(frozen=True)
class Corpus:
    tokens: np.ndarray  # [N] int32, documents concatenated
    offsets: np.ndarray  # [D + 1] int64, document d is tokens[offsets[d]:offsets[d + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def doc(self, d: int) -> np.ndarray:
        return self.tokens[self.offsets[d] : self.offsets[d + 1]]

    def spans(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where documents `ids` [k] lie, for `read`: (part [k] (all 0), start [k], stop [k])."""
        return np.zeros(len(ids), np.int64), self.offsets[ids], self.offsets[ids + 1]

    def read(self, part: int, lo: int, hi: int) -> np.ndarray:
        return self.tokens[lo:hi]

    def read_many(self, parts: list[int], los: list[int], his: list[int]) -> list[np.ndarray]:
        tokens = self.tokens
        return [tokens[lo:hi] for lo, hi in zip(los, his, strict=True)]


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


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """ "dirA:0.7,dirB:0.3" -> [(dirA, 0.7), (dirB, 0.3)]: prepared directories with positive weights
    (normalised when used). ValueError naming `data.mixture` and the entry otherwise."""
    out = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        path, sep, weight = entry.rpartition(":")
        try:
            w = float(weight)
        except ValueError:
            w = float("nan")
        if not sep or not path or not (w > 0 and np.isfinite(w)):
            raise ValueError(f"data.mixture entry {entry!r}: expected DIR:WEIGHT with a positive weight")
        if not os.path.isdir(path):
            raise ValueError(f"data.mixture entry {entry!r}: {path!r} is not a directory (a prepared corpus)")
        out.append((path, w))
    if len(out) < 1:
        raise ValueError(f"data.mixture={spec!r} names no source")
    if len({os.path.realpath(p) for p, _ in out}) != len(out):
        raise ValueError(f"data.mixture={spec!r} names a directory twice")
    return out


def source_names(data) -> list[str]:
    """A short name per source of `data` (the mixture's directory names, else one "train")."""
    if not data.get("mixture"):
        return ["train"]
    paths = [os.path.normpath(p) for p, _ in parse_mixture(data.mixture)]
    names = [os.path.basename(p) for p in paths]
    return names if len(set(names)) == len(names) else paths


def load_sources(data, tokenizer, workdir: str, split: str = "train") -> list:
    """The corpora of `split`: one per `data.mixture` source (each a prepared directory with its own
    held-out documents), else `[load_corpus(data, ...)]`."""
    if not data.get("mixture"):
        return [load_corpus(data, tokenizer, workdir, split)]
    if data.source != "tasks":
        raise ValueError(f"set data.source ({data.source!r}) or data.mixture ({data.mixture!r}), not both")
    return [
        prepared.open_prepared(path, tokenizer, split=split, num_eval_docs=data.num_eval_docs)
        for path, _ in parse_mixture(data.mixture)
    ]


def mixed_packer(
    sources, weights, seq_len: int, batch_size: int, *, seed: int = 0, shard: int = 0, num_shards: int = 1
):
    """A `Packer` over `sources` (corpora) drawn with `weights`; each source has its own seeded
    permutations (keyed by its index), this shard's share of each."""
    for s in sources:
        _check_shard(shard, num_shards, len(s))
    docs = [
        streams.ShuffledDocs(s, seed=seed, key=(1, i), shard=shard, num_shards=num_shards)
        for i, s in enumerate(sources)
    ]
    return Packer(streams.MixedDocs(docs, weights, seed=seed), seq_len, batch_size, seed=seed, shard=shard,
                  num_shards=num_shards)  # fmt: skip


class Packer:
    """Rows of `seq_len` tokens from `corpus`, `batch_size` rows per batch, deterministic in `seed`.

    `next_batch()` -> {"tokens": [B, T] int32, "segment_ids": [B, T] int32}. `state` / `restore`
    give and set the position (a JSON-able dict). `shuffle=False` keeps corpus order (eval).
    `shard` / `num_shards`: pack only documents shard, shard + num_shards, ... of each epoch's order
    (one process's share of the global batch; `batch_size` is then the rows of this shard).
    `corpus` may instead be a `streams.MixedDocs` over this shard's sources (a mixture);
    `source_tokens` counts the tokens each source put in the last batch. `order`: the permutation
    (`streams.ORDERS`; a state saved before orders were recorded restores "numpy").
    """

    def __init__(
        self,
        corpus,
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        shard: int = 0,
        num_shards: int = 1,
        order: str = "feistel",
    ):
        if isinstance(corpus, streams.MixedDocs):
            self.stream, self.num_sources = corpus, len(corpus.streams)
            for s in corpus.streams:
                _check_shard(shard, num_shards, len(s.corpus))
        else:
            if len(corpus) == 0:
                raise ValueError("cannot pack an empty corpus")
            _check_shard(shard, num_shards, len(corpus))
            self.stream = streams.ShuffledDocs(
                corpus, seed=seed, shuffle=shuffle, shard=shard, num_shards=num_shards, order=order
            )
            self.num_sources = 1
        self.corpus, self.seq_len, self.batch_size = corpus, seq_len, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.shard, self.num_shards = shard, num_shards
        self.offset = 0
        self.source_tokens = np.zeros(self.num_sources, np.int64)
        self._counts = [0] * self.num_sources

    @property
    def mixed(self) -> bool:
        return isinstance(self.stream, streams.MixedDocs)

    @property
    def _docs(self) -> list[streams.ShuffledDocs]:
        return self.stream.streams if self.mixed else [self.stream]

    def position(self) -> list[int]:
        """[offset, *stream position]: every int of the state that moves (a fixed length per layout)."""
        return [self.offset, *self.stream.position()]

    def state_at(self, position, shard: int | None = None) -> dict:
        """The `state` dict of `position` (this packer's, or shard `shard`'s gathered one)."""
        offset, *pos = (int(p) for p in position)
        state = {"offset": offset, "seed": self.seed, "shard": self.shard if shard is None else shard}
        state["num_shards"], state["order"] = self.num_shards, self._docs[0].order
        state["docs"] = [len(d.corpus) for d in self._docs]  # checked on restore: the same data
        if self.mixed:
            state["mixture"], state["weights"] = pos, self.stream.weights.tolist()
        else:
            state["epoch"], state["index"] = pos
        return state

    @property
    def state(self) -> dict[str, int]:
        return self.state_at(self.position())

    def restore(self, state: dict) -> None:
        """Set the position from `state`: this packer's own `state`, a {"shards": [state of shard 0,
        1, ...]} dict of every process (entry `shard` is used), or a state saved before sharding
        existed (no shard fields: shard 0 of 1). Raises ValueError when it belongs to another
        shard layout (process count), seed or data source layout (a mixture or not)."""
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
        if ("mixture" in state) != self.mixed:
            kind = "a mixture (data.mixture)" if "mixture" in state else "one source (data.source)"
            raise ValueError(f"data state was saved reading {kind}; this run's data config differs")
        order = state.get("order", "numpy")  # a state without it was saved under numpy's order
        if order not in streams.ORDERS:
            raise ValueError(f"data state has document order {order!r}, this m1jax knows {streams.ORDERS}")
        docs = [len(d.corpus) for d in self._docs]
        if "docs" in state and list(state["docs"]) != docs:
            raise ValueError(
                f"data state was saved reading sources of {state['docs']} documents, this run's have {docs}: "
                "the data changed (data.source / data.mixture); resume with the same data or start a new workdir"
            )
        if self.mixed and "weights" in state and not np.allclose(state["weights"], self.stream.weights):
            raise ValueError(f"data state was saved with mixture weights {state['weights']}, data.mixture now gives "
                             f"{self.stream.weights.tolist()}")  # fmt: skip
        before = [d.order for d in self._docs]
        try:
            for d in self._docs:
                d.order = order
            self.stream.seek(state["mixture"] if self.mixed else (state["epoch"], state["index"]))
        except ValueError:
            for d, o in zip(self._docs, before, strict=True):
                d.order = o
            raise
        self.offset = int(state["offset"])

    def epochs_at(self, state: dict) -> list[float]:
        """Epochs of each source's documents (this shard's share) taken at `state` (fractional)."""
        docs = self._docs
        pos = state["mixture"][1:] if self.mixed else [state["epoch"], state["index"]]
        return [pos[2 * i] + pos[2 * i + 1] / len(d) for i, d in enumerate(docs)]

    def _row(self) -> tuple[np.ndarray, np.ndarray]:
        # Slices are collected and written once per row: per-document numpy writes would cost
        # more than the documents' copies themselves when documents are short.
        pieces, takes, counts = [], [], self._counts
        filled, seq_len, stream = 0, self.seq_len, self.stream
        while filled < seq_len:
            doc = stream.peek()
            n, offset = len(doc), self.offset
            rest, space = n - offset, seq_len - filled
            if rest > space and filled > 0 and n <= seq_len:
                break  # a document that fits a row is never split: it starts the next row
            take = rest if rest < space else space
            pieces.append(doc[offset : offset + take] if take < n else doc)
            takes.append(take)
            counts[stream.source] += take
            filled += take
            if offset + take == n:
                self.offset = 0
                stream.advance()
            else:
                self.offset = offset + take
        tokens = np.zeros(seq_len, np.int32)
        segs = np.zeros(seq_len, np.int32)
        tokens[:filled] = np.concatenate(pieces)
        segs[:filled] = np.repeat(np.arange(1, len(takes) + 1, dtype=np.int32), takes)
        return tokens, segs

    def next_batch(self) -> dict[str, np.ndarray]:
        self._counts = [0] * self.num_sources
        rows = [self._row() for _ in range(self.batch_size)]
        self.source_tokens = np.asarray(self._counts, np.int64)
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
