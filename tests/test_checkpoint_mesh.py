"""A checkpoint saved on one mesh restores on another (8 host CPU devices).

One AdamW step on fsdp=8, saved; the checkpoint restores onto data2 x fsdp2 x tensor2 and onto one
device bit for bit, each tensor laid out as the new mesh's Trainer shards it, and one more step
there equals continuing on fsdp=8 (within 1e-5 of each tensor's scale, as in
test_sharded_train). A checkpoint of another model width or optimizer is a clear error naming the
tensors, not a silent fallback to older checkpoints.
"""

import jax
import numpy as np
import optax
import pytest

from m1jax import sharding as shd
from m1jax.train import config as tc
from m1jax.train import optim
from m1jax.train.checkpoint import Checkpointer
from m1jax.train.step import Trainer

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (host) devices")

DATA_STATE = {"epoch": 0, "index": 17, "offset": 3, "seed": 0}


def _trainer(mesh, tx=None, **model):
    c = tc.base_config()
    # hidden 48 and vocab 96 divide by every mesh axis used here (as in test_sharded_train).
    c.model.update(preset="tiny", vocab_size=96, num_local_experts=8, **model)
    c.update(batch_size=8, seq_len=64, steps=10)
    c.optim.update(warmup_steps=0, learning_rate=1e-4)
    cfg = tc.validate(c)
    lr = optim.schedule(c.optim.schedule, c.optim.learning_rate, c.steps, c.optim.warmup_steps)
    return Trainer(cfg, tx or optim.adamw(lr, grad_clip=1.0), lr, mesh)


def _batch(seed):
    """{"tokens", "segment_ids"}: [8, 64] int32 each."""
    rng = np.random.default_rng(seed)
    segs = np.sort(rng.integers(1, 4, (8, 64)), axis=1).astype(np.int32)
    return {"tokens": rng.integers(0, 96, (8, 64)).astype(np.int32), "segment_ids": segs}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint dir, host state saved at step 1, host state and metrics after step 2), all on fsdp=8."""
    directory = str(tmp_path_factory.mktemp("ckpt"))
    tr = _trainer(shd.make_mesh({"fsdp": 8}))
    state, _ = tr.step(tr.init(jax.random.PRNGKey(0)), tr.put_batch(_batch(0)))
    ckpt = Checkpointer(directory)
    assert ckpt.save(1, state, DATA_STATE, wait=True)
    ckpt.close()
    at_save = jax.device_get(state)  # before the next step donates `state`
    state, metrics = tr.step(state, tr.put_batch(_batch(1)))
    return directory, at_save, jax.device_get(state), jax.device_get(metrics)


def _restore(directory, trainer):
    ckpt = Checkpointer(directory)
    try:
        return ckpt.restore_latest(trainer.abstract_state)
    finally:
        ckpt.close()


def _close(path, a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(b))), 1e-30)
    assert float(np.max(np.abs(a - b))) <= 1e-5 * scale, jax.tree_util.keystr(path)


MESHES_B = {"data2xfsdp2xtensor2": {"data": 2, "fsdp": 2, "tensor": 2}, "one_device": None}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MESHES_B))
def test_restore_on_another_mesh_is_exact_and_continues(saved, name):
    directory, at_save, want_next, want_metrics = saved
    shape = MESHES_B[name]
    mesh = shd.make_mesh({}, jax.devices()[:1]) if shape is None else shd.make_mesh(shape)
    tr = _trainer(mesh)
    step, state, data_state = _restore(directory, tr)
    assert step == 1 and data_state == DATA_STATE

    assert jax.tree.structure(state) == jax.tree.structure(at_save)
    want_shardings = jax.tree.leaves(tr.state_sharding)
    for (path, leaf), want, sharding in zip(
        jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(at_save), want_shardings, strict=True
    ):
        where = jax.tree_util.keystr(path)
        np.testing.assert_array_equal(jax.device_get(leaf), want, err_msg=where)
        assert leaf.sharding == sharding, (where, leaf.sharding, sharding)  # mesh B and its partition spec
    # The restored state really is re-laid out: on mesh B some tensors split over "tensor", which
    # mesh A does not have; on one device every tensor is whole.
    split = {a for leaf in jax.tree.leaves(state) for a in jax.tree.leaves(tuple(leaf.sharding.spec)) if a}
    assert ("tensor" in split) if shape else all(len(leaf.devices()) == 1 for leaf in jax.tree.leaves(state))

    got_next, got_metrics = jax.device_get(tr.step(state, tr.put_batch(_batch(1))))
    np.testing.assert_allclose(got_metrics["loss"], want_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(got_metrics["grad_norm"], want_metrics["grad_norm"], rtol=1e-5)
    jax.tree_util.tree_map_with_path(_close, got_next, want_next)


@pytest.mark.slow
def test_restore_with_another_width_names_the_tensors(saved):
    directory = saved[0]
    tr = _trainer(shd.make_mesh({}, jax.devices()[:1]), hidden_size=32)
    with pytest.raises(ValueError, match=r"does not fit") as err:
        _restore(directory, tr)
    msg = str(err.value)
    assert "step 1" in msg and "params/embed: checkpoint (96, 48), this run (96, 32)" in msg, msg


def test_restore_with_another_optimizer_names_the_tensors(saved):
    directory = saved[0]
    tr = _trainer(shd.make_mesh({}, jax.devices()[:1]), tx=optax.sgd(0.1))  # no Adam moments
    with pytest.raises(ValueError, match=r"opt_state/\S*mu/embed: in the checkpoint, not in this run's state"):
        _restore(directory, tr)
