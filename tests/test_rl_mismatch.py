"""Mismatch controls: TIS / MIS weights against their formulas, and how they enter the update."""

import jax.numpy as jnp
import numpy as np
import pytest

from rl import losses
from rl.mismatch import behaviour_weights

RNG = np.random.default_rng(0)
B, N = 6, 9
MASK = (np.arange(N)[None, :] < RNG.integers(1, N + 1, size=B)[:, None]).astype(np.float32)
SAMPLER = np.log(RNG.uniform(0.05, 1.0, size=(B, N))).astype(np.float32)
TRAINER = (SAMPLER + RNG.normal(0, 0.4, size=(B, N))).astype(np.float32)


def _reference(mode, level, upper, lower):
    """Per row, in probability space (short rows: no overflow): the formulas as written."""
    out = np.zeros((B, N))
    for i in range(B):
        n = int(MASK[i].sum())
        ratios = np.exp(TRAINER[i, :n].astype(np.float64) - SAMPLER[i, :n])  # pi_old / pi_sampler
        if level == "token":
            w = ratios
        elif level == "sequence":
            w = np.full(n, np.prod(ratios))
        else:
            w = np.full(n, np.prod(ratios) ** (1.0 / n))
        out[i, :n] = np.minimum(w, upper) if mode == "tis" else ((w >= lower) & (w <= upper)).astype(float)
    return out


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_weights_equal_the_formulas(mode, level):
    upper, lower = (2.0, 0.5) if level != "geometric" else (1.05, 0.95)
    c, m = behaviour_weights(TRAINER, SAMPLER, MASK, mode, level, upper, lower)
    np.testing.assert_allclose(c, _reference(mode, level, upper, lower), rtol=1e-5, atol=1e-6)
    assert np.all(c[MASK == 0] == 0)
    if mode == "mis":
        assert m["is_masked_fraction"] == pytest.approx(np.sum((c == 0) & (MASK > 0)) / MASK.sum())
    else:
        assert 0 < m["is_truncated_fraction"] < 1 and m["is_weight_max"] <= upper + 1e-6


def test_no_mismatch_gives_weight_one_and_the_same_loss_bitwise():
    c, m = behaviour_weights(SAMPLER, SAMPLER, MASK, "tis", "sequence", 2.0, 0.5)
    assert np.all(c[MASK > 0] == 1.0) and m["logp_gap_corrected"] == 0.0
    logp, adv = jnp.asarray(TRAINER), jnp.asarray(RNG.normal(size=B), jnp.float32)
    plain = losses.get("cispo")(logp, jnp.asarray(SAMPLER), adv, jnp.asarray(MASK))[0]
    weighted = losses.get("cispo")(logp, jnp.asarray(SAMPLER), adv[:, None] * jnp.asarray(c), jnp.asarray(MASK))[0]
    assert float(plain) == float(weighted)


@pytest.mark.parametrize("name", ["cispo", "grpo", "dapo", "gspo"])
def test_masked_tokens_stay_in_the_denominator(name):
    c, _ = behaviour_weights(TRAINER, SAMPLER, MASK, "mis", "token", 1.3, 0.8)
    kept = MASK * (c > 0)
    assert 0 < kept.sum() < MASK.sum()
    logp, adv = jnp.asarray(TRAINER + 0.1), jnp.asarray(RNG.normal(size=B), jnp.float32)
    fn = losses.get(name)
    ours = fn(logp, jnp.asarray(SAMPLER), adv[:, None] * jnp.asarray(c), jnp.asarray(MASK))[0]
    assert np.isfinite(float(ours))
    if losses.knobs(name).aggregation != "token_mean" or name == "gspo":
        return  # (per-sequence means and gspo's sequence ratio depend on which tokens are in the mask)
    # The same per-token losses, kept tokens only, over the full denominator of the response mask.
    full = fn(logp, jnp.asarray(SAMPLER), adv, jnp.asarray(kept), denom=MASK.sum())[0]
    np.testing.assert_allclose(float(ours), float(full), rtol=1e-6)


def test_long_sequences_do_not_overflow():
    n = 10_000
    sampler = np.full((2, n), -3.0, np.float32)
    trainer = sampler + np.float32(0.2)  # sum of d = 2000: exp would overflow
    mask = np.ones((2, n), np.float32)
    for mode in ("tis", "mis"):
        c, m = behaviour_weights(trainer, sampler, mask, mode, "sequence", 2.0, 0.5)
        assert np.all(np.isfinite(c)) and all(np.isfinite(v) for v in m.values())
    assert np.all(behaviour_weights(trainer, sampler, mask, "tis", "sequence", 2.0, 0.5)[0] == np.float32(2.0))


