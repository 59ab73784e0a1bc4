"""flash_attention against the blocked reference (reference.causal_attention): values and VJP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.kernels.lightning import run_ids
from m1jax.kernels.softmax import causal_attention, flash_attention


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1.0)  # floor: dq is exactly 0 at T=1


def inputs(t, h, g, d=16, b=2, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, t, h, d)) * 2.0  # sharp softmax: exercises the running max
    k = jax.random.normal(ks[1], (b, t, g, d))
    v = jax.random.normal(ks[2], (b, t, g, d))
    return q, k, v


def packed_runs(b, t, seed):
    """Documents of random lengths (some shorter than a block, some spanning several)."""
    rng = np.random.default_rng(seed)
    ids = np.cumsum(rng.random((b, t)) < 0.03, axis=1) + 1
    return run_ids(jnp.asarray(ids, jnp.int32))


@pytest.mark.slow
@pytest.mark.parametrize(
    "t,h,g,block", [(1, 2, 1, 16), (15, 4, 2, 16), (16, 4, 4, 16), (17, 4, 1, 16), (100, 4, 2, 32), (96, 2, 2, 8)]
)
@pytest.mark.parametrize("packed", [False, True])
def test_matches_reference_values_and_grads(t, h, g, block, packed):
    q, k, v = inputs(t, h, g)
    runs = packed_runs(2, t, seed=t) if packed else None
    ref = lambda q, k, v: causal_attention(q, k, v, runs)
    new = lambda q, k, v: flash_attention(q, k, v, runs, block=block)
    assert rel(new(q, k, v), ref(q, k, v)) <= 1e-5
    cot = jax.random.normal(jax.random.PRNGKey(9), q.shape)
    _, vjp_ref = jax.vjp(ref, q, k, v)
    _, vjp_new = jax.vjp(new, q, k, v)
    for a, b_ in zip(vjp_new(cot), vjp_ref(cot), strict=True):
        assert rel(a, b_) <= 1e-5


def test_jit_and_bf16():
    q, k, v = inputs(70, 4, 2)
    ref = causal_attention(q, k, v)
    lo = jax.jit(lambda q, k, v: flash_attention(q, k, v, block=32))(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert lo.dtype == jnp.bfloat16
    assert rel(lo, ref) <= 2e-2


def test_documents_do_not_see_each_other():
    q, k, v = inputs(40, 2, 1, b=1)
    runs = jnp.asarray([[0] * 25 + [1] * 15])
    out = flash_attention(q, k, v, runs, block=16)
    # The second document alone gives the same outputs: nothing leaked from the first.
    alone = flash_attention(q[:, 25:], k[:, 25:], v[:, 25:], block=16)
    assert rel(out[:, 25:], alone) <= 1e-6
