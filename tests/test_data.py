"""Packing and corpora: determinism, resume of the data position, segment ids, user files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from m1jax.data.pipeline import Corpus, Packer, load_corpus, loss_mask
from m1jax.data.tokenizer import ByteTokenizer
from m1jax.train.config import base_config


def corpus_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(5, 200, n).astype(np.int32) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return Corpus(np.concatenate(docs), offsets)


def take(packer, n):
    return [packer.next_batch() for _ in range(n)]


def test_same_seed_same_batches_and_resume_mid_stream():
    corpus = corpus_of(np.random.default_rng(1).integers(3, 40, 300))
    a = take(Packer(corpus, 64, 4, seed=7), 30)
    b = take(Packer(corpus, 64, 4, seed=7), 30)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    c = take(Packer(corpus, 64, 4, seed=8), 30)
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c, strict=True))
    p = Packer(corpus, 64, 4, seed=7)
    take(p, 17)
    state = json.loads(json.dumps(p.state))  # JSON round trip, as in a checkpoint
    q = Packer(corpus, 64, 4, seed=7)
    q.restore(state)
    for x, y in zip(a[17:], take(q, 13), strict=True):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["segment_ids"], y["segment_ids"])
    with pytest.raises(ValueError, match="seed"):
        Packer(corpus, 64, 4, seed=9).restore(state)


def test_rows_hold_whole_documents_and_every_token_once_per_epoch():
    lengths = np.random.default_rng(2).integers(3, 30, 50)
    corpus = corpus_of(lengths)
    p = Packer(corpus, 32, 2, seed=0)
    seen = []
    while p.epoch == 0:
        batch = p.next_batch()
        for toks, segs in zip(batch["tokens"], batch["segment_ids"], strict=True):
            ids = segs[segs > 0]
            assert np.all(np.diff(ids) >= 0) and ids[0] == 1 and np.all(segs[len(ids) :] == 0)  # padding at the end
            seen.extend(toks[segs == s] for s in np.unique(ids))
    # Every document appears whole (rows never cut a document that fits); only the last batch
    # may already hold documents of the next epoch.
    seen = [tuple(d) for d in seen]
    for d in range(len(corpus)):
        assert tuple(corpus.doc(d)) in seen
    assert len(corpus) <= len(seen) <= len(corpus) + 2 * 32 // 3


def test_long_documents_continue_in_the_next_row():
    corpus = corpus_of([70, 5])
    p = Packer(corpus, 32, 1, shuffle=False)
    rows = [p.next_batch() for _ in range(4)]
    flat = np.concatenate([r["tokens"][0][r["segment_ids"][0] > 0] for r in rows[:3]])
    np.testing.assert_array_equal(flat[:70], corpus.doc(0))
    assert rows[0]["segment_ids"][0].tolist() == [1] * 32


def test_loss_mask_stays_inside_documents():
    segs = np.array([[1, 1, 1, 2, 2, 0, 0]])
    assert loss_mask(segs).tolist() == [[True, True, False, True, False, False]]


def test_task_corpus_and_user_jsonl(tmp_path):
    tok = ByteTokenizer()
    data = base_config().data
    data.update(num_train_docs=200, num_eval_docs=20)
    train = load_corpus(data, tok, str(tmp_path), "train")
    again = load_corpus(data, tok, str(tmp_path), "train")  # from the workdir cache
    np.testing.assert_array_equal(train.tokens, again.tokens)
    assert len(train) == 200 and train.doc(0)[0] == tok.bos_id and train.doc(0)[-1] == tok.eos_id
    assert "<think>" in tok.decode(train.doc(0).tolist())
    evals = load_corpus(data, tok, str(tmp_path), "eval")
    assert not {tuple(evals.doc(i)) for i in range(len(evals))} & {tuple(train.doc(i)) for i in range(len(train))}

    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"body": f"document number {i}"}) + "\n" for i in range(40)))
    user = base_config().data
    user.update(source=str(path), text_field="body", num_eval_docs=4)
    c = load_corpus(user, tok, str(tmp_path), "train")
    e = load_corpus(user, tok, str(tmp_path), "eval")
    assert len(c) == 36 and len(e) == 4
    assert tok.decode(e.doc(3).tolist(), skip_special=True) == "document number 39"
    user.text_field = "text"
    with pytest.raises(ValueError, match="text_field"):
        load_corpus(user, tok, str(tmp_path), "train")
