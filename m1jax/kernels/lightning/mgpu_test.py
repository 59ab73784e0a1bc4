"""The Mosaic GPU (Hopper) kernel in interpret mode against the token recurrence, with the race detector.

Mosaic GPU's interpreter simulates the warpgroup, SMEM, TMA copies and barriers on CPU, and its
happens-before race detector flags, e.g., a TMA load into a slot still being read, or o_smem
rewritten before its TMA store has read it (both were checked to raise). It runs wgmma and layouts
from jax 0.11 on, so on jax 0.10 these tests skip; .ci/run runs them in a Python 3.12 environment.
The CUDA lowering is checked on every jax version in `aot_test.py`. Not here: the kernel inside the
model or under a multi-device mesh; the interpreter's ordered callbacks do not go through flax's
layer scan ("broadcasted variable has a data dependency on the scan body"), and under an 8-device
shard_map it reports a race and a leaked barrier that the same kernel on one device does not have.
The model and sharding paths are shared with the Triton kernel, whose interpret-mode tests cover
them (tests/test_model.py, tests/test_kernels_sharded.py).

Tolerance: bf16, relative RMS <= 1e-2 against the fp32 recurrence on the same (bf16) inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.kernels import gpu_kernel, lightning_attention
from m1jax.kernels.lightning import pallas_mgpu, run_ids

C = pallas_mgpu.C
SLOPES = jnp.array([0.92, 0.083, 1e-3, 5e-5])  # decays 0.40, 0.92, 0.999, 0.99995

needs_interpreter = pytest.mark.skipif(
    not pallas_mgpu.interpret_available(), reason=f"Mosaic GPU interpret mode needs jax >= 0.11 ({jax.__version__})"
)


def rel_rms(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def inputs(t, seed=0, b=1, dk=64, dv=128, p_boundary=0.03):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k = (jax.random.normal(x, (b, t, 4, dk)).astype(jnp.bfloat16) for x in ks[:2])
    v = jax.random.normal(ks[2], (b, t, 4, dv)).astype(jnp.bfloat16)
    h0 = jax.random.normal(ks[3], (b, 4, dk, dv))
    seg = jnp.cumsum(jax.random.bernoulli(ks[4], p_boundary, (b, t)), axis=1) + 3
    return q, k, v, h0, seg


def run(impl, q, k, v, h0=None, seg=None):
    return lightning_attention(q, k, v, SLOPES, initial_state=h0, segment_ids=seg, impl=impl, interpret=True)


def recurrence(q, k, v, h0=None, seg=None):
    return run("recurrent", *(x.astype(jnp.float32) for x in (q, k, v)), h0=h0, seg=seg)


@needs_interpreter
@pytest.mark.parametrize("t", [1, C - 1, C, C + 1, 3 * C + 5])
@pytest.mark.parametrize("extras", ["none", "h0+segments"])
def test_forward_matches_recurrence(t, extras):
    q, k, v, h0, seg = inputs(t, seed=t)
    kw = dict(h0=h0, seg=seg) if extras != "none" else {}
    out, state = run("pallas_mgpu", q, k, v, **kw)
    ref_out, ref_state = recurrence(q, k, v, **kw)
    assert out.shape == ref_out.shape and out.dtype == jnp.bfloat16
    assert state.shape == (1, 4, 64, 128) and state.dtype == jnp.float32
    assert rel_rms(out, ref_out) <= 1e-2
    assert rel_rms(state, ref_state) <= 1e-2


@needs_interpreter
@pytest.mark.parametrize("spans", [1, 2, 3])
def test_spans_do_not_change_the_result(spans):
    """Several blocks per span and spans; a document crossing span borders; a ragged end; Dk > Dv."""
    t = 7 * C + 3
    q, k, v, h0, seg = inputs(t, seed=2, b=2, dk=128, dv=64)
    seg = seg.at[:, : 3 * C + 2].set(0)  # the first document spans 3+ blocks
    hm = lambda x: jnp.swapaxes(x, 1, 2)
    out, state = pallas_mgpu.forward(hm(q), hm(k), hm(v), SLOPES, h0, run_ids(seg), spans=spans, interpret=True)
    ref_out, ref_state = recurrence(q, k, v, h0=h0, seg=seg)
    assert rel_rms(hm(out), ref_out) <= 1e-2 and rel_rms(state, ref_state) <= 1e-2


@needs_interpreter
def test_every_token_its_own_document():
    """Boundaries at every token: only the diagonal of each block and no state survive."""
    t = 2 * C + 7
    q, k, v, h0, _ = inputs(t, seed=5)
    seg = jnp.arange(t)[None]
    out, state = run("pallas_mgpu", q, k, v, h0=h0, seg=seg)
    ref_out, ref_state = recurrence(q, k, v, h0=h0, seg=seg)
    assert rel_rms(out, ref_out) <= 1e-2 and rel_rms(state, ref_state) <= 1e-2


@needs_interpreter
@pytest.mark.parametrize("extras", ["h0", "h0+segments"])
def test_gradients_match_autodiff_of_recurrence(extras):
    """The backward is three forward calls of the same kernel (vjp.py); gradients reach h0 too."""
    t = 2 * C + 5
    q, k, v, h0, seg = inputs(t, seed=9)
    seg = seg if "segments" in extras else None
    w_o = jax.random.normal(jax.random.PRNGKey(1), (1, t, 4, 128))
    w_s = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 64, 128))

    def grads(impl, dtype):
        def f(q, k, v, h0):
            o, s = run(impl, q, k, v, h0=h0, seg=seg)
            return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(s * w_s)

        return jax.grad(f, argnums=(0, 1, 2, 3))(*(x.astype(dtype) for x in (q, k, v)), h0)

    got, want = grads("pallas_mgpu", jnp.bfloat16), grads("recurrent", jnp.float32)
    for name, g, r in zip(("dq", "dk", "dv", "dh0"), got, want, strict=True):
        assert rel_rms(g, r) <= 1e-2, name


@needs_interpreter
def test_under_jit_through_the_dispatcher():
    """ "pallas_gpu" picks Mosaic GPU for bf16 with 64-multiple heads (in interpret mode here)."""
    q, k, v, h0, seg = inputs(C + 9, seed=4, b=2)
    f = jax.jit(functools.partial(run, "pallas_gpu"))
    out, state = f(q, k, v, h0, seg)
    ref_out, ref_state = recurrence(q, k, v, h0=h0, seg=seg)
    assert rel_rms(out, ref_out) <= 1e-2 and rel_rms(state, ref_state) <= 1e-2


def test_dispatch_and_clear_errors():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert gpu_kernel(f32, 128, 128) == "pallas_triton"  # wgmma on fp32 would round to tf32
    assert gpu_kernel(bf16, 16, 128) == "pallas_triton"  # below the 64-wide wgmma tile
    assert gpu_kernel(bf16, 64, 256) == "pallas_triton"  # the backward would need Dk = 256
    assert gpu_kernel(bf16, 128, 128, interpret=True) == (
        "pallas_mgpu" if pallas_mgpu.interpret_available() else "pallas_triton"
    )
    assert gpu_kernel(bf16, 128, 128) == "pallas_triton"  # no Hopper GPU on this machine
    q, k, v, h0, _ = inputs(C, dk=64, dv=128)
    with pytest.raises(ValueError, match="bf16/fp16 inputs and Dk, Dv each 64 or 128"):
        run("pallas_mgpu", q.astype(f32), k.astype(f32), v.astype(f32))
    with pytest.raises(ValueError, match="Dk=32"):
        run("pallas_mgpu", q[..., :32], k[..., :32], v)
