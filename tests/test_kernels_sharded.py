"""The Pallas lightning kernels on 8 CPU devices (interpret mode): sharded over batch and heads, with
and without a mesh context, values and gradients equal the recurrence and nothing is gathered."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from m1jax.kernels import lightning_attention

SLOPES = jnp.array([0.92, 0.083, 1e-3, 5e-5])


def rel_rms(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_triton"])
@pytest.mark.parametrize("context", [False, True])
def test_sharded_kernels_match_recurrence(impl, context):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.device_put(jax.random.normal(x, (4, 37, 4, 16)), sh) for x in ks[:3])
    seg = jnp.array([[1] * 20 + [2] * 17] * 4)
    w = jax.random.normal(ks[3], (4, 37, 4, 16))

    def grad_fn(impl):
        def f(q, k, v):
            o, s = lightning_attention(q, k, v, SLOPES, segment_ids=seg, impl=impl, block_size=16, interpret=True)
            return jnp.sum(o * w) + jnp.sum(s), o

        return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))

    with jax.set_mesh(mesh) if context else contextlib.nullcontext():
        fn = grad_fn(impl)
        grads, out = fn(q, k, v)
        text = fn.lower(q, k, v).compile().as_text()
    ref_grads, ref_out = grad_fn("recurrent")(q, k, v)
    assert rel_rms(out, ref_out) <= 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_rms(g, r) <= 1e-5
    assert out.sharding.spec[:3] == (("data", "fsdp"), None, "tensor")
    assert "all-gather" not in text
