"""Packing and corpora: determinism, resume of the data position, segment ids, user files, and
per-process data shards (disjoint, covering, resumable; one shard is the unsharded packer)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from m1jax.data import streams
from m1jax.data.loader import gather_state
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
    while p.stream.epoch == 0:
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


def packed_docs(packer, n_batches):
    """The documents of the next `n_batches` batches in packing order, as token tuples (every
    segment is one whole document when no document is longer than a row)."""
    docs = []
    for _ in range(n_batches):
        batch = packer.next_batch()
        for toks, segs in zip(batch["tokens"], batch["segment_ids"], strict=True):
            docs.extend(tuple(toks[segs == s]) for s in range(1, segs.max() + 1))
    return docs


def test_shards_take_every_nth_document_of_one_permutation():
    """Shard i of 3 packs documents i, i+3, ... of the epoch's seeded permutation: the shards are
    disjoint and together hold every document, and the next epoch continues the same way."""
    corpus = corpus_of(np.random.default_rng(4).integers(3, 40, 101))  # 101 docs: shards of 34, 34, 33
    all_docs = [tuple(corpus.doc(d)) for d in range(len(corpus))]
    assert len(set(all_docs)) == len(corpus)  # documents are told apart by their tokens
    n = len(corpus)
    epoch0, epoch1 = (streams.permute(np.arange(n), n, streams.feistel_keys(5, e)) for e in (0, 1))
    shards = []
    for i in range(3):
        docs = packed_docs(Packer(corpus, 64, 2, seed=5, shard=i, num_shards=3), 30)  # >= 60 docs
        m = len(range(i, len(corpus), 3))
        assert docs[:m] == [all_docs[d] for d in epoch0[i::3]], i
        assert docs[m : m + 5] == [all_docs[d] for d in epoch1[i::3][:5]], i
        shards.append(set(docs[:m]))
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    assert shards[0] | shards[1] | shards[2] == set(all_docs)


def batch_digest(packer, n):
    h = hashlib.sha256()
    for _ in range(n):
        b = packer.next_batch()
        h.update(b["tokens"].tobytes())
        h.update(b["segment_ids"].tobytes())
    return h.hexdigest()


def test_one_shard_gives_the_unsharded_batches():
    """Digests of the batches of the packer before shards existed (40 batches: several epochs,
    documents longer than a row), under its document order ("numpy"), and the continuation after
    restoring a state it saved (no "order" field: that order is taken up again)."""
    corpus = corpus_of(np.random.default_rng(1).integers(3, 90, 60))
    shuffled = "049171900815f30aafcaaa8becf57f51672ac7004bf65dedd8b1ec102f7403d6"
    in_order = "678aeb4effa5aafd01c1651c452d9c12815b0b550d557fb98640a4fdbeed4f94"
    assert batch_digest(Packer(corpus, 64, 4, seed=3, order="numpy"), 40) == shuffled
    assert batch_digest(Packer(corpus, 64, 4, seed=3, shard=0, num_shards=1, order="numpy"), 40) == shuffled
    assert batch_digest(Packer(corpus, 64, 4, seed=3, shuffle=False), 40) == in_order
    assert batch_digest(Packer(corpus, 64, 4, seed=3), 40) != shuffled  # the default order is "feistel"
    old_state = {"epoch": 1, "index": 15, "offset": 74, "seed": 3}  # the old packer's state after 15 batches
    p = Packer(corpus, 64, 4, seed=3)
    p.restore(old_state)
    assert batch_digest(p, 25) == "f06d63bbe008f85895993a2ce9a151f5588ba053005f2b992606bbb4cf256a7c"
    assert p.state["order"] == "numpy"  # and its checkpoints keep it
    with pytest.raises(ValueError, match="document order 'sorted'"):
        p.restore(dict(old_state, order="sorted"))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4097])
def test_feistel_permutation_is_a_seeded_bijection(n):
    keys = streams.feistel_keys(11, 0)
    perm = streams.permute(np.arange(n), n, keys)
    assert sorted(perm.tolist()) == list(range(n))
    np.testing.assert_array_equal(streams.permute(np.arange(n)[::-1], n, keys), perm[::-1])  # any positions
    if n >= 64:
        other = streams.permute(np.arange(n), n, streams.feistel_keys(11, 1))
        assert np.mean(perm == other) < 0.1 and np.mean(perm == np.arange(n)) < 0.1
        # Shuffled, not shifted: displacement |perm[i] - i| averages ~n/3 for a uniform permutation.
        assert 0.25 < np.abs(perm - np.arange(n)).mean() / n < 0.42


def assert_same_batches(xs, ys):
    for x, y in zip(xs, ys, strict=True):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["segment_ids"], y["segment_ids"])


def test_shards_resume_exactly_from_their_own_or_every_shards_state():
    corpus = corpus_of(np.random.default_rng(6).integers(3, 90, 80))

    def make(i, n=3):
        return Packer(corpus, 64, 2, seed=7, shard=i, num_shards=n)

    streams = [take(make(i), 30) for i in range(3)]
    packers = [make(i) for i in range(3)]
    for p in packers:
        take(p, 13)
    own = json.loads(json.dumps(packers[1].state))  # JSON round trip, as in a checkpoint
    q = make(1)
    q.restore(own)
    assert_same_batches(take(q, 17), streams[1][13:])
    every = json.loads(json.dumps({"shards": [p.state for p in packers]}))  # what a checkpoint holds
    for i in range(3):
        q = make(i)
        q.restore(every)
        assert_same_batches(take(q, 17), streams[i][13:])

    with pytest.raises(ValueError, match="saved by 3 process"):
        make(0, n=2).restore(every)
    with pytest.raises(ValueError, match="shard 1 of 3"):
        make(0).restore(own)
    with pytest.raises(ValueError, match="shard 0 of 1"):  # a state saved before shards existed
        make(0).restore({"epoch": 0, "index": 4, "offset": 0, "seed": 7})


def test_gathered_data_state_holds_this_process_and_resumes():
    corpus = corpus_of(np.random.default_rng(6).integers(3, 90, 80))
    p = Packer(corpus, 64, 4, seed=7)
    take(p, 9)
    saved = json.loads(json.dumps(gather_state(p, p.state)))
    assert saved == {"shards": [p.state]}
    q = Packer(corpus, 64, 4, seed=7)
    q.restore(saved)
    assert_same_batches(take(q, 5), take(p, 5))


@pytest.mark.parametrize(
    ("shard", "num_shards", "match"),
    [(-1, 2, "lie in"), (2, 2, "lie in"), (0, 0, "lie in"), (0, 2.0, "integers"), (0, 11, "exceeds")],
)
def test_bad_shard_arguments_are_errors(shard, num_shards, match):
    with pytest.raises(ValueError, match=match):
        Packer(corpus_of([5] * 10), 32, 1, shard=shard, num_shards=num_shards)
