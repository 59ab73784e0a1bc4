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
`PreparedCorpus`: the `Corpus` interface (`len`, `doc`) over the shard files, read in place a
document at a time, so a process reads only the documents it packs and resident memory does not
grow with the corpus.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import weakref
from typing import Any

import numpy as np

FORMAT = "m1jax-tokens/1"
MANIFEST = "manifest.json"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
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
    """Documents [start, stop) of a prepared directory's shards: `len`, `doc(d)`, and for many
    documents at once `spans(ids)` + `read(shard, lo, hi)`.

    Tokens are read with `os.pread`, a document's bytes at a time. (Not memory-mapped: pages of a
    mapped file stay in the process's resident set once touched, on this kernel whole large folios,
    ~100 KB a document, so a mapped corpus would grow a run's RSS with every document it reads.)
    The one thing held per document is its offset within its shard, as uint32 (4 bytes a document,
    the shards in range only): a second read per document would halve the loader's speed on short
    documents.
    """

    MAX_OPEN = 128  # token files kept open at once (a corpus may have thousands of shards)

    def __init__(self, directory: str, manifest: dict, start: int = 0, stop: int | None = None):
        self.directory, self.manifest = directory, manifest
        self._paths, self._data_start = [], []  # per shard: (tokens, offsets) files, byte of token 0
        counts = np.asarray([int(r["docs"]) for r in manifest["shards"]], np.int64)
        for record, docs in zip(manifest["shards"], counts, strict=True):
            base = os.path.join(directory, record["name"])
            paths, starts = (f"{base}.tokens.npy", f"{base}.offsets.npy"), []
            for path, dtype, n in zip(paths, (np.int32, np.int64), (None, docs + 1), strict=True):
                header = np.load(path, mmap_mode="r")  # the .npy header only: no data is read
                if header.dtype != dtype or header.ndim != 1 or (n is not None and len(header) != n):
                    raise ValueError(f"{path}: {header.dtype} {header.shape}, expected {np.dtype(dtype)} [{n or 'N'}]")
                starts.append(int(header.offset))
                del header
            self._paths.append(paths)
            self._data_start.append(starts[0])
        self._first = np.concatenate([[0], np.cumsum(counts)])  # global index of each shard's first document
        total = int(self._first[-1])
        self.start, self.stop = start, total if stop is None else stop
        if not 0 <= self.start <= self.stop <= total:
            raise ValueError(f"{directory}: document range [{start}, {stop}) outside [0, {total}]")
        self._offsets = [self._load_offsets(i) for i in range(len(counts))]
        self._fds: dict[int, int] = {}  # shard -> its token file's descriptor, least recently used first
        weakref.finalize(self, _close_all, self._fds)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getstate__(self):  # picklable (Grain workers): descriptors are reopened where used
        return {k: v for k, v in self.__dict__.items() if k != "_fds"}

    def __setstate__(self, state):
        self.__dict__.update(state, _fds={})
        weakref.finalize(self, _close_all, self._fds)

    def _fd(self, shard: int, keep=()) -> int:
        """Shard `shard`'s token file, opened on demand; past MAX_OPEN the least recently used one
        not in `keep` is closed."""
        fd = self._fds.pop(shard, None)
        if fd is None:
            for victim in [s for s in self._fds if s not in keep][: max(0, len(self._fds) + 1 - self.MAX_OPEN)]:
                os.close(self._fds.pop(victim))
            fd = os.open(self._paths[shard][0], os.O_RDONLY)
        self._fds[shard] = fd  # most recently used last
        return fd

    def _load_offsets(self, shard: int) -> np.ndarray | None:
        """Shard `shard`'s [D_i + 1] offsets as uint32 (int64 past 2^32 tokens); None if out of range."""
        if not (self._first[shard] < self.stop and self._first[shard + 1] > self.start):
            return None
        offsets = np.load(self._paths[shard][1])
        return offsets.astype(np.uint32) if offsets[-1] < 2**32 else offsets

    def _truncated(self, shard: int, lo: int, hi: int):
        return ValueError(f"{self._paths[shard][0]}: truncated while reading (tokens {lo}..{hi})")

    def read(self, shard: int, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) of shard `shard` ([hi - lo] int32)."""
        data = os.pread(self._fd(shard), 4 * (hi - lo), self._data_start[shard] + 4 * lo)
        if len(data) != 4 * (hi - lo):
            raise self._truncated(shard, lo, hi)
        return np.frombuffer(data, np.int32)

    def read_many(self, parts: list[int], los: list[int], his: list[int]) -> list[np.ndarray]:
        """[read(p, lo, hi) for each], shard by shard in tight loops (the packer's hot path)."""
        by_shard: dict[int, list[int]] = {}
        for i, p in enumerate(parts):
            by_shard.setdefault(p, []).append(i)
        out, shards, pread = [None] * len(parts), list(by_shard), os.pread
        for g in range(0, len(shards), self.MAX_OPEN):  # never more files open than MAX_OPEN
            group = shards[g : g + self.MAX_OPEN]
            for s in group:
                fd, start = self._fd(s, keep=group), self._data_start[s]
                for i in by_shard[s]:
                    out[i] = pread(fd, 4 * (his[i] - los[i]), start + 4 * los[i])
        for i, data in enumerate(out):
            if len(data) != 4 * (his[i] - los[i]):
                raise self._truncated(parts[i], los[i], his[i])
        return [np.frombuffer(d, np.int32) for d in out]

    def spans(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where documents `ids` [k] lie, for `read`: (shard [k], start [k], stop [k])."""
        g = self.start + np.asarray(ids, np.int64)
        if len(g) and not (self.start <= g.min() and g.max() < self.stop):
            raise IndexError(f"documents outside [0, {len(self)}) of a corpus of {len(self)}")
        shard = np.searchsorted(self._first, g, side="right") - 1
        j = g - self._first[shard]
        lo, hi = np.empty(len(g), np.int64), np.empty(len(g), np.int64)
        for s in np.unique(shard):
            at = shard == s
            lo[at], hi[at] = self._offsets[s][j[at]], self._offsets[s][j[at] + 1]
        return shard, lo, hi

    def doc(self, d: int) -> np.ndarray:
        if not 0 <= d < len(self):
            raise IndexError(f"document {d} of a corpus of {len(self)}")
        (s,), (lo,), (hi,) = self.spans(np.asarray([d]))
        return self.read(int(s), int(lo), int(hi))


def _close_all(fds: dict[int, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


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
