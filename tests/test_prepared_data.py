"""Prepared corpora (`experiments.prepare_data`, `m1jax.data.prepared`): the shards hold exactly the
documents the in-memory path builds, a killed prepare resumes to the same bytes, a rerun is a no-op,
training reads the directory through memory maps, and every kind of bad input names its file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from m1jax.data import prepared
from m1jax.data.pipeline import Packer, load_corpus
from m1jax.data.prepare import prepare
from m1jax.data.tokenizer import ByteTokenizer
from m1jax.train.config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [f"document {i}: " + "abc" * (i % 7) for i in range(50)]


def write_jsonl(path, texts, field="body"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return str(path)


def data_config(source, num_eval_docs=5, field="body"):
    d = base_config().data
    d.update(source=str(source), text_field=field, num_eval_docs=num_eval_docs)
    return d


def docs_of(corpus):
    return [corpus.doc(i).tolist() for i in range(len(corpus))]


@pytest.fixture
def corpus_dir(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", TEXTS[:30])
    write_jsonl(tmp_path / "b.jsonl", ["", *TEXTS[30:]])  # an empty text is left out
    out = tmp_path / "prepared"
    manifest = prepare(f"{src},{tmp_path / 'b*.jsonl'}", str(out), text_field="body", shard_rows=8, progress=False)
    return out, manifest


def test_shards_hold_the_documents_of_the_in_memory_path(corpus_dir, tmp_path):
    out, manifest = corpus_dir
    tok = ByteTokenizer()
    assert manifest["docs"] == 50 and len(manifest["shards"]) == 7  # 51 rows in shards of 8
    assert manifest["tokens"] == sum(len(tok.encode(t, bos=True, eos=True)) for t in TEXTS)
    full = prepared.open_prepared(str(out), tok)
    assert docs_of(full) == [tok.encode(t, bos=True, eos=True) for t in TEXTS]
    assert not hasattr(full, "tokens")  # read in place, a document at a time, not loaded

    # The training path: a prepared directory gives the same train / eval documents and the same
    # packed batches as the same texts given as a file.
    one = write_jsonl(tmp_path / "all.jsonl", TEXTS)
    for split in ("train", "eval"):
        a = load_corpus(data_config(out), tok, str(tmp_path / "w1"), split)
        b = load_corpus(data_config(one), tok, str(tmp_path / "w2"), split)
        assert (
            isinstance(a, prepared.PreparedCorpus) and docs_of(a) == docs_of(b) and len(a) == (45, 5)[split == "eval"]
        )
        pa, pb = Packer(a, 32, 4, seed=3), Packer(b, 32, 4, seed=3)
        for _ in range(5):
            x, y = pa.next_batch(), pb.next_batch()
            np.testing.assert_array_equal(x["tokens"], y["tokens"])
            np.testing.assert_array_equal(x["segment_ids"], y["segment_ids"])


def test_rerun_is_a_no_op_and_a_killed_prepare_resumes(corpus_dir, tmp_path):
    out, manifest = corpus_dir
    stamps = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.startswith("shard")}
    inputs = f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}"
    assert prepare(inputs, str(out), text_field="body", shard_rows=8, progress=False) == manifest
    assert stamps == {f: os.stat(out / f).st_mtime_ns for f in stamps}  # nothing rewritten

    # Killed after shard 3 was written, inside shard 4 (its tokens array only half there, no record).
    os.remove(out / prepared.MANIFEST)
    for i in range(4, 7):
        os.remove(out / f"{prepared.shard_name(i)}.json")
    (out / f"{prepared.shard_name(4)}.tokens.npy").write_bytes(b"\x93NUMPY half")
    for i in range(5, 7):
        for part in ("tokens", "offsets"):
            os.remove(out / f"{prepared.shard_name(i)}.{part}.npy")
    again = prepare(inputs, str(out), text_field="body", shard_rows=8, progress=False)
    assert again == manifest  # the same shards, byte for byte (checksums)
    for i in range(4):  # the finished shards were kept, not redone
        assert (
            os.stat(out / f"{prepared.shard_name(i)}.tokens.npy").st_mtime_ns
            == stamps[f"{prepared.shard_name(i)}.tokens.npy"]
        )

    with pytest.raises(ValueError, match="prepared with other shard_rows"):
        prepare(inputs, str(out), text_field="body", shard_rows=4, progress=False)
    assert not (out / ".cache").exists() and not (out / "prepare.json").exists()  # cleaned up when done

    # A record whose shard files are gone is redone; an unfinished prepare resumed with other
    # settings is an error (its records would mix two tokenizations).
    os.remove(out / prepared.MANIFEST)
    os.remove(out / f"{prepared.shard_name(6)}.offsets.npy")
    assert prepare(inputs, str(out), text_field="body", shard_rows=8, progress=False) == manifest
    os.remove(out / prepared.MANIFEST)
    (out / "prepare.json").write_text(json.dumps({"shard_rows": 4}))
    with pytest.raises(ValueError, match=r"prepare.json: an unfinished prepare in .* used other .*shard_rows"):
        prepare(inputs, str(out), text_field="body", shard_rows=8, progress=False)


def _corrupt(out, how):
    name = out / f"{prepared.shard_name(2)}.tokens.npy"
    if how == "missing":
        os.remove(name)
    elif how == "truncated":
        name.write_bytes(name.read_bytes()[:-4])
    elif how == "checksum":
        raw = bytearray(name.read_bytes())
        raw[-1] ^= 1
        name.write_bytes(bytes(raw))
    return str(name)


@pytest.mark.parametrize(
    "how,match",
    [("missing", "missing shard file"), ("truncated", "truncated or altered"), ("checksum", "checksum mismatch")],
)
def test_damaged_shards_are_errors_naming_the_file(corpus_dir, how, match):
    out, _ = corpus_dir
    name = _corrupt(out, how)
    with pytest.raises(ValueError, match=match) as e:
        prepared.open_prepared(str(out), ByteTokenizer())
    assert name in str(e.value)


def test_checksums_are_read_once_per_process_and_names_are_checked(corpus_dir, tmp_path, monkeypatch):
    out, manifest = corpus_dir
    calls = []
    real = prepared.file_sha256
    monkeypatch.setattr(prepared, "file_sha256", lambda path, *a: calls.append(path) or real(path, *a))
    for split in ("train", "eval", "train"):
        load_corpus(data_config(out), ByteTokenizer(), str(tmp_path / "w"), split)
    assert sorted(calls) == sorted(
        str(out / f"{r['name']}.{p}.npy") for r in manifest["shards"] for p in ("tokens", "offsets")
    )

    manifest["shards"][1]["name"] = "../elsewhere"
    (out / prepared.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest.json: shard 1 is named '../elsewhere'"):
        prepared.open_prepared(str(out))
    (tmp_path / "raw").mkdir()  # a directory that was never (or not yet completely) prepared
    with pytest.raises(ValueError, match="raw: no manifest.json, not a prepared corpus"):
        load_corpus(data_config(tmp_path / "raw"), ByteTokenizer(), str(tmp_path / "w"), "train")


def test_other_tokenizer_and_ids_outside_the_vocabulary_are_errors(corpus_dir, tmp_path):
    from test_tasks import _write_hf_tokenizer

    from m1jax.data.tokenizer import HFTokenizer

    out, _ = corpus_dir
    hf = HFTokenizer(_write_hf_tokenizer(tmp_path / "tok.json", ["<pad>", "<s>", "</s>"]))
    with pytest.raises(
        ValueError, match=r"manifest.json: prepared with another tokenizer \(.*kind: prepared 'ByteTokenizer'"
    ):
        load_corpus(data_config(out), hf, str(tmp_path / "w"), "train")

    # A shard whose ids exceed the vocabulary its manifest names (rewritten with consistent checksums).
    path = out / prepared.MANIFEST
    manifest = json.loads(path.read_text())
    name = out / f"{prepared.shard_name(1)}.tokens.npy"
    bad = np.load(name)
    bad[0] = 10_000
    np.save(name, bad)
    rec = manifest["shards"][1]
    rec["max_id"], rec["sha256"]["tokens"] = int(bad.max()), prepared.file_sha256(str(name))
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"{name}: token id 10000 outside the tokenizer's vocabulary of 261"):
        prepared.open_prepared(str(out), ByteTokenizer())


def test_bad_inputs_are_one_line_errors(tmp_path):
    def run(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.prepare_data", *args, "--progress=false"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        return proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1] if proc.returncode else proc.stdout

    out = str(tmp_path / "out")
    code, line = run(f"--input={tmp_path}/nothing-*.jsonl", f"--output={out}")
    assert code == 1 and line == f"error: --input '{tmp_path}/nothing-*.jsonl': matches no file"
    (tmp_path / "x.csv").write_text("a,b\n")
    code, line = run(f"--input={tmp_path}/x.csv", f"--output={out}")
    assert code == 1 and line.startswith(f"error: {tmp_path}/x.csv: unsupported extension 'csv'")
    src = write_jsonl(tmp_path / "a.jsonl", TEXTS[:4])
    code, line = run(f"--input={src}", f"--output={out}", "--text_field=text")
    assert code == 1 and "--text_field 'text' is not a column" in line and "body" in line
    code, line = run(f"--input={src}", f"--output={out}", "--text_field=body", "--num_proc=2")
    assert code == 0 and "4 documents" in line, line
    with pytest.raises(ValueError, match="no manifest.json, not a prepared corpus"):
        prepared.open_prepared(str(tmp_path))


def test_spans_locate_the_documents_doc_returns(corpus_dir):
    """The packer's batched lookup (`spans`, over shards and a held-out range) agrees with `doc`."""
    out, _ = corpus_dir
    for split in ("train", "eval"):
        corpus = prepared.open_prepared(str(out), ByteTokenizer(), split=split, num_eval_docs=5)
        ids = np.random.default_rng(0).permutation(len(corpus))
        part, lo, hi = corpus.spans(ids)
        many = corpus.read_many(part.tolist(), lo.tolist(), hi.tolist())
        for d, p, a, b, doc in zip(ids, part, lo, hi, many, strict=True):
            np.testing.assert_array_equal(corpus.read(int(p), int(a), int(b)), corpus.doc(int(d)))
            np.testing.assert_array_equal(doc, corpus.doc(int(d)))
    corpus = prepared.open_prepared(str(out), ByteTokenizer(), num_eval_docs=5)
    corpus.MAX_OPEN = 2  # more shards (7) than open files: descriptors are closed and reopened
    want = docs_of(prepared.open_prepared(str(out), ByteTokenizer(), num_eval_docs=5))
    assert docs_of(corpus) == want
    for ids in (np.arange(len(corpus)), np.random.default_rng(1).permutation(len(corpus)), [40, 0, 41, 1, 8]):
        part, lo, hi = corpus.spans(np.asarray(ids))
        got = corpus.read_many(part.tolist(), lo.tolist(), hi.tolist())
        assert [g.tolist() for g in got] == [want[i] for i in ids]
        assert len(corpus._fds) <= 2
