"""The logical axis names map onto a device mesh: a sharded forward equals the unsharded one.

Runs on 8 host CPU devices (conftest sets --xla_force_host_platform_device_count=8).
"""

import jax
import jax.numpy as jnp
import pytest
from test_model import CFG, big_params

from conftest import rel_err
from m1jax import M1Model
from m1jax.sharding import batch_sharding, make_mesh, param_shardings

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (host) devices")
CFG = CFG.replace(vocab_size=96)  # divisible by the tensor axis
PARAMS = big_params(CFG)


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape", [{"fsdp": 2, "tensor": 2, "expert": 2}, {"data": 2, "fsdp": 4}, {"tensor": 2, "expert": 4}]
)
def test_sharded_forward_equals_single_device(shape):
    mesh = make_mesh(shape)
    shardings = param_shardings(CFG, mesh)
    params = jax.device_put(PARAMS, shardings)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (8, 24), 0, CFG.vocab_size)
    fwd = jax.jit(lambda p, t: M1Model(CFG).apply({"params": p}, t)[0])
    sharded = fwd(params, jax.device_put(tokens, batch_sharding(mesh)))
    ref = fwd(PARAMS, tokens)
    assert rel_err(sharded, ref) <= 1e-5
    # the parameters really are split: an expert weight lives in pieces across devices
    w1 = params["groups"]["run_0"]["moe"]["w1"]
    assert w1.sharding.shard_shape(w1.shape) != w1.shape


def test_indivisible_parameter_is_named():
    with pytest.raises(ValueError, match=r"embed.*not divisible"):
        param_shardings(CFG.replace(vocab_size=97), make_mesh({"tensor": 2, "fsdp": 4}))


def test_bad_mesh_is_an_error():
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 8})
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh({"fsdp": 3, "tensor": 2})


@pytest.mark.slow
def test_gradients_under_sharding():
    mesh = make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
    params = jax.device_put(PARAMS, param_shardings(CFG, mesh))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 16), 0, CFG.vocab_size)
    loss = lambda p, t: jnp.mean(M1Model(CFG).apply({"params": p}, t)[0] ** 2)
    g_sharded = jax.jit(jax.grad(loss))(params, jax.device_put(tokens, batch_sharding(mesh)))
    g_ref = jax.jit(jax.grad(loss))(PARAMS, tokens)
    for a, b in zip(jax.tree.leaves(g_sharded), jax.tree.leaves(g_ref), strict=True):
        assert rel_err(a, b) <= 1e-4


def test_load_pretrained_places_parameters_on_the_mesh(tmp_path):
    from m1jax.hf import load_pretrained, save_pretrained

    cfg = CFG.replace(rotary_dim=CFG.head_dim)
    save_pretrained(cfg, PARAMS, str(tmp_path))
    mesh = make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
    want = param_shardings(cfg, mesh)
    _, params = load_pretrained(str(tmp_path), shardings=lambda c: param_shardings(c, mesh), **_fields(cfg))
    for got, spec, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want), jax.tree.leaves(PARAMS), strict=True):
        assert got.sharding == spec
        assert rel_err(got, ref) == 0.0


def _fields(cfg):
    return {"dtype": cfg.dtype, "remat": cfg.remat}
