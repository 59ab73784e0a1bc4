"""The RL sampler: log-probs equal the trainer's recomputation, stop rules, logit processing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import CFG, PARAMS

from m1jax.generate import process_logits
from rl.sampler import FINISH_CONFIDENT, FINISH_LENGTH, FINISH_STOP, SamplingParams, sample, sequence_logprobs

PROMPTS = [[5, 9, 2, 7, 1, 3, 8, 8, 4, 6, 2], [3, 1, 4], [2, 7, 1, 8, 2, 8, 1], [9]]
LOGPROBS = jax.jit(sequence_logprobs, static_argnums=(0, 6))


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_trainer_recomputation(temperature):
    sp = SamplingParams(max_new_tokens=13, temperature=temperature, stop_tokens=(3,))
    r = sample(CFG, PARAMS, PROMPTS, sp, jax.random.PRNGKey(1))
    ours, _, _ = LOGPROBS(CFG, PARAMS, r.prompt, r.prompt_lengths, r.tokens, r.mask, temperature)
    assert float(jnp.max(jnp.abs(ours - r.logprobs))) <= 1e-5
    assert float(jnp.sum(r.mask)) > len(PROMPTS)  # something was generated
    assert np.all(np.asarray(r.logprobs)[np.asarray(r.mask) == 0] == 0)


@pytest.mark.slow
def test_stop_tokens_end_rows_and_are_kept():
    # Make token 3 the stop token: every row ends at its first 3, which stays in the response.
    sp = SamplingParams(max_new_tokens=20, stop_tokens=(3,), pad_id=0)
    r = sample(CFG, PARAMS, PROMPTS, sp, jax.random.PRNGKey(2))
    toks, mask = np.asarray(r.tokens), np.asarray(r.mask)
    for row, m, n, fin in zip(toks, mask, np.asarray(r.lengths), np.asarray(r.finish), strict=True):
        assert m.sum() == n and np.all(m[:n] == 1) and np.all(row[n:] == 0)
        if fin == FINISH_STOP:
            assert row[n - 1] == 3 and 3 not in row[: n - 1]
        else:
            assert fin == FINISH_LENGTH and n == 20 and 3 not in row


@pytest.mark.slow
def test_confident_run_stops_early():
    # A 1000x LM head makes the model's top token ~certain: a run of 4 stops every row.
    sharp = {**PARAMS, "lm_head": PARAMS["lm_head"] * 1000.0}
    sp = SamplingParams(max_new_tokens=12, confident_run=4, confident_prob=0.99)
    r = sample(CFG, sharp, PROMPTS, sp, jax.random.PRNGKey(0))
    assert np.all(np.asarray(r.finish) == FINISH_CONFIDENT)
    probs, lengths = np.exp(np.asarray(r.logprobs)), np.asarray(r.lengths)
    for p, n in zip(probs, lengths, strict=True):  # the row ends with its first run of 4 confident tokens
        run = np.convolve(p[:n] > 0.99, np.ones(4), "valid")
        assert 4 <= n < 12 and run[-1] == 4 and np.all(run[:-1] < 4)
    # The rule reads the model's probability, not the truncated distribution's: top_k=1 makes every
    # sampled token certain, yet at temperature 1 this random model's tokens are far from p > 0.99.
    sp = SamplingParams(max_new_tokens=12, top_k=1, confident_run=4, confident_prob=0.99)
    r = sample(CFG, PARAMS, PROMPTS, sp, jax.random.PRNGKey(0))
    assert np.all(np.asarray(r.logprobs) == 0.0)
    assert np.all(np.asarray(r.lengths) == 12) and np.all(np.asarray(r.finish) == FINISH_LENGTH)


@pytest.mark.slow
def test_top_k_and_top_p_restrict_the_support_and_logprobs_are_of_that_distribution():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    k2 = jax.nn.softmax(process_logits(logits, top_k=2))
    np.testing.assert_allclose(np.asarray(k2), [[0.625, 0.375, 0, 0]], rtol=1e-6)
    p = jax.nn.softmax(process_logits(logits, top_p=0.9))  # 0.5 + 0.3 < 0.9 <= 0.95
    np.testing.assert_allclose(np.asarray(p), [[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]], rtol=1e-6)
    sp = SamplingParams(max_new_tokens=6, top_k=3)
    r = sample(CFG, PARAMS, PROMPTS, sp, jax.random.PRNGKey(3))
    full, _, _ = LOGPROBS(CFG, PARAMS, r.prompt, r.prompt_lengths, r.tokens, r.mask, 1.0)
    # Truncation renormalises: each sampled token is at least as likely as under the full softmax.
    assert bool(jnp.all(r.logprobs >= full - 1e-6))


def test_sampling_is_reproducible_and_seed_dependent():
    sp = SamplingParams(max_new_tokens=8)
    a = sample(CFG, PARAMS, PROMPTS, sp, jax.random.PRNGKey(5))
    b = sample(CFG, PARAMS, PROMPTS, sp, jax.random.PRNGKey(5))
    c = sample(CFG, PARAMS, PROMPTS, sp, jax.random.PRNGKey(6))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_bad_sampling_params_are_clear_errors():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(max_new_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        sample(CFG, PARAMS, [[CFG.vocab_size]], SamplingParams(max_new_tokens=2), jax.random.PRNGKey(0))
