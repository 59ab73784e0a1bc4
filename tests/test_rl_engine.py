"""The rollout engine: continuous batching and prefix sharing give the tokens of the plain paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import CFG, PARAMS

from m1jax.generate import generate
from rl import engine
from rl.sampler import SamplingParams, sample, sequence_logprobs

_RNG = np.random.default_rng(0)
# Ragged lengths that cross the lightning block (8) and the padding bucket (32): two buckets.
MIX = [[int(t) for t in _RNG.integers(1, CFG.vocab_size, size=n)] for n in (11, 3, 7, 1, 40, 33, 5, 5)]
LOGPROBS = jax.jit(sequence_logprobs, static_argnums=(0, 6))


@pytest.mark.slow
@pytest.mark.parametrize("slots", [1, 3, 8])
def test_greedy_tokens_equal_generate_for_every_slot_count(slots):
    want = generate(CFG, PARAMS, MIX, 12, greedy=True)
    stats = engine.Stats()
    r = sample(CFG, PARAMS, MIX, SamplingParams(12, greedy=True, slots=slots), jax.random.PRNGKey(0), stats=stats)
    np.testing.assert_array_equal(r.tokens, np.asarray(want.tokens))
    assert stats.prefills == len(MIX)  # all prompts differ: one prefill each
    assert stats.decodes >= -(-len(MIX) // slots)  # slots were refilled


@pytest.mark.slow
def test_groups_share_one_prefill_and_tokens_do_not_depend_on_the_slot_count():
    groups = [p for p in MIX[:3] for _ in range(4)]  # 3 prompts x G = 4
    sp = dict(max_new_tokens=13, temperature=0.8, stop_tokens=(3,))
    runs = {}
    for slots in (None, 5):  # every sample at once; or 5 slots: one group in flight, refilled twice
        stats = engine.Stats()
        r = sample(CFG, PARAMS, groups, SamplingParams(**sp, slots=slots), jax.random.PRNGKey(1), stats=stats)
        assert stats.prefills == 3, (slots, vars(stats))
        ours = LOGPROBS(CFG, PARAMS, r.prompt, r.prompt_lengths, r.tokens, r.mask, 0.8)[0]
        assert float(jnp.max(jnp.abs(ours - r.logprobs))) <= 1e-5  # fp32 log-probs of the drawn tokens
        assert r.logprobs.dtype == np.float32 and np.all(r.logprobs[r.mask == 0] == 0)
        runs[slots] = r
    np.testing.assert_array_equal(runs[None].tokens, runs[5].tokens)
    np.testing.assert_array_equal(runs[None].lengths, runs[5].lengths)
    assert len(set(map(tuple, runs[None].tokens[:4]))) > 1  # a group's samples differ from each other
    assert (runs[None].lengths < 13).any()  # some rows stopped early and freed their slots


def test_a_samples_tokens_depend_on_its_row_not_its_batch_mates():
    sp = SamplingParams(6, temperature=1.0, slots=2)
    a = sample(CFG, PARAMS, [MIX[0], MIX[1], MIX[2]], sp, jax.random.PRNGKey(4))
    b = sample(CFG, PARAMS, [MIX[0], MIX[1], MIX[6]], sp, jax.random.PRNGKey(4))
    np.testing.assert_array_equal(a.tokens[:2], b.tokens[:2])
    np.testing.assert_array_equal(a.logprobs[:2], b.logprobs[:2])


def test_key_ids_choose_each_rows_random_stream():
    """Row j with key id k draws what row k draws by default, in a group split over fewer slots."""
    group = [MIX[0]] * 4
    sp = SamplingParams(6, temperature=1.0, slots=2)  # the group of 4 is split over 2 slots
    plain = sample(CFG, PARAMS, group, sp, jax.random.PRNGKey(5))
    flipped = sample(CFG, PARAMS, group, sp, jax.random.PRNGKey(5), key_ids=[3, 2, 1, 0])
    np.testing.assert_array_equal(flipped.tokens, plain.tokens[::-1])
    assert len(set(map(tuple, plain.tokens))) > 1  # the streams differ, so the test can fail
    with pytest.raises(ValueError, match="3 key_ids for 4 prompts"):
        sample(CFG, PARAMS, group, sp, jax.random.PRNGKey(5), key_ids=[0, 1, 2])


def test_refills_and_new_mixes_do_not_recompile():
    # Programs are per shape class (rows, slots, length bucket, and a power-of-two count of prompts
    # prefilled together), not per refill: 3 calls of 8 rows in one bucket on 4 slots compile one
    # decode and at most 3 inserts (1, 2 or 4 prompts), whatever the number of refills.
    sp = SamplingParams(5, temperature=1.0, stop_tokens=(3, 4, 5), slots=4)
    short = [p for p in MIX if len(p) <= 32]  # 6 prompts, one bucket
    before, inserts = dict(engine.TRACES), 0
    for seed, mix in enumerate((short + short[:2], short[::-1] + short[:2], short[2:] + short[:4])):
        stats = engine.Stats()
        sample(CFG, PARAMS, mix, sp, jax.random.PRNGKey(seed), stats=stats)
        inserts += stats.inserts
    traced = {k: v - before.get(k, 0) for k, v in engine.TRACES.items()}
    assert traced["decode"] <= 1 and traced["insert"] <= 3, traced
    assert inserts > 6, inserts  # slots were refilled many times


def test_bad_slots_are_clear_errors():
    for bad in (0, -1):
        with pytest.raises(ValueError, match="slots must be >= 1"):
            SamplingParams(4, slots=bad)


@pytest.mark.slow
def test_rollout_benchmark_quick_mode(tmp_path, monkeypatch):
    # The benchmark's workload: both samplers emit the same tokens on its long-tailed mix.
    import json
    import sys

    from experiments.benchmarks import rollout

    out = tmp_path / "rollout.json"
    monkeypatch.setattr(sys, "argv", ["rollout", "--quick", "--out", str(out)])
    rollout.main()
    r = json.loads(out.read_text())
    assert r["tokens_identical"]
    assert 0.05 <= r["response_lengths"]["at_limit_fraction"] <= 0.2
    assert r["decode_row_steps"]["engine"] < r["decode_row_steps"]["fixed"]
    assert set(r["tokens_per_s"]) == {"engine", "fixed"} and r["ratio"] > 0
