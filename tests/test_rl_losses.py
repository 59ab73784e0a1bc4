"""RL objectives against independent formulas; advantages and zero-variance groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import advantages as adv_lib
from rl import losses

B, T = 6, 9


def batch(seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.01, 0.99, (B, T))).astype(np.float32)  # includes pi < 1/e
    old = (logp + rng.normal(0, spread, (B, T))).astype(np.float32)
    a = rng.normal(size=B).astype(np.float32)
    mask = (np.arange(T)[None, :] < rng.integers(1, T + 1, B)[:, None]).astype(np.float32)
    return jnp.asarray(logp), jnp.asarray(old), jnp.asarray(a), jnp.asarray(mask)


def test_cispo_loss_and_gradient_equal_the_formula():
    logp, old, a, mask = batch()
    lo, hi = 0.5, 2.0
    loss, m = losses.cispo(logp, old, a, mask, ratio_max=hi, ratio_min=lo)
    r = np.clip(np.exp(np.asarray(logp, np.float64) - np.asarray(old)), lo, hi)
    n = np.asarray(mask).sum()
    want = -np.sum(r * np.asarray(a)[:, None] * np.asarray(logp) * np.asarray(mask)) / n
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    # d/dlogp of -sg(w) A logp / N is -w A / N on every token, clipped or not.
    g = jax.grad(lambda lp: losses.cispo(lp, old, a, mask, ratio_max=hi, ratio_min=lo)[0])(logp)
    np.testing.assert_allclose(np.asarray(g), -r * np.asarray(a)[:, None] * np.asarray(mask) / n, rtol=1e-5, atol=1e-8)
    assert 0 < float(m["clip_fraction"]) < 1  # the test does exercise clipping


def test_cispo_without_stop_gradient_would_differ():
    """The published bug: differentiating through the weight changes the gradient (sign flips for pi < 1/e)."""
    logp, old, a, mask = batch(1, spread=0.1)

    def buggy(lp):
        w = jnp.clip(jnp.exp(lp - old), 0.0, 5.0)  # no stop_gradient
        return -jnp.sum(w * a[:, None] * lp * mask) / jnp.sum(mask)

    ours = jax.grad(lambda lp: losses.cispo(lp, old, a, mask, ratio_max=5.0)[0])(logp)
    bad = jax.grad(buggy)(logp)
    on = np.asarray(mask) > 0
    flipped = np.sign(np.asarray(ours)) != np.sign(np.asarray(bad))
    assert flipped[on & (np.asarray(logp) < -1)].all() and not flipped[on & (np.asarray(logp) > -0.9)].any()


def test_cispo_on_policy_is_reinforce():
    logp, _, a, mask = batch(2)
    g = jax.grad(lambda lp: losses.cispo(lp, jax.lax.stop_gradient(lp), a, mask, ratio_max=1.2)[0])(logp)
    want = -np.asarray(a)[:, None] * np.asarray(mask) / np.asarray(mask).sum()
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-6, atol=1e-9)


def test_clipped_tokens_keep_a_gradient_in_cispo_but_not_in_grpo():
    logp = jnp.log(jnp.full((1, 2), 0.5))
    old = jnp.log(jnp.array([[0.1, 0.5]]))  # token 0: ratio 5 > 1.2; token 1: ratio 1
    a, mask = jnp.ones((1,)), jnp.ones((1, 2))
    gc = jax.grad(lambda lp: losses.cispo(lp, old, a, mask, ratio_max=1.2)[0])(logp)
    gg = jax.grad(lambda lp: losses.grpo(lp, old, a, mask, aggregation="token_mean")[0])(logp)
    np.testing.assert_allclose(np.asarray(gc), [[-1.2 / 2, -1.0 / 2]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gg), [[0.0, -1.0 / 2]], atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cispo", "grpo", "dapo", "gspo"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_micro_batch_split_and_padding_invariance(name, aggregation):
    logp, old, a, mask = batch(3, spread=0.3)
    fn = losses.get(name)
    full = lambda lp: fn(lp, old, a, mask, aggregation=aggregation)[0]
    loss, grad = jax.value_and_grad(full)(logp)
    denom = jnp.sum(mask) if aggregation == "token_mean" else jnp.sum(jnp.sum(mask, -1) > 0)
    parts, grads = 0.0, []
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        f = lambda lp, r=rows: fn(lp, old[r], a[r], mask[r], aggregation=aggregation, denom=denom)[0]
        v, g = jax.value_and_grad(f)(logp[rows])
        parts, grads = parts + v, grads + [g]
    np.testing.assert_allclose(float(parts), float(loss), rtol=1e-5)
    np.testing.assert_allclose(np.concatenate(grads), np.asarray(grad), rtol=1e-5, atol=1e-9)
    # Padding: extra masked columns holding garbage (-inf / NaN log-probs) change nothing.
    pad = lambda x, v: jnp.concatenate([x, jnp.full((B, 4), v, x.dtype)], axis=1)
    lp2, old2, m2 = pad(logp, -jnp.inf), pad(old, jnp.nan), pad(mask, 0.0)
    v2, g2 = jax.value_and_grad(lambda lp: fn(lp, old2, a, m2, aggregation=aggregation)[0])(lp2)
    np.testing.assert_allclose(float(v2), float(loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g2)[:, :T], np.asarray(grad), rtol=1e-6, atol=1e-9)
    assert np.all(np.asarray(g2)[:, T:] == 0)


@pytest.mark.parametrize("name", ["cispo", "grpo", "dapo", "gspo"])
def test_all_masked_rows_and_zero_advantages_give_no_nan(name):
    logp, old, a, mask = batch(4)
    mask = mask.at[2].set(0.0)
    for m, adv in ((mask, a), (jnp.zeros_like(mask), a), (mask, jnp.zeros_like(a))):
        v, g = jax.value_and_grad(lambda lp, m=m, adv=adv: losses.get(name)(lp, old, adv, m, ref_logp=old)[0])(logp)
        assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g)))
        assert np.all(np.asarray(g)[2] == 0)


def test_eq7_mask_drops_tokens_only_when_asked():
    logp = jnp.log(jnp.full((2, 2), 0.5))
    old = jnp.log(jnp.array([[0.1, 0.5], [0.9, 0.5]]))  # ratios 5, 1 / 0.56, 1
    a, mask = jnp.array([1.0, -1.0]), jnp.ones((2, 2))
    g_off = jax.grad(lambda lp: losses.cispo(lp, old, a, mask, ratio_max=10.0)[0])(logp)
    g_on = jax.grad(
        lambda lp: losses.cispo(lp, old, a, mask, ratio_max=10.0, mask_ratio_max=1.5, mask_ratio_min=0.8)[0]
    )(logp)
    assert np.all(np.asarray(g_off) != 0)
    np.testing.assert_array_equal(np.asarray(g_on) == 0, [[True, False], [True, False]])


def test_gspo_uses_the_sequence_ratio():
    logp = jnp.log(jnp.array([[0.5, 0.5, 0.5]]))
    old = jnp.log(jnp.array([[0.25, 1.0, 0.5]]))  # token ratios 2, 0.5, 1 -> geometric mean 1
    _, m = losses.gspo(logp, old, jnp.ones(1), jnp.ones((1, 3)))
    np.testing.assert_allclose(float(m["ratio_mean"]), 1.0, rtol=1e-6)
    assert float(m["clip_fraction"]) == 0.0


def test_kl_is_k3_always_reported_and_added_only_with_a_coefficient():
    logp, old, a, mask = batch(5)
    ref = old
    l0, m0 = losses.cispo(logp, old, a, mask, ref_logp=ref)
    l1, m1 = losses.cispo(logp, old, a, mask, ref_logp=ref, kl_coef=0.5)
    d = np.asarray(ref, np.float64) - np.asarray(logp)
    k3 = np.sum((np.exp(d) - d - 1) * np.asarray(mask)) / np.asarray(mask).sum()
    np.testing.assert_allclose(float(m0["kl"]), k3, rtol=1e-5)
    np.testing.assert_allclose(float(l1) - float(l0), 0.5 * k3, rtol=1e-4)
    assert float(losses.k3_kl(logp, logp).max()) == 0.0


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="available: cispo, dapo, grpo, gspo"):
        losses.get("ppo2")
    with pytest.raises(ValueError, match="aggregation"):
        losses.cispo(*batch(), aggregation="mean")
    with pytest.raises(ValueError, match="estimator"):
        adv_lib.compute(np.zeros((2, 2)), estimator="rloo2")


def test_group_advantages_formula():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [0.2, 0.4, 0.6, 0.8]])
    out = adv_lib.compute(r, "group")
    for i in range(2):
        np.testing.assert_allclose(out.advantages[i], (r[i] - r[i].mean()) / (r[i].std(ddof=1) + 1e-6), rtol=1e-5)
    centred = r - r.mean(1, keepdims=True)
    np.testing.assert_allclose(adv_lib.compute(r, "group_no_std").advantages, centred, rtol=1e-6)
    np.testing.assert_allclose(
        adv_lib.compute(r, "group_batch_std").advantages, centred / (centred.std(ddof=1) + 1e-6), rtol=1e-5
    )
    # Solved groups (no spread) do not shrink the batch std.
    r3 = np.concatenate([r, np.ones((3, 4))])
    np.testing.assert_allclose(
        adv_lib.compute(r3, "group_batch_std").advantages[:2], centred / (centred.std(ddof=1) + 1e-6), rtol=1e-5
    )


@pytest.mark.parametrize("policy", ["drop", "keep"])
def test_zero_variance_groups_and_nan_rewards(policy):
    r = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, np.nan], [np.nan, np.nan, np.nan], [0.5, 0.5, 0.0]])
    out = adv_lib.compute(r, "group", zero_variance=policy)
    assert np.all(np.isfinite(out.advantages)) and np.all(np.isfinite(out.weight))
    np.testing.assert_array_equal(out.zero_variance, [True, False, True, False])
    np.testing.assert_array_equal(out.invalid.sum(1), [0, 1, 3, 0])
    assert np.all(out.advantages[out.zero_variance] == 0) and np.all(out.advantages[out.invalid] == 0)
    assert np.all(out.weight[out.invalid] == 0)
    assert np.all(out.weight[0] == (1.0 if policy == "keep" else 0.0))
    np.testing.assert_allclose(out.advantages[1, :2], [-0.7071, 0.7071], rtol=1e-3)
