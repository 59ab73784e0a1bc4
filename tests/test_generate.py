"""Decoding: prefill + decode steps against the full forward; ragged prompts; sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import CFG, PARAMS, apply

from conftest import rel_err
from m1jax.generate import decode_step, generate, left_pad, prefill, sample_logits

PREFILL = jax.jit(prefill, static_argnums=(0, 3))
DECODE = jax.jit(decode_step, static_argnums=0)


@pytest.mark.slow
@pytest.mark.parametrize("n", [5, 7, 8, 9, 19])  # block size 8: N and N+T straddle block boundaries
def test_prefill_then_decode_equals_full_forward(n):
    steps = 11
    tokens = jax.random.randint(jax.random.PRNGKey(n), (2, n + steps), 0, CFG.vocab_size)
    full, _ = apply(tokens)
    logits, cache = PREFILL(CFG, PARAMS, tokens[:, :n], n + steps)
    outs = [logits]
    for i in range(n, n + steps):
        step_logits, cache = DECODE(CFG, PARAMS, cache, tokens[:, i : i + 1])
        outs.append(step_logits)
    assert rel_err(jnp.concatenate(outs, axis=1), full) <= 1e-4
    state = cache["groups"][0]["state"]  # run 0 = the 3 lightning layers: constant size, fp32
    assert state.shape == (1, 3, 2, CFG.num_attention_heads, CFG.head_dim, CFG.head_dim)
    assert state.dtype == jnp.float32
    kv = cache["groups"][1]["k"]  # the softmax layer's fixed-size KV cache
    assert kv.shape == (1, 1, 2, n + steps, CFG.num_key_value_heads, CFG.head_dim)


@pytest.mark.slow
def test_prompts_of_different_lengths_in_one_batch():
    rows = [[5, 9, 2, 7, 1, 3, 8, 8, 4, 6, 2, 9, 11], [3, 1, 4], [2, 7, 1, 8, 2, 8, 1, 8, 2]]
    tokens, lengths = left_pad(rows)
    nxt = jnp.array([[13], [17], [19]])
    logits, cache = PREFILL(CFG, PARAMS, jnp.asarray(tokens), tokens.shape[1] + 1, lengths=lengths)
    step, _ = DECODE(CFG, PARAMS, cache, nxt)
    for i, row in enumerate(rows):
        alone, _ = apply(jnp.asarray([row + [int(nxt[i, 0])]]))
        assert rel_err(logits[i, -len(row) :], alone[0, :-1]) <= 1e-4
        assert rel_err(step[i, 0], alone[0, -1]) <= 1e-4


@pytest.mark.slow
def test_greedy_generate_matches_argmax_of_full_forward():
    """By causality one forward of the final sequence gives every step's logits."""
    rows = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    out = generate(CFG, PARAMS, rows, 6, greedy=True)
    for i, row in enumerate(rows):
        new = [int(x) for x in out.tokens[i]]
        logits, _ = apply(jnp.asarray([row + new]))
        step_logits = logits[0, len(row) - 1 : -1]  # [6, V]: the logits each new token was chosen from
        assert new == [int(x) for x in jnp.argmax(step_logits, -1)]
        ref_logp = jax.nn.log_softmax(step_logits, -1)[np.arange(6), new]
        np.testing.assert_allclose(out.logprobs[i], ref_logp, rtol=1e-4, atol=1e-5)
    assert list(np.asarray(out.lengths)) == [6, 6]


@pytest.mark.slow
def test_stop_tokens_end_a_row():
    rows = [[1, 2, 3], [4, 5, 6]]
    free = generate(CFG, PARAMS, rows, 5, greedy=True)
    stop = int(free.tokens[0, 1])
    out = generate(CFG, PARAMS, rows, 5, greedy=True, stop_tokens=[stop], pad_id=0)
    first = list(np.asarray(free.tokens[0])).index(stop)
    assert int(out.lengths[0]) == first + 1
    assert np.all(np.asarray(out.tokens[0, first + 1 :]) == 0)
    assert np.all(np.asarray(out.logprobs[0, first + 1 :]) == 0.0)


def test_top_p_samples_only_from_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    toks = sample_logits(jax.random.PRNGKey(0), logits, top_p=0.7)
    counts = np.bincount(np.asarray(toks), minlength=4) / 4000
    assert counts[2] == 0 and counts[3] == 0  # 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}
    np.testing.assert_allclose(counts[:2], [0.625, 0.375], atol=0.03)
    hot = sample_logits(jax.random.PRNGKey(1), logits, temperature=1e-3)
    assert np.all(np.asarray(hot) == 0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="vocab_size"):
        generate(CFG, PARAMS, [[1, CFG.vocab_size + 5]], 2)
    with pytest.raises(ValueError, match="max_len"):
        prefill(CFG, PARAMS, jnp.zeros((1, 9), jnp.int32), 4)
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1, 2], []])
