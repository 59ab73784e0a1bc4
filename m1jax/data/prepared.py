"""Prepared corpora: token shards on disk, read through memory maps (`experiments.prepare_data` writes them).

On-disk format (`FORMAT`), one directory:

    manifest.json                  written last: a directory without it is not (yet) prepared
    shard-00000.tokens.npy         int32 [N_i]: the shard's documents' token ids, concatenated
    shard-00000.offsets.npy        int64 [D_i + 1]: document j is tokens[offsets[j]:offsets[j + 1]]
    shard-00000.json               the shard's record (written after its two arrays: resume marker)
    ...

Every document is `<bos> text <eos>` (as `pipeline.load_corpus` builds it); empty texts are left out.
The manifest holds the format, the tokenizer's identity (`tokenizer_identity`: kind, special ids,
vocabulary size, and the tokenizer file's SHA-256), the inputs and text field, the input rows per
shard, and per shard its document and token counts, largest token id, file sizes and SHA-256s.

`open_prepared` checks all of it before a step runs (missing or truncated shard files, checksums,
the tokenizer against the config's, token ids outside the vocabulary) and returns a
`PreparedCorpus`: the `Corpus` interface (`len`, `doc`) over memory-mapped shards, so a process
reads only the pages of the documents it packs and resident memory does not grow with the corpus.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

import numpy as np

FORMAT = "m1jax-tokens/1"
MANIFEST = "manifest.json"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """What must match between a prepared corpus and the run that reads it (not the file's path)."""
    path = getattr(tokenizer, "path", None)
    return {
        "kind": type(tokenizer).__name__,
        "vocab_size": int(tokenizer.vocab_size),
        "bos_id": int(tokenizer.bos_id),
        "eos_id": int(tokenizer.eos_id),
        "pad_id": int(tokenizer.pad_id),
        "sha256": file_sha256(path) if path else None,
    }


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"{directory}: no {MANIFEST}, not a prepared corpus (run python -m experiments.prepare_data)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, this m1jax reads {FORMAT!r}")
    return manifest


def check_shard_files(directory: str, record: dict, *, checksums: bool = True) -> None:
    """ValueError naming the file when a shard's array is missing, truncated or altered."""
    for part in ("tokens", "offsets"):
        path = os.path.join(directory, f"{record['name']}.{part}.npy")
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing shard file (listed in {MANIFEST})")
        size, want = os.path.getsize(path), record["bytes"][part]
        if size != want:
            raise ValueError(f"{path}: truncated or altered shard file: {size} bytes, the manifest says {want}")
        if checksums and file_sha256(path) != record["sha256"][part]:
            raise ValueError(f"{path}: checksum mismatch (SHA-256 differs from the manifest's)")


class PreparedCorpus:
    """Documents [start, stop) of a prepared directory's shards, memory-mapped: `len`, `doc(d)`."""

    def __init__(self, directory: str, manifest: dict, start: int = 0, stop: int | None = None):
        self.directory, self.manifest = directory, manifest
        self._tokens, self._offsets = [], []
        for record in manifest["shards"]:
            base = os.path.join(directory, record["name"])
            self._tokens.append(np.load(f"{base}.tokens.npy", mmap_mode="r"))
            self._offsets.append(np.load(f"{base}.offsets.npy"))  # [D_i + 1] int64: small next to the tokens
        counts = np.asarray([len(o) - 1 for o in self._offsets], np.int64)
        self._first = np.concatenate([[0], np.cumsum(counts)])  # global index of each shard's first document
        total = int(self._first[-1])
        self.start, self.stop = start, total if stop is None else stop
        if not 0 <= self.start <= self.stop <= total:
            raise ValueError(f"{directory}: document range [{start}, {stop}) outside [0, {total}]")

    def __len__(self) -> int:
        return self.stop - self.start

    def doc(self, d: int) -> np.ndarray:
        g = self.start + d
        if not 0 <= d < len(self):
            raise IndexError(f"document {d} of a corpus of {len(self)}")
        s = int(np.searchsorted(self._first, g, side="right")) - 1
        j = g - int(self._first[s])
        lo, hi = self._offsets[s][j], self._offsets[s][j + 1]
        return np.asarray(self._tokens[s][lo:hi])


@functools.lru_cache(maxsize=16)
def _verify_once(directory: str, manifest_text: str) -> None:
    """Every shard's SHA-256, once per process and manifest (the train and eval splits share it):
    reading the corpus costs about a second per GB."""
    for record in json.loads(manifest_text)["shards"]:
        check_shard_files(directory, record)


def open_prepared(directory: str, tokenizer=None, *, split: str = "train", num_eval_docs: int = 0, checksums=True):
    """The `split` of a prepared directory as a `PreparedCorpus`, after checking every shard (see the
    module docstring; the SHA-256s once per process) and, given `tokenizer`, that it is the one the
    corpus was prepared with. The held-out split is the last min(num_eval_docs, docs // 10)
    documents (at least one); "train" is the rest. (Files given directly to `pipeline.load_corpus`
    split their input rows instead, empty ones included: with empty texts the two can differ.)"""
    manifest = read_manifest(directory)
    if tokenizer is not None:
        want, have = manifest["tokenizer"], tokenizer_identity(tokenizer)
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            detail = ", ".join(f"{k}: prepared {want.get(k)!r}, config {have.get(k)!r}" for k in diff)
            raise ValueError(f"{os.path.join(directory, MANIFEST)}: prepared with another tokenizer ({detail})")
    vocab = manifest["tokenizer"]["vocab_size"]
    for i, record in enumerate(manifest["shards"]):
        if record.get("name") != shard_name(i):
            raise ValueError(f"{os.path.join(directory, MANIFEST)}: shard {i} is named {record.get('name')!r}")
    if checksums:
        _verify_once(directory, json.dumps(manifest, sort_keys=True))
    for record in manifest["shards"]:
        check_shard_files(directory, record, checksums=False)
        if record["max_id"] >= vocab:
            name = os.path.join(directory, record["name"] + ".tokens.npy")
            raise ValueError(f"{name}: token id {record['max_id']} outside the tokenizer's vocabulary of {vocab}")
    total = int(manifest["docs"])
    if total == 0:
        raise ValueError(f"{directory}: the prepared corpus has no documents")
    n_eval = min(num_eval_docs, max(total // 10, 1)) if num_eval_docs > 0 else 0
    if split == "eval":
        if n_eval == 0:
            raise ValueError(f"{directory}: no held-out documents (data.num_eval_docs={num_eval_docs})")
        return PreparedCorpus(directory, manifest, total - n_eval, total)
    if total - n_eval == 0:
        raise ValueError(f"{directory}: every one of its {total} document(s) is held out; nothing to train on")
    return PreparedCorpus(directory, manifest, 0, total - n_eval)
