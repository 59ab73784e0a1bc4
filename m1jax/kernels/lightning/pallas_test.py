"""Both Pallas kernels in interpret mode against the token recurrence: values and gradients.

Tolerances (relative RMS against the fp32 recurrence on the same inputs): fp32 <= 1e-5, bf16 <= 1e-2.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from m1jax.kernels import lightning_attention, resolve_lightning_impl
from m1jax.kernels.lightning import pallas_triton

C = 16
SLOPES = jnp.array([0.92, 0.083, 1e-3, 5e-5])  # decays 0.40, 0.92, 0.999, 0.99995
IMPLS = ("pallas_tpu", "pallas_triton")


def rel_rms(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def inputs(t, seed=0, b=2, dk=8, dv=16, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k = (jax.random.normal(x, (b, t, 4, dk)).astype(dtype) for x in ks[:2])
    v = jax.random.normal(ks[2], (b, t, 4, dv)).astype(dtype)
    h0 = jax.random.normal(ks[3], (b, 4, dk, dv))
    seg = jnp.cumsum(jax.random.bernoulli(ks[4], 0.08, (b, t)), axis=1) + 5  # ids need not start at 0
    return q, k, v, h0, seg


def run(impl, q, k, v, h0=None, seg=None, **kw):
    return lightning_attention(
        q, k, v, SLOPES, initial_state=h0, segment_ids=seg, impl=impl, block_size=C, interpret=True, **kw
    )


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t", [1, C - 1, C, C + 1, 3 * C + 5, 6 * C])
@pytest.mark.parametrize("extras", ["none", "h0+segments"])
def test_forward_fp32_matches_recurrence(impl, t, extras):
    q, k, v, h0, seg = inputs(t, seed=t)
    kw = dict(h0=h0, seg=seg) if extras != "none" else {}
    out, state = run(impl, q, k, v, **kw)
    ref_out, ref_state = run("recurrent", q, k, v, **kw)
    assert out.shape == ref_out.shape and out.dtype == q.dtype
    assert state.shape == (2, 4, 8, 16) and state.dtype == jnp.float32
    assert rel_rms(out, ref_out) <= 1e-5
    assert rel_rms(state, ref_state) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_bf16_within_1e2(impl):
    t = 4 * C + 3
    q, k, v, h0, seg = inputs(t, seed=1, dtype=jnp.bfloat16)
    out, state = run(impl, q, k, v, h0=h0, seg=seg)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_out, ref_state = run("recurrent", *f32, h0=h0, seg=seg)
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    assert rel_rms(out, ref_out) <= 1e-2
    assert rel_rms(state, ref_state) <= 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("spans", [1, 2, 3])
def test_gpu_spans_do_not_change_the_result(spans):
    """Several blocks per span, several spans, a document crossing span borders, ragged end."""
    t = 7 * C + 3
    q, k, v, h0, seg = inputs(t, seed=2)
    seg = seg.at[:, : 3 * C + 2].set(0)  # first document spans 3+ blocks
    hm = lambda x: jnp.swapaxes(x, 1, 2)
    from m1jax.kernels.lightning import run_ids

    out, state = pallas_triton.forward(
        hm(q), hm(k), hm(v), SLOPES, h0, run_ids(seg), block_size=C, spans=spans, interpret=True
    )
    ref_out, ref_state = run("recurrent", q, k, v, h0=h0, seg=seg)
    assert rel_rms(hm(out), ref_out) <= 1e-5 and rel_rms(state, ref_state) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t,extras", [(C + 1, "h0"), (3 * C + 5, "h0+segments"), (4 * C, "none")])
def test_gradients_match_autodiff_of_recurrence(impl, t, extras):
    q, k, v, h0, seg = inputs(t, seed=7 + t)
    seg = seg if "segments" in extras else None
    w_o = jax.random.normal(jax.random.PRNGKey(1), (2, t, 4, 16))
    w_s = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 8, 16))

    def grads(impl):
        def f(q, k, v, h0):
            o, s = run(impl, q, k, v, h0=h0 if "h0" in extras else None, seg=seg)
            return jnp.sum(o * w_o) + jnp.sum(s * w_s)

        return jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, h0)

    got, want = grads(impl), grads("recurrent")
    names = ("dq", "dk", "dv", "dh0") if "h0" in extras else ("dq", "dk", "dv")
    for name, g, r in zip(names, got, want, strict=False):
        assert rel_rms(g, r) <= 1e-5, name


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_bf16(impl):
    t = 3 * C + 5
    q, k, v, h0, seg = inputs(t, seed=3, dtype=jnp.bfloat16)
    w = jax.random.normal(jax.random.PRNGKey(4), (2, t, 4, 16))

    def grads(impl, dtype):
        def f(q, k, v, h0):
            o, s = run(impl, q, k, v, h0=h0, seg=seg)
            return jnp.sum(o.astype(jnp.float32) * w) + jnp.sum(s)

        return jax.grad(f, argnums=(0, 1, 2, 3))(*(x.astype(dtype) for x in (q, k, v)), h0)

    for g, r in zip(grads(impl, jnp.bfloat16), grads("recurrent", jnp.float32), strict=True):
        assert g.dtype in (jnp.bfloat16, jnp.float32)
        assert rel_rms(g, r) <= 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_kernels_under_jit_with_dk_not_dv(impl):
    """Jitted end to end (the model calls it inside a scan over layers), Dk != Dv."""
    q, k, v, h0, seg = inputs(2 * C + 1, seed=4, b=3, dk=16, dv=8)

    @functools.partial(jax.jit, static_argnums=0)
    def f(impl, q, k, v, h0, seg):
        return run(impl, q, k, v, h0=h0, seg=seg)

    h0 = jnp.zeros((3, 4, 16, 8))
    out, state = f(impl, q, k, v, h0, seg)
    ref_out, ref_state = f("recurrent", q, k, v, h0, seg)
    assert rel_rms(out, ref_out) <= 1e-5 and rel_rms(state, ref_state) <= 1e-5


def _kernel_dots(jaxpr, inside=False):
    """Precision of each dot_general inside a Pallas kernel body, at any depth."""
    found = []
    for eqn in jaxpr.eqns:
        if inside and eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    found += _kernel_dots(sub, inside or eqn.primitive.name == "pallas_call")
    return found


def _loss_and_grads(impl, q, k, v, h0, seg, w):
    def f(q, k, v, h0):
        o, s = run(impl, q, k, v, h0=h0, seg=seg)
        return jnp.sum(o.astype(jnp.float32) * w) + jnp.sum(s), (o, s)

    return jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, h0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_dots_ignore_the_global_matmul_precision(impl, dtype):
    """Under a global "highest" each dot in the kernels (forward and backward calls) keeps the
    precision its operands take: DEFAULT for 16-bit (Mosaic TPU rejects more), HIGHEST for fp32."""
    t = C + 3
    q, k, v, h0, seg = inputs(t, dtype=dtype)
    w = jnp.ones((2, t, 4, 16))
    with jax.default_matmul_precision("highest"):
        jaxpr = jax.make_jaxpr(functools.partial(_loss_and_grads, impl))(q, k, v, h0, seg, w).jaxpr
    want = lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT
    dots = _kernel_dots(jaxpr)
    assert dots and set(dots) == {(want, want)}


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_forward_under_global_highest_matches_recurrence(impl):
    """Forward only: the backward calls the same forward, and the test above covers their dots."""
    q, k, v, h0, seg = inputs(2 * C + 3, seed=5, dtype=jnp.bfloat16)
    with jax.default_matmul_precision("highest"):
        out, state = run(impl, q, k, v, h0=h0, seg=seg)
        ref_out, ref_state = run("recurrent", *(x.astype(jnp.float32) for x in (q, k, v)), h0=h0, seg=seg)
    assert rel_rms(out, ref_out) <= 1e-2 and rel_rms(state, ref_state) <= 1e-2


def test_auto_resolves_by_platform_and_length():
    assert resolve_lightning_impl("auto", 4096, "tpu", devices=1) == "pallas_tpu"
    # Several TPU devices and no `jax.set_mesh`: Mosaic cannot be partitioned, so the reference.
    assert resolve_lightning_impl("auto", 4096, "tpu", devices=8) == "reference"
    assert resolve_lightning_impl("auto", 4096, "gpu") == "pallas_gpu"
    assert resolve_lightning_impl("auto", 4096, "cpu") == "reference"
    assert resolve_lightning_impl("auto", 16, "tpu") == "reference"  # too short for a kernel
    assert resolve_lightning_impl("pallas_tpu", 16, "cpu") == "pallas_tpu"  # explicit choice wins
