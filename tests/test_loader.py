"""The Grain loader and mixtures (`m1jax.data.loader`, `m1jax.data.streams`): a mixture draws each
source with its weight, deterministically per seed, each source with its own epochs; the Grain
iterator's state (prefetching or not) resumes at the batches consumed, not those packed ahead; a
training run on a mixture logs each source's share, epochs and held-out loss and resumes exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_train import quick_config

from m1jax.data import loader, streams
from m1jax.data.pipeline import Corpus, Packer, mixed_packer, parse_mixture, source_names
from m1jax.data.prepare import prepare
from m1jax.train.config import validate
from m1jax.train.loop import train
from m1jax.train.metrics import read_metrics


def corpus_of(lengths, first_token: int) -> Corpus:
    """Documents whose tokens are all `first_token + d` (document d): the source of a token is readable."""
    docs = [np.full(n, first_token + d, np.int32) for d, n in enumerate(lengths)]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    return Corpus(np.concatenate(docs), offsets)


def two_sources():
    big = corpus_of(np.random.default_rng(0).integers(5, 40, 300), 1_000)  # ids 1000..1299
    small = corpus_of(np.random.default_rng(1).integers(5, 40, 20), 5_000)  # ids 5000..5019
    return big, small


def take(it_or_packer, n):
    if isinstance(it_or_packer, Packer):
        return [it_or_packer.next_batch() for _ in range(n)]
    return [next(it_or_packer)[0] for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["segment_ids"], y["segment_ids"])


def test_mixture_draws_each_source_with_its_weight_and_its_own_epochs():
    big, small = two_sources()
    p = mixed_packer([big, small], [0.7, 0.3], 64, 8, seed=3)
    counts = np.zeros(2)
    for _ in range(60):
        p.next_batch()
        counts += p.source_tokens
    mix = p.stream
    docs_taken = [s.epoch * len(s) + s.index for s in mix.streams]
    share_docs = docs_taken[0] / sum(docs_taken)
    assert abs(share_docs - 0.7) < 0.05, docs_taken  # documents drawn ~ weights
    # Token shares follow from the documents' lengths (both sources' lengths are drawn alike here).
    assert abs(counts[0] / counts.sum() - 0.7) < 0.08, counts
    assert np.allclose(p.epochs_at(p.state), [d / len(s) for d, s in zip(docs_taken, mix.streams, strict=True)])
    q = mixed_packer([big, small], [0.7, 0.3], 64, 8, seed=3)
    take(q, 10)  # ~230 documents
    epochs = q.epochs_at(q.state)
    assert epochs[0] < 1 < epochs[1], epochs  # the small source repeats, the big one has not
    # Each source's epoch holds each of its documents once: the small one's first epoch did.
    seen = np.concatenate(
        [b["tokens"][b["segment_ids"] > 0] for b in take(mixed_packer([big, small], [0.7, 0.3], 64, 8, seed=3), 60)]
    )
    assert set(range(5_000, 5_020)) <= set(seen.tolist())


def test_mixture_is_deterministic_per_seed_and_resumes_mid_stream():
    big, small = two_sources()
    make = lambda seed: mixed_packer([big, small], [0.6, 0.4], 48, 4, seed=seed)
    assert_same_batches(take(make(1), 12), take(make(1), 12))
    a, b = take(make(1), 12), take(make(2), 12)
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b, strict=True))
    p = make(1)
    take(p, 7)
    saved = json.loads(json.dumps(p.state))
    assert len(saved["mixture"]) == 1 + 2 * 2
    q = make(1)
    q.restore(saved)
    assert_same_batches(take(q, 9), take(p, 9))
    # Weights change the draws; states do not cross layouts.
    single = Packer(big, 48, 4, seed=1)
    with pytest.raises(ValueError, match="mixture"):
        single.restore(saved)
    with pytest.raises(ValueError, match="one source"):
        make(1).restore(single.state)
    with pytest.raises(ValueError, match="the data changed"):
        mixed_packer([big, small, big], [1, 1, 1], 48, 4, seed=1).restore(saved)


def test_mixture_shards_are_disjoint_and_resume_from_the_gathered_state():
    big, small = two_sources()
    shards = [mixed_packer([big, small], [0.5, 0.5], 64, 2, seed=4, shard=i, num_shards=2) for i in range(2)]
    ids = [
        set(np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in take(p, 10)]).tolist())
        & set(range(1_000, 1_300))
        for p in shards
    ]
    assert not ids[0] & ids[1]  # the big source's documents: shard 0 takes even, shard 1 odd positions
    gathered = {"shards": [p.state for p in shards]}
    for i, p in enumerate(shards):
        q = mixed_packer([big, small], [0.5, 0.5], 64, 2, seed=4, shard=i, num_shards=2)
        q.restore(json.loads(json.dumps(gathered)))
        assert_same_batches(take(q, 4), take(p, 4))


@pytest.mark.parametrize("prefetch", [0, 3])
def test_grain_iterator_state_is_the_consumed_position(prefetch):
    big, small = two_sources()
    make = lambda: mixed_packer([big, small], [0.7, 0.3], 64, 4, seed=5)
    it = loader.make_iterator(make(), prefetch)
    first = take(it, 6)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    rest = take(it, 5)
    it.close()
    assert_same_batches(first + rest, take(make(), 11))  # prefetching changes no batch
    again = loader.make_iterator(make(), prefetch)
    again.set_state(state)
    assert_same_batches(take(again, 5), rest)
    again.close()
    # The element carries each source's tokens in its batch.
    it = loader.make_iterator(make(), prefetch)
    batch, from_sources = next(it)
    it.close()
    assert from_sources.sum() == (batch["segment_ids"] > 0).sum()


def test_single_source_grain_iterator_keeps_the_packers_batches_and_state_format():
    big, _ = two_sources()
    it = loader.make_iterator(Packer(big, 64, 4, seed=9), prefetch=2)
    assert_same_batches(take(it, 8), take(Packer(big, 64, 4, seed=9), 8))
    assert set(it.get_state()) == {"epoch", "index", "offset", "seed", "shard", "num_shards", "order", "docs"}
    it.close()


def test_parse_mixture_names_the_bad_entry(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert parse_mixture(f"{a}:0.7, {b}:0.3") == [(str(a), 0.7), (str(b), 0.3)]
    for spec, match in [
        (f"{a}", "DIR:WEIGHT"),
        (f"{a}:0", "positive weight"),
        (f"{a}:x", "positive weight"),
        (f"{a}:-1", "positive weight"),
        (f"{tmp_path / 'missing'}:1", "not a directory"),
        (f"{a}:1,{a}:2", "twice"),
        (",", "names no source"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_mixture(spec)
    with pytest.raises(ValueError, match="positive and finite"):
        streams.MixedDocs([streams.ShuffledDocs(two_sources()[0])], [math.inf])


def _prepared(tmp_path, name, texts):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / name
    prepare(str(src), str(out), shard_rows=64, progress=False)
    return out


@pytest.mark.slow
def test_training_on_a_mixture_logs_shares_and_resumes_exactly(tmp_path):
    arith = _prepared(tmp_path, "arith", [f"{i}+{i % 7}={i + i % 7}" for i in range(400)])
    words = _prepared(tmp_path, "words", [" ".join(["ab", "cd", "ef"][: 1 + i % 3]) * (1 + i % 4) for i in range(60)])
    mix = f"{arith}:0.75,{words}:0.25"
    cfg = lambda: quick_config({"data.mixture": mix, "data.num_eval_docs": 10, "eval.num_samples": 0})
    validate(cfg())
    bad = quick_config({"data.mixture": mix, "data.source": str(arith)})
    with pytest.raises(ValueError, match="data.mixture"):
        validate(bad)
    assert source_names(cfg().data) == ["arith", "words"]

    full, parts = tmp_path / "full", tmp_path / "parts"
    train(cfg(), str(full), progress=False)
    assert train(cfg(), str(parts), progress=False, stop_at=6)["end_step"] == 6
    assert train(cfg(), str(parts), progress=False)["start_step"] == 6
    rows = read_metrics(full)
    curve = lambda w: {r["step"]: r["loss"] for r in read_metrics(w) if "loss" in r}
    a, b = curve(full), curve(parts)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=0, atol=1e-6)
    shares = np.asarray([[r["data/arith/share"], r["data/words/share"]] for r in rows if "loss" in r])
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, atol=1e-9)
    assert 0.6 < shares[:, 0].mean() < 0.9, shares  # ~0.75: both kinds of document are ~12 tokens
    last = [r for r in rows if "loss" in r][-1]
    assert last["data/words/epochs"] > last["data/arith/epochs"] > 0  # the small source repeats first
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and all(math.isfinite(r["eval_loss/arith"]) and math.isfinite(r["eval_loss/words"]) for r in evals)


def test_states_name_a_changed_corpus_or_weights_and_survive_large_counts():
    big, small = two_sources()
    p = mixed_packer([big, small], [0.7, 0.3], 64, 4, seed=5)
    take(p, 3)
    saved = json.loads(json.dumps(p.state))
    with pytest.raises(ValueError, match="the data changed"):
        mixed_packer([big, two_sources()[0]], [0.7, 0.3], 64, 4, seed=5).restore(saved)
    with pytest.raises(ValueError, match="mixture weights"):
        mixed_packer([big, small], [0.5, 0.5], 64, 4, seed=5).restore(saved)
    with pytest.raises(ValueError, match="the data changed"):
        Packer(small, 64, 4, seed=5).restore(Packer(big, 64, 4, seed=5).state)
    # A document count past 2^31 (a long-running mixture) survives the all-gather into the checkpoint.
    p.stream.k = 2**31 + 5
    gathered = loader.gather_state(p, p.state)
    assert gathered == {"shards": [p.state]} and gathered["shards"][0]["mixture"][0] == 2**31 + 5
