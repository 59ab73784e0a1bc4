"""rl.loop.rl_step: honest phase timings, and the KL it logs (reference forward on sample 0 of each
group when kl_coef = 0, the updates' KL term otherwise)."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_rl_train import small_toy

from m1jax import sharding as shd
from rl import loop, losses
from rl.config import validate

ROLLOUT = ("prompt", "prompt_lengths", "tokens", "mask")
PHASES = ("gen_time_s", "reward_time_s", "logprob_time_s", "update_time_s")


class Env:
    """What `train` builds for a config, a state stepped by `step`, and spies on the forwards
    (their batch sizes) and the sampler (its rollouts)."""

    def __init__(self, monkeypatch, overrides: dict):
        c = self.c = small_toy(overrides)
        validate(c)
        mesh = shd.mesh_from_config(dict(c.mesh))
        parts = self.parts = loop.setup(c, mesh)
        self.trainer, tx = loop.make_trainer(c, parts.cfg, mesh)
        self.state = loop.initial_state(self.trainer, tx, c.seed)
        self.ref = jax.tree.map(lambda x: x.copy(), self.state["params"])
        self.forward, self.rows, self.rollouts = self.trainer.logprobs, [], []
        self.trainer.logprobs = lambda p, b: (self.rows.append(b["tokens"].shape[0]), self.forward(p, b))[1]
        sample = loop.sample
        monkeypatch.setattr(loop, "sample", lambda *a, **k: (self.rollouts.append(r := sample(*a, **k)), r)[1])

    def step(self, i: int) -> dict:
        p = self.parts
        row = loop.rl_step(self.c, p.cfg, self.trainer, p.tokenizer, p.reward_fn, p.sampling, self.state, self.ref, i)
        self.state = row.pop("state")
        return row


def k3_reference(env: Env, params, rollout, rows) -> float:
    """The losses' token-mean k3 KL of `params` to the reference over `rows` of the full-batch forwards."""
    dev = env.trainer.shard_rows({k: getattr(rollout, k) for k in ROLLOUT})
    logp, ref = (np.asarray(env.forward(q, dev))[rows] for q in (params, env.ref))
    mask = np.asarray(rollout.mask)[rows]
    return float(losses.aggregate(losses.k3_kl(jnp.asarray(logp), jnp.asarray(ref)), jnp.asarray(mask)))


def test_k3_mean_is_the_losses_token_mean():
    rng = np.random.default_rng(0)
    logp, ref = np.log(rng.uniform(0.05, 1.0, (2, 3, 7))).astype(np.float32)
    mask = (rng.uniform(size=(3, 7)) > 0.3).astype(np.float32)
    want = losses.aggregate(losses.k3_kl(logp, jnp.where(mask > 0, ref, logp)), mask)
    np.testing.assert_allclose(loop._k3_mean(logp, ref, mask), want, rtol=1e-6)
    assert loop._k3_mean(logp, ref, 0 * mask) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides,subset",
    [
        ({}, True),  # one device: the 8 rows of sample 0 are gathered before the reference forward
        ({"mesh.data": 2, "mesh.fsdp": 2}, True),  # 8 rows over 4 batch-parallel devices
        ({"mesh.data": 2, "mesh.fsdp": 2, "rl.prompts_per_step": 6}, False),  # 6 rows do not split: all rows
    ],
)
def test_kl_coef_zero_measures_kl_on_sample_zero_of_each_group(monkeypatch, overrides, subset):
    env = Env(monkeypatch, overrides)
    g, p = env.c.rl.samples_per_prompt, env.c.rl.prompts_per_step
    assert env.step(0)["kl"] == 0.0  # the policy starts as the reference
    before = jax.tree.map(lambda x: x.copy(), env.state["params"])  # (the updates donate the state)
    env.rows.clear()
    row = env.step(1)
    assert env.rows == [p * g, p if subset else p * g]  # old log-probs, then the reference's
    want = k3_reference(env, before, env.rollouts[-1], np.arange(0, p * g, g))
    assert want > 1e-4
    np.testing.assert_allclose(row["kl"], want, rtol=1e-4)


@pytest.mark.slow
def test_kl_coef_positive_keeps_the_full_reference_and_the_updates_kl(monkeypatch):
    env = Env(monkeypatch, {"rl.kl_coef": 0.1})
    g, p, u = env.c.rl.samples_per_prompt, env.c.rl.prompts_per_step, env.c.rl.updates_per_rollout
    update, metrics = env.trainer.update, []
    env.trainer.update = lambda s, b: (out := update(s, b), metrics.append(out[1]))[0]
    env.step(0)
    metrics.clear()
    env.rows.clear()
    row = env.step(1)
    assert env.rows == [p * g, p * g]  # old and reference log-probs, every row
    ms = jax.device_get(metrics)
    assert len(ms) == u
    w = np.asarray([m["tokens"] for m in ms])
    np.testing.assert_allclose(row["kl"], np.sum([m["kl"] for m in ms] * w) / w.sum(), rtol=1e-6)


@jax.jit
def _busy(tokens):
    """`tokens` unchanged, ready only after a second or so of device work (dispatch returns at once)."""
    x = jax.lax.fori_loop(0, 400, lambda i, a: jnp.tanh(a @ a), jnp.full((384, 384), 0.01))
    return tokens + (x[0, 0] > 1e30).astype(tokens.dtype)


@pytest.mark.slow
def test_phase_timings_wait_for_the_device_and_add_up(monkeypatch):
    env = Env(monkeypatch, {})
    env.step(0)  # compiles
    tokens = jnp.asarray(env.rollouts[-1].tokens)
    jax.block_until_ready(_busy(tokens))  # compiled for the rollout's shape: the step must not compile it
    t = time.perf_counter()
    out = _busy(tokens)
    dispatched = time.perf_counter() - t
    jax.block_until_ready(out)
    busy = time.perf_counter() - t
    assert dispatched < busy / 4, (dispatched, busy)  # the premise: the work runs after dispatch returns
    sample = loop.sample  # the spy
    monkeypatch.setattr(loop, "sample", lambda *a, **k: (r := sample(*a, **k))._replace(tokens=_busy(r.tokens)))
    row = env.step(1)
    assert row["gen_time_s"] >= busy / 2, (row["gen_time_s"], busy)  # not charged to the next phase
    assert all(row[k] >= 0 for k in PHASES)
    assert sum(row[k] for k in PHASES) <= row["step_time_s"]
    lengths = np.asarray(env.rollouts[-1].lengths)
    assert row["gen_tokens_per_s"] == pytest.approx(lengths.sum() / row["gen_time_s"])
