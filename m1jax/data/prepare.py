"""Tokenize text files once into a prepared corpus (`m1jax.data.prepared` describes the format).

`prepare(inputs, output, tokenizer_spec)` reads text / jsonl / parquet files through `datasets`
(memory-mapped Arrow, not loaded), takes `shard_rows` input rows per shard, tokenizes each shard in
`num_proc` processes (`Dataset.map`, with its progress bar) and writes the shard's two arrays and
then its record, each by an atomic rename. A killed prepare resumes at the first shard without a
record, under the settings it started with (`prepare.json`); a finished one (manifest present, same
inputs and settings) is a no-op; a manifest or an unfinished prepare from other inputs or settings
is an error rather than something to overwrite.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil

import numpy as np

from m1jax.data import prepared
from m1jax.data.pipeline import FILE_BUILDERS
from m1jax.data.tokenizer import load_tokenizer

PENDING = "prepare.json"  # the settings of a prepare in progress (removed when the manifest is written)


def expand_inputs(patterns: str | list[str]) -> list[str]:
    """Comma-separated globs (or a list of them) -> the sorted files, each glob matching at least one."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p]
    if not patterns:
        raise ValueError("--input: no file patterns given")
    files = []
    for pattern in patterns:
        found = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
        if not found:
            raise ValueError(f"--input {pattern!r}: matches no file")
        files += [f for f in found if f not in files]
    return files


def _builder(files: list[str]) -> str:
    kinds = {}
    for f in files:
        ext = os.path.splitext(f)[1].lstrip(".").lower()
        if ext not in FILE_BUILDERS:
            raise ValueError(f"{f}: unsupported extension {ext!r} (txt, jsonl, json, parquet)")
        kinds.setdefault(FILE_BUILDERS[ext], f)
    if len(kinds) > 1:
        mixed = ", ".join(f"{k}: {f}" for k, f in kinds.items())
        raise ValueError(f"--input mixes file kinds ({mixed}); prepare each kind into its own directory")
    return next(iter(kinds))


@functools.cache
def _tokenizer(spec):
    return load_tokenizer(spec)


def _encode(batch, *, spec, field):
    tok = _tokenizer(spec)
    return {"ids": [tok.encode(t, bos=True, eos=True) if t else [] for t in batch[field]]}


