"""The sharded training step equals the single-device one on several meshes (8 host CPU devices).

One AdamW step from the same initial state and batch: loss, gradient norm, both Adam moments (the
first is 0.1 x the clipped gradient, so this compares every gradient at full precision) and every
updated parameter agree within 1e-5 of each tensor's scale. The learning rate is small because
Adam's first update is nearly lr * sign(g): float noise in near-zero gradients moves it by up to lr.
"""

import jax
import numpy as np
import pytest

from m1jax import sharding as shd
from m1jax.train import config as tc
from m1jax.train import optim
from m1jax.train.step import Trainer

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (host) devices")

MESHES = [
    {"fsdp": 8},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"expert": 4, "fsdp": 2},
    {"sequence": 4, "fsdp": 2},
]


def _step(mesh):
    c = tc.base_config()
    # hidden 48 and vocab 96 divide by every mesh axis above; 8 experts so expert=4 holds 2 each.
    c.model.update(preset="tiny", vocab_size=96, num_local_experts=8)
    c.update(batch_size=8, seq_len=64, steps=10)
    c.optim.update(warmup_steps=0, learning_rate=1e-4)
    cfg = tc.validate(c)
    lr = optim.schedule(c.optim.schedule, c.optim.learning_rate, c.steps, c.optim.warmup_steps)
    rng = np.random.default_rng(0)
    segs = np.sort(rng.integers(1, 4, (8, 64)), axis=1).astype(np.int32)
    batch = {"tokens": rng.integers(0, 96, (8, 64)).astype(np.int32), "segment_ids": segs}
    tr = Trainer(cfg, optim.adamw(lr, grad_clip=1.0), lr, mesh)
    state, metrics = tr.step(tr.init(jax.random.PRNGKey(0)), tr.put_batch(batch))
    return jax.device_get(state), jax.device_get(metrics), state["params"]


@pytest.fixture(scope="module")
def single():
    return _step(shd.make_mesh({}, jax.devices()[:1]))


def _close(path, a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(b))), 1e-30)
    assert float(np.max(np.abs(a - b))) <= 1e-5 * scale, jax.tree_util.keystr(path)


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(f"{k}{v}" for k, v in s.items()))
def test_sharded_step_equals_single_device(single, shape):
    want, want_m, _ = single
    got, got_m, live = _step(shd.make_mesh(shape))
    np.testing.assert_allclose(got_m["loss"], want_m["loss"], rtol=1e-5)
    np.testing.assert_allclose(got_m["grad_norm"], want_m["grad_norm"], rtol=1e-5)
    jax.tree_util.tree_map_with_path(_close, got, want)  # params, Adam moments, counters
    # the state really is spread over the mesh (parameters split along at least one of its axes)
    specs = {a for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding.spec, live)) for a in s if a}
    assert {x for a in specs for x in ((a,) if isinstance(a, str) else a)} & set(shape), specs
