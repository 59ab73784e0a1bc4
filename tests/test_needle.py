"""m1jax.data.needle: deterministic needle documents, the eval grid and its answer-token scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax import config, init_params
from m1jax.data import needle
from m1jax.data.pipeline import Packer
from m1jax.data.tokenizer import load_tokenizer
from m1jax.evals import needle as needle_eval
from m1jax.model import M1Model

TOK = load_tokenizer("byte")


@pytest.mark.parametrize("length", [24, 57, 256])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_document_has_exact_length_and_one_retrievable_answer(length, depth):
    doc = needle.document(TOK, np.random.default_rng(3), length, depth)
    assert len(doc.tokens) == length and doc.tokens[0] == TOK.bos_id and doc.tokens[-1] == TOK.eos_id
    text = TOK.decode(doc.tokens[1:-1])
    answer = TOK.decode(doc.tokens[doc.answer_start : doc.answer_start + doc.answer_len])
    assert answer == doc.value and len(doc.value) == 4 and doc.value.isdigit()
    assert text.endswith(f" ?{doc.key}={doc.value}")
    assert TOK.decode(doc.tokens[doc.needle_pos : doc.needle_pos + 10]) == f" {doc.key}={doc.value} "
    assert sum(ch.isdigit() for ch in text) == 8  # the digits are the needle's value and the answer
    assert sum(ch.isupper() for ch in text) == 6  # the key, in the needle and the query


def test_depth_moves_the_needle_and_documents_are_deterministic():
    pos = [needle.document(TOK, np.random.default_rng(0), 200, d).needle_pos for d in (0.0, 0.5, 1.0)]
    assert pos[0] == 1 and pos[0] < pos[1] < pos[2]
    n_hay = 200 - (2 + 10 + 6 + 4)  # bos, needle, query, value, eos
    assert pos[2] == 1 + n_hay  # depth 1: right after the haystack, just before the query
    a = needle.document(TOK, np.random.default_rng(5), 100, 0.5)
    b = needle.document(TOK, np.random.default_rng(5), 100, 0.5)
    assert a == b


def test_distractors_have_other_keys():
    doc = needle.document(TOK, np.random.default_rng(1), 120, 0.5, distractors=3)
    text = TOK.decode(doc.tokens[1:-1])
    pairs = [w for w in text.split() if "=" in w and not w.startswith("?")]
    keys = [p.split("=")[0] for p in pairs]
    assert len(pairs) == 4 and len(set(keys)) == 4 and f"{doc.key}={doc.value}" in pairs
    assert len(doc.tokens) == 120


def test_document_errors():
    with pytest.raises(ValueError, match="too short"):
        needle.document(TOK, np.random.default_rng(0), 10, 0.5)
    with pytest.raises(ValueError, match="depth"):
        needle.document(TOK, np.random.default_rng(0), 64, 1.5)
    with pytest.raises(ValueError, match="min_length"):
        needle.corpus(TOK, 4, 0, min_length=64, max_length=32)


def test_corpus_and_concat_feed_the_packer():
    c = needle.corpus(TOK, 50, 0, min_length=32, max_length=96)
    lengths = np.diff(c.offsets)
    assert len(c) == 50 and lengths.min() >= 32 and lengths.max() <= 96
    again = needle.corpus(TOK, 50, 0, min_length=32, max_length=96)
    np.testing.assert_array_equal(c.tokens, again.tokens)
    other = needle.corpus(TOK, 5, 1, min_length=40, max_length=40)
    both = needle.concat(c, other)
    assert len(both) == 55
    np.testing.assert_array_equal(both.doc(52), other.doc(2))
    np.testing.assert_array_equal(both.doc(3), c.doc(3))
    batch = Packer(both, 128, 4, seed=0).next_batch()
    assert batch["tokens"].shape == (4, 128) and batch["segment_ids"].max() >= 1


def test_grid_masks_the_answer_positions():
    g = needle.grid(TOK, [32, 64], [0.0, 0.5, 1.0], 3, seed=0, seq_len=64)
    assert g["tokens"].shape == (18, 64) and g["length"].tolist() == [32] * 9 + [64] * 9
    for i in range(18):
        n = g["length"][i]
        assert (g["segment_ids"][i, :n] == 1).all() and (g["segment_ids"][i, n:] == 0).all()
        pos = np.nonzero(g["answer_mask"][i])[0]
        assert len(pos) == 4 and pos[-1] == n - 3  # predicting the last digit; then <eos>
        nxt = TOK.decode(g["tokens"][i, pos + 1])
        assert nxt.isdigit() and TOK.decode(g["tokens"][i, pos[0] - 4 : pos[0] + 1]).startswith("?")
    g2 = needle.grid(TOK, [32, 64], [0.0, 0.5, 1.0], 3, seed=0, seq_len=64)
    np.testing.assert_array_equal(g["tokens"], g2["tokens"])
    with pytest.raises(ValueError, match="seq_len"):
        needle.grid(TOK, [128], [0.5], 1, seed=0, seq_len=64)


@pytest.mark.slow
def test_score_matches_the_model_and_is_chunk_invariant():
    cfg = config.tiny(vocab_size=264)
    params = init_params(cfg, jax.random.PRNGKey(0))
    g = needle.grid(TOK, [32, 48], [0.25, 0.75], 3, seed=1, seq_len=48)
    s = needle_eval.score(cfg, params, g)
    logits, _ = M1Model(cfg).apply({"params": params}, jnp.asarray(g["tokens"]), jnp.asarray(g["segment_ids"]))
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    for i in range(len(g["length"])):
        pos = np.nonzero(g["answer_mask"][i])[0]
        tgt = g["tokens"][i, pos + 1]
        np.testing.assert_allclose(s["nll"][i], -logp[i, pos, tgt].mean(), rtol=1e-5)
        assert s["exact"][i] == bool((logp[i, pos].argmax(-1) == tgt).all())
    chunked = needle_eval.score(cfg, params, g, rows_per_call=5)  # 12 rows: 5 + 5 + 2 (padded)
    np.testing.assert_allclose(chunked["nll"], s["nll"], rtol=1e-5)
    np.testing.assert_array_equal(chunked["exact"], s["exact"])
    t = needle_eval.table(g, s)
    assert t["nll"].shape == t["accuracy"].shape == (2, 2)
    np.testing.assert_allclose(t["nll"][1, 0], s["nll"][(g["length"] == 48) & (g["depth"] == 0.25)].mean())
