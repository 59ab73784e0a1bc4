"""The chunked lightning core against the token recurrence (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.kernels import lightning_attention
from m1jax.kernels.lightning import decode_step, run_ids

C = 16  # block size under test
SLOPES = jnp.array([0.92, 0.083, 1e-3, 5e-5])  # decays exp(-s): 0.40 ... 0.99995


def rel_rms(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def inputs(t, seed=0, b=2, dk=8, dv=12):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, t, 4, dk))
    k = jax.random.normal(ks[1], (b, t, 4, dk))
    v = jax.random.normal(ks[2], (b, t, 4, dv))
    h0 = jax.random.normal(ks[3], (b, 4, dk, dv))
    return q, k, v, h0


def segments(t, seed=0, b=2):
    starts = jax.random.bernoulli(jax.random.PRNGKey(seed + 100), 0.12, (b, t))
    return jnp.cumsum(starts, axis=1) + 1


@pytest.mark.slow
@pytest.mark.parametrize("t", [1, C - 1, C, C + 1, 2 * C + 7, 5 * C, 83])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("with_seg", [False, True])
def test_chunked_equals_recurrence(t, with_h0, with_seg):
    q, k, v, h0 = inputs(t, seed=t)
    kw = dict(initial_state=h0 if with_h0 else None, segment_ids=segments(t, t) if with_seg else None)
    out, state = lightning_attention(q, k, v, SLOPES, block_size=C, **kw)
    ref_out, ref_state = lightning_attention(q, k, v, SLOPES, impl="recurrent", **kw)
    assert out.shape == (2, t, 4, 12) and state.shape == (2, 4, 8, 12) and state.dtype == jnp.float32
    assert rel_rms(out, ref_out) <= 1e-5
    assert rel_rms(state, ref_state) <= 1e-5


@pytest.mark.slow
def test_chunked_matches_explicit_sum():
    """The recurrence itself against o_t = sum_{s<=t} lambda^(t-s) (q_t . k_s) v_s in float64."""
    q, k, v, _ = inputs(20, seed=3, b=1)
    out, _ = lightning_attention(q, k, v, SLOPES, block_size=8)
    qn, kn, vn = (np.asarray(x, np.float64)[0] for x in (q, k, v))
    lam = np.exp(-np.asarray(SLOPES, np.float64))
    t = np.arange(20)
    w = np.where(t[:, None] >= t[None, :], lam[:, None, None] ** (t[:, None] - t[None, :]).clip(0), 0.0)  # [H,T,S]
    ref = np.einsum("hts,thd,shd,she->the", w, qn, kn, vn)
    assert rel_rms(out[0], ref) <= 1e-5


@pytest.mark.slow
def test_documents_are_independent():
    q, k, v, _ = inputs(40, seed=5, b=1)
    seg = jnp.concatenate([jnp.full((1, 17), 3), jnp.full((1, 23), 7)], axis=1)
    out, state = lightning_attention(q, k, v, SLOPES, segment_ids=seg, block_size=C)
    a, _ = lightning_attention(q[:, :17], k[:, :17], v[:, :17], SLOPES, block_size=C)
    b, b_state = lightning_attention(q[:, 17:], k[:, 17:], v[:, 17:], SLOPES, block_size=C)
    assert rel_rms(out[:, :17], a) <= 1e-6 and rel_rms(out[:, 17:], b) <= 1e-6
    assert rel_rms(state, b_state) <= 1e-6


def test_run_ids_treat_repeated_ids_as_new_documents():
    np.testing.assert_array_equal(run_ids(jnp.array([[1, 1, 2, 2, 1, 0]])), [[0, 0, 1, 1, 2, 3]])


def test_decode_steps_continue_a_prefix():
    q, k, v, _ = inputs(37, seed=9)
    full, _ = lightning_attention(q, k, v, SLOPES, block_size=C)
    out, state = lightning_attention(q[:, :30], k[:, :30], v[:, :30], SLOPES, block_size=C)
    steps = []
    for i in range(30, 37):
        o, state = decode_step(q[:, i], k[:, i], v[:, i], SLOPES, state)
        steps.append(o)
    assert rel_rms(jnp.stack(steps, 1), full[:, 30:]) <= 1e-5


@pytest.mark.parametrize("with_seg", [False, True])
def test_gradients_match_autodiff_of_recurrence(with_seg):
    t = 2 * C + 5
    q, k, v, h0 = inputs(t, seed=11)
    seg = segments(t, 11) if with_seg else None
    w = jax.random.normal(jax.random.PRNGKey(1), (2, t, 4, 12))
    w_s = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 8, 12))

    def loss(impl):
        def f(q, k, v, h0):
            o, s = lightning_attention(q, k, v, SLOPES, initial_state=h0, segment_ids=seg, impl=impl, block_size=C)
            return jnp.sum(o * w) + jnp.sum(s * w_s)

        return jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, h0)

    for g, r in zip(loss("reference"), loss("recurrent"), strict=True):
        assert rel_rms(g, r) <= 1e-5


def test_unknown_impl_is_an_error():
    q, k, v, _ = inputs(4)
    with pytest.raises(ValueError, match="impl"):
        lightning_attention(q, k, v, SLOPES, impl="nope")


@pytest.mark.slow
@pytest.mark.parametrize("t", [33, 40])  # with and without a remainder after the last full span
def test_outer_spans_equal_recurrence(t):
    """Long sequences run as a scan over spans; documents may start exactly at a span border."""
    from m1jax.kernels.lightning import lightning_chunked

    q, k, v, h0 = inputs(t, seed=13)
    seg = jnp.asarray(np.repeat([[0, 1, 2, 3, 4]], 2, 0).repeat([8, 8, 5, 11, t - 32], axis=1))
    w = jax.random.normal(jax.random.PRNGKey(3), (2, t, 4, 12))

    def f(impl_fn):
        def loss(q, k, v, h0):
            o, s = impl_fn(q, k, v, h0)
            return jnp.sum(o * w) + jnp.sum(s), (o, s)

        return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, h0)

    spans = lambda q, k, v, h0: lightning_chunked(
        q, k, v, SLOPES, initial_state=h0, segment_ids=seg, block_size=4, span=8
    )
    rec = lambda q, k, v, h0: lightning_attention(q, k, v, SLOPES, initial_state=h0, segment_ids=seg, impl="recurrent")
    (g, (o, s)), (g_ref, (o_ref, s_ref)) = f(spans), f(rec)
    assert rel_rms(o, o_ref) <= 1e-5 and rel_rms(s, s_ref) <= 1e-5
    for a, b in zip(g, g_ref, strict=True):
        assert rel_rms(a, b) <= 1e-5