def _save_atomic(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _differing(settings: dict, other: dict) -> str:
    """The names of the settings `other` has otherwise, comma-separated ("" when none)."""
    return ", ".join(sorted(k for k in settings if other.get(k) != settings[k]))


def _settings(files, tokenizer, text_field: str, shard_rows: int) -> dict:
    """What a finished manifest must agree with for a rerun to be a no-op (input sizes and mtimes
    stand for their contents: hashing hundreds of GB on every rerun is what this step avoids)."""
    stats = {f: os.stat(f) for f in files}
    inputs = [{"path": os.path.abspath(f), "bytes": s.st_size, "mtime_ns": s.st_mtime_ns} for f, s in stats.items()]
    return {
        "format": prepared.FORMAT,
        "inputs": inputs,
        "text_field": text_field,
        "shard_rows": shard_rows,
        "tokenizer": prepared.tokenizer_identity(tokenizer),
    }


def prepare(
    inputs,
    output: str,
    tokenizer_spec: str = "byte",
    *,
    text_field: str = "text",
    shard_rows: int = 100_000,
    num_proc: int | None = None,
    progress: bool = True,
) -> dict:
    """Prepare `inputs` (comma-separated globs or a list) into `output`; returns the manifest."""
    import datasets

    if shard_rows < 1:
        raise ValueError(f"--shard_rows={shard_rows}: must be >= 1")
    files = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_spec)
    settings = _settings(files, tokenizer, text_field, shard_rows)
    os.makedirs(output, exist_ok=True)
    manifest_path = os.path.join(output, prepared.MANIFEST)
    if os.path.isfile(manifest_path):
        done = prepared.read_manifest(output)
        if diff := _differing(settings, done):
            raise ValueError(f"{manifest_path}: {output} was prepared with other {diff}; use a new --output directory")
        return done
    if not progress:
        datasets.disable_progress_bars()
    cache = os.path.join(output, ".cache")
    full = datasets.load_dataset(_builder(files), data_files=files, split="train", cache_dir=cache)
    if text_field not in full.column_names:
        raise ValueError(f"--text_field {text_field!r} is not a column of {files[0]} (columns: {full.column_names})")
    full = full.select_columns([text_field])
    num_shards = max(1, -(-len(full) // shard_rows))
    _claim(output, settings)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    records = []
    for i in range(num_shards):
        name = prepared.shard_name(i)
        record_path = os.path.join(output, name + ".json")
        part = full.select(range(i * shard_rows, min((i + 1) * shard_rows, len(full))))
        record = _finished(output, record_path, name, len(part), key)
        if record is not None:  # done by an earlier (killed) run
            records.append(record)
            continue
        procs = num_proc if num_proc and num_proc > 1 and len(part) >= 2 * num_proc else None
        encoded = part.map(
            _encode,
            batched=True,
            fn_kwargs={"spec": tokenizer_spec, "field": text_field},
            remove_columns=[text_field],
            num_proc=procs,
            keep_in_memory=True,
            desc=f"tokenizing shard {i + 1}/{num_shards}",
        )
        docs = [d for d in encoded["ids"] if d]
        lengths = np.fromiter((len(d) for d in docs), np.int64, count=len(docs))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate([np.asarray(d, np.int32) for d in docs]) if docs else np.zeros(0, np.int32)
        record = {"name": name, "rows": len(part), "docs": len(docs), "tokens": int(tokens.size), "settings": key}
        record["max_id"] = int(tokens.max(initial=-1))
        record["bytes"], record["sha256"] = {}, {}
        for part_name, array in (("tokens", tokens), ("offsets", offsets)):
            path = os.path.join(output, f"{name}.{part_name}.npy")
            _save_atomic(path, array)
            record["bytes"][part_name] = os.path.getsize(path)
            record["sha256"][part_name] = prepared.file_sha256(path)
        _write_json(record_path, record)  # last: the shard is done
        records.append(record)
    manifest = dict(settings, shards=records)
    manifest["docs"] = sum(r["docs"] for r in records)
    manifest["tokens"] = sum(r["tokens"] for r in records)
    _write_json(manifest_path, manifest)
    os.remove(os.path.join(output, PENDING))
    shutil.rmtree(cache, ignore_errors=True)  # datasets' Arrow copy of the inputs: not needed any more
    return manifest


def _claim(output: str, settings: dict) -> None:
    """Record the settings shards are written under (`PENDING`). An unfinished prepare's records are
    reused only under the same settings: under others they would mix two tokenizations."""
    started = os.path.join(output, PENDING)
    if os.path.isfile(started) and glob.glob(os.path.join(output, "shard-*.json")):
        with open(started) as f:
            before = json.load(f)
        if diff := _differing(settings, before):
            raise ValueError(
                f"{started}: an unfinished prepare in {output} used other {diff}; "
                "rerun it with its settings, or use a new --output directory"
            )
    _write_json(started, settings)


def _finished(output: str, record_path: str, name: str, rows: int, key: str) -> dict | None:
    """The record of shard `name` if an earlier run finished it under the same settings (`key`) with
    its files intact, else None (redo it)."""
    if not os.path.isfile(record_path):
        return None
    try:
        with open(record_path) as f:
            record = json.load(f)
        if (record.get("name"), record.get("rows"), record.get("settings")) != (name, rows, key):
            return None
        prepared.check_shard_files(output, record, checksums=False)
    except (OSError, ValueError, KeyError):  # a damaged record or shard: written again
        return None
    return record
