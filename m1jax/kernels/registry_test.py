"""The kernel registry is the one list: config validation, dispatch and the benchmarks read it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax import M1Model, init_params
from m1jax.config import PRESETS, ModelConfig
from m1jax.kernels import lightning_attention, registry, softmax_attention


@pytest.mark.parametrize("table", [registry.LIGHTNING, registry.SOFTMAX])
def test_every_row_loads_its_code(table):
    for impl in table.values():
        if impl.entry:  # pallas_gpu only picks another row
            assert callable(impl.load()), impl.name


def test_config_accepts_exactly_the_registry():
    for name in registry.LIGHTNING_IMPLS:
        ModelConfig(lightning_impl=name)
    for name in registry.SOFTMAX_IMPLS:
        ModelConfig(softmax_impl=name)
    with pytest.raises(ValueError, match=r"lightning_impl='nope': must be one of \['auto', 'reference'"):
        ModelConfig(lightning_impl="nope")
    with pytest.raises(ValueError, match=r"softmax_impl='nope': must be one of \['auto', 'flash', 'blocked'\]"):
        ModelConfig(softmax_impl="nope")


def test_dispatch_names_the_valid_impls():
    q = jnp.ones((1, 8, 2, 4))
    with pytest.raises(ValueError, match=r"unknown lightning impl 'nope'; expected one of \['auto', 'reference'"):
        lightning_attention(q, q, q, jnp.ones(2), impl="nope")
    with pytest.raises(ValueError, match=r"unknown softmax impl 'nope'; expected one of \['auto', 'flash'"):
        softmax_attention(q, q, q, impl="nope")


def test_chunk_lengths():
    assert registry.LIGHTNING["reference"].chunk(None, 1000) == 256
    assert registry.LIGHTNING["reference"].chunk(64, 1000) == 64
    assert registry.LIGHTNING["reference"].chunk(None, 100) == 100  # never longer than the sequence
    assert registry.LIGHTNING["pallas_triton"].chunk(256, 1000) == 64  # capped by its registers
    assert registry.LIGHTNING["pallas_mgpu"].chunk(None, 1000) == 64


@pytest.mark.slow
def test_softmax_impls_give_the_same_model():
    cfg = PRESETS["tiny"](vocab_size=64)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 40), 0, 64)
    segs = jnp.asarray(np.repeat([[1] * 25 + [2] * 15], 2, axis=0))
    out = {}
    for impl in registry.SOFTMAX:
        c = cfg.replace(softmax_impl=impl)
        out[impl] = M1Model(c).apply({"params": params}, tokens, segs)[0]
    np.testing.assert_allclose(out["blocked"], out["flash"], rtol=0, atol=1e-5)