def test_unknown_mode_and_level_are_errors():
    with pytest.raises(ValueError, match="mode"):
        behaviour_weights(TRAINER, SAMPLER, MASK, "clip", "token", 2.0, 0.5)
    with pytest.raises(ValueError, match="level"):
        behaviour_weights(TRAINER, SAMPLER, MASK, "tis", "word", 2.0, 0.5)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"rl.mismatch.mode": "clip"}, "rl.mismatch.mode"),
        ({"rl.mismatch.level": "word"}, "rl.mismatch.level"),
        ({"rl.mismatch.upper": 1.0}, "rl.mismatch.upper"),
        ({"rl.mismatch.lower": 1.5}, "rl.mismatch.lower"),
        ({"rl.mismatch.mode": "tis", "rl.old_logp": "sampler"}, "rl.mismatch.mode.*already is pi_theta / pi_sampler"),
        ({"rl.mismatch.mode": "mis", "rl.sampling.top_p": 0.9}, "rl.mismatch.mode.*untruncated"),
        ({"rl.sampling.slots": 0}, "rl.sampling.slots"),
        ({"rl.sampling.slots": 4}, r"rl.sampling.slots=4: must be >= samples_per_prompt=8"),
    ],
)
def test_config_errors_name_the_field(overrides, match):
    from rl.config import base_config, validate

    c = base_config()
    c.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError, match=match):
        validate(c)


@pytest.mark.slow
def test_an_injected_sampler_mismatch_is_masked_and_reported(tmp_path, monkeypatch):
    # A sampler whose recorded log-probs are off by +1 nat on a third of the tokens (as a bf16 or
    # router-flipping sampler would be): MIS masks those tokens, and the run reports both gaps.
    from test_rl_train import rows, small_toy

    from rl import loop

    real = loop.sample

    def skewed(*args, **kw):
        r = real(*args, **kw)
        noise = np.where(np.arange(r.logprobs.size).reshape(r.logprobs.shape) % 3 == 0, 1.0, 0.0)
        return r._replace(logprobs=(r.logprobs + noise * r.mask).astype(np.float32))

    monkeypatch.setattr(loop, "sample", skewed)
    c = small_toy({"steps": 2, "rl.mismatch.mode": "mis", "rl.mismatch.level": "token", "eval.every": 100})
    loop.train(c, str(tmp_path), progress=False)
    for r in rows(tmp_path, "loss"):
        assert 0.2 < r["is_masked_fraction"] < 0.5, r
        assert r["logp_gap"] > 0.1 and r["logp_gap_corrected"] < 1e-4  # the kept tokens agree
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0


@pytest.mark.slow
def test_diagnostic_trainer_logprobs_cover_sample_0_of_each_group(tmp_path, monkeypatch):
    # With the sampler's log-probs in the ratio and no correction, the trainer's forward only feeds
    # logp_gap (and the KL), so it runs on sample 0 of each group. Skew exactly those rows by 1 nat:
    # the gap reads ~1 (over all rows it would read ~1/G).
    from test_rl_train import rows, small_toy

    from rl import loop

    real = loop.sample

    def skewed(*args, **kw):
        r = real(*args, **kw)
        g = c.rl.samples_per_prompt
        first = (np.arange(r.logprobs.shape[0]) % g == 0)[:, None]
        return r._replace(logprobs=(r.logprobs + first * r.mask).astype(np.float32))

    monkeypatch.setattr(loop, "sample", skewed)
    c = small_toy({"steps": 2, "rl.old_logp": "sampler", "eval.every": 100})
    assert loop.diagnostic_logprobs(c) and c.rl.samples_per_prompt > 1
    loop.train(c, str(tmp_path), progress=False)
    got = rows(tmp_path, "loss")
    for r in got:
        assert 0.999 < r["logp_gap"] < 1.001 and r["logp_gap_max"] < 1.001, r
        assert np.isfinite(r["loss"])
    assert got[0]["kl"] < 1e-3  # the subset's rows line up with the reference's (step 0: the same policy)


def test_lower_bound_zero_means_none_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c, _ = behaviour_weights(TRAINER - 5.0, SAMPLER, MASK, "mis", "token", 2.0, 0.0)
    assert np.all(c[MASK > 0] == 1.0)  # far below: kept, no lower bound
