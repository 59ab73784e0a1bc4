"""End to end: the CISPO toy learns from scratch; resume is exact; every loss runs; config errors."""

import importlib.util
import json
import os

import numpy as np
import optax
import pytest

from rl.config import base_config, validate
from rl.evaluate import paired_change
from rl.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_config():
    spec = importlib.util.spec_from_file_location("cispo_toy", os.path.join(ROOT, "configs", "cispo_toy.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def rows(workdir, key):
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if key in r]


@pytest.mark.slow
def test_cispo_toy_learns_from_scratch(tmp_path):
    c = toy_config()
    summary = train(c, str(tmp_path), progress=False)
    reward = [r["reward"] for r in rows(tmp_path, "reward")]
    assert len(reward) == c.steps
    first, last = np.mean(reward[:5]), np.mean(reward[-5:])
    assert last - first > 0.5, (first, last)
    assert summary["final"]["eval_reward"] - summary["initial"]["eval_reward"] > 0.5
    change = summary["change"]["eval_reward"]  # paired over the same held-out prompts
    assert change["delta"] == pytest.approx(summary["final"]["eval_reward"] - summary["initial"]["eval_reward"])
    assert change["z"] > 3, change
    r = rows(tmp_path, "reward")[-1]
    for key in ("clip_fraction", "ratio_mean", "entropy", "kl", "logp_gap", "zero_variance_fraction", "pass_rate"):
        assert np.isfinite(r[key]), key
    assert r["logp_gap"] <= 1e-4  # sampler and trainer agree (fp32)


def small_toy(overrides: dict | None = None):
    """The toy config at 6 steps of 8 x 4 samples; `overrides` by dotted name ({"rl.loss": "grpo"})."""
    c = toy_config()
    c.steps = 6
    c.rl.update(prompts_per_step=8, samples_per_prompt=4)
    c.eval.update(prompts=8, every=3)
    c.checkpoint.every = 3
    c.update_from_flattened_dict(overrides or {})
    return c


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    sa = train(small_toy(), a, progress=False)
    s = train(small_toy(), b, progress=False, stop_at=3)
    assert s["stopped_by"] == "stop_at" and s["end_step"] == 3
    s = train(small_toy(), b, progress=False)
    assert s["start_step"] == 3 and s["end_step"] == 6
    # The resumed run has no step-0 evaluation of its own: the change is measured against the
    # reference (initial) policy, evaluated again, and equals the uninterrupted run's.
    for k, d in sa["change"].items():
        assert s["change"][k]["delta"] == pytest.approx(d["delta"], abs=1e-6), k
    ra, rb = rows(a, "loss"), rows(b, "loss")
    assert [r["step"] for r in rb] == list(range(1, 7))
    for x, y in zip(ra, rb, strict=True):
        for k in ("reward", "loss", "grad_norm", "kl"):
            np.testing.assert_allclose(y[k], x[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # Rerunning the finished run trains nothing and returns what it stored when it finished.
    before = open(os.path.join(a, "metrics.jsonl")).read()
    again = train(small_toy(), a, progress=False)
    assert again["complete"] and again["end_step"] == 6 and again["final"] == pytest.approx(sa["final"])
    assert again["change"]["eval_reward"]["delta"] == pytest.approx(sa["change"]["eval_reward"]["delta"])
    assert open(os.path.join(a, "metrics.jsonl")).read() == before


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["grpo", "dapo", "gspo"])
def test_every_loss_runs_under_the_same_harness(tmp_path, loss):
    c = small_toy({"rl.loss": loss, "steps": 2, "micro_batches": 2})
    train(c, str(tmp_path), progress=False)
    r = rows(tmp_path, "loss")
    assert len(r) == 2 and all(np.isfinite(x["loss"]) and np.isfinite(x["grad_norm"]) for x in r)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("loss", "ppo", "loss"),
        ("updates_per_rollout", 7, "divide"),
        ("samples_per_prompt", 1, "samples_per_prompt"),
        ("zero_variance", "skip", "zero_variance"),
        ("reward", "task:x", "not a number"),
        ("reward", "task,bogus", r"unknown reward\(s\) \['bogus'\]; available: code, format, math"),
        ("cispo", {"ratio_maxx": 1.0}, r"'ratio_maxx' \(did you mean 'ratio_max'\?\) in config.rl.cispo"),
        ("cispo", {"ratio_max": 0.5, "ratio_min": 0.8}, r"config.rl.cispo: ratio_max=0.5 must exceed ratio_min=0.8"),
        ("grpo", {"aggregation": "mean"}, None),  # not the configured loss: not checked
    ],
)
def test_config_errors_name_the_field(field, value, match):
    c = base_config()
    if isinstance(value, dict):
        with c.rl.unlocked():
            c.rl[field].update(value)
    else:
        c.rl[field] = value
    if match is None:
        validate(c)
        return
    with pytest.raises(ValueError, match=match):
        validate(c)


@pytest.mark.parametrize(
    "old,new",
    [("learning_rate", "optim.learning_rate"), ("max_new_tokens", "rl.sampling.max_new_tokens"),
     ("cispo", "rl.cispo"), ("eval_prompts", "eval.prompts"), ("keep_checkpoints", "checkpoint.keep")],
)  # fmt: skip
def test_renamed_fields_name_their_new_place(old, new):
    c = base_config()
    with c.unlocked():
        c[old] = 1
    with pytest.raises(ValueError, match=rf"config\.{old} is now config\.{new}"):
        validate(c)


@pytest.mark.slow
def test_rl_step_runs_sharded_and_matches_one_device(tmp_path):
    """Same rollouts and updates on a 2x2x2 (data, fsdp, tensor) mesh of host devices."""
    one = train(small_toy({"steps": 2}), str(tmp_path / "one"), progress=False)
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.expert": 1, "mesh.tensor": 2}
    eight = train(small_toy({"steps": 2} | mesh), str(tmp_path / "eight"), progress=False)
    assert len(eight["state"]["params"]["embed"].sharding.device_set) == 8
    for x, y in zip(rows(tmp_path / "one", "loss"), rows(tmp_path / "eight", "loss"), strict=True):
        np.testing.assert_allclose(y["reward"], x["reward"])
        np.testing.assert_allclose(y["loss"], x["loss"], rtol=1e-4, atol=1e-6)
    assert one["end_step"] == eight["end_step"] == 2


@pytest.mark.slow
def test_init_from_a_pretraining_workdir_on_a_sharded_mesh(tmp_path):
    """Pretrain a few steps, then RL from that checkpoint on 8 host devices: params start equal."""
    from test_train import quick_config

    from m1jax.train.loop import train as pretrain

    pre = pretrain(quick_config({"steps": 2, "checkpoint.every": 2}), str(tmp_path / "pre"), progress=False)
    c = base_config()
    c.steps, c.optim.learning_rate, c.eval.prompts = 1, 1e-6, 4
    c.rl.update(init_from=str(tmp_path / "pre"), prompts_per_step=4, samples_per_prompt=4, updates_per_rollout=2)
    c.rl.sampling.max_new_tokens = 8
    c.mesh.update(data=2, fsdp=2, tensor=2)
    out = train(c, str(tmp_path / "rl"), progress=False)
    assert out["end_step"] == 1 and out["initial"] is not None
    r = rows(tmp_path / "rl", "loss")[0]
    assert r["kl"] < 1e-3 and r["logp_gap"] < 1e-4  # the first update starts from the pretrained policy
    assert pre["end_step"] == 2
    c.rl.init_from = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="init_from"):
        train(c, str(tmp_path / "rl2"), progress=False)


@pytest.mark.slow
def test_update_is_invariant_to_micro_batching():
    """One update on the same minibatch with 1, 2 or 4 micro-batches (some rows fully masked)."""
    import jax

    from m1jax import config as presets
    from m1jax.sharding import mesh_from_config
    from rl.step import RLTrainer

    cfg = presets.tiny(vocab_size=32)
    rng = np.random.default_rng(0)
    b, t, n = 8, 5, 6
    mask = (np.arange(n)[None] < rng.integers(1, n + 1, (b, 1))).astype(np.float32)
    mask[[1, 6]] = 0.0  # e.g. dropped zero-variance groups
    mb = {
        "prompt": rng.integers(1, 32, (b, t)).astype(np.int32),
        "prompt_lengths": np.full((b,), t, np.int32),
        "tokens": rng.integers(1, 32, (b, n)).astype(np.int32),
        "mask": mask,
        "old_logp": np.log(rng.uniform(0.01, 0.2, (b, n))).astype(np.float32),
        "ref_logp": np.log(rng.uniform(0.01, 0.2, (b, n))).astype(np.float32),
        "advantages": rng.normal(size=b).astype(np.float32),
    }
    mesh = mesh_from_config({"data": 1}, jax.devices()[:1])
    out = {}
    for loss, agg in (("cispo", "token_mean"), ("grpo", "seq_mean")):
        for micro in (1, 2, 4):
            tx = optax.sgd(0.1)  # linear in the gradient (Adam's first step is ~sign(g): noise-sensitive)
            tr = RLTrainer(cfg, tx, mesh, loss=loss, loss_kw={"aggregation": agg}, temperature=1.0, kl_coef=0.1,
                           aux=True, micro_batches=micro)  # fmt: skip
            state, m = tr.update(tr.init(jax.random.PRNGKey(0)), tr.shard_rows(mb))
            out[loss, micro] = (jax.device_get(m), jax.device_get(state["params"]))
        (m1, p1) = out[loss, 1]
        for micro in (2, 4):
            m2, p2 = out[loss, micro]
            for k in ("loss", "kl", "grad_norm", "entropy", "tokens"):
                np.testing.assert_allclose(m2[k], m1[k], rtol=2e-5, err_msg=f"{loss} micro={micro} {k}")
            for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
                np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)


def test_paired_change_uses_per_prompt_differences():
    before = {"acc": np.array([0.0, 1.0, 0.0, 1.0, 0.5])}
    after = {"acc": np.array([1.0, 1.0, 0.0, 1.0, 1.0])}
    d = paired_change(before, after)["acc"]
    diff = after["acc"] - before["acc"]
    assert d["delta"] == pytest.approx(diff.mean())
    assert d["se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(5))
    assert d["z"] == pytest.approx(diff.mean() / d["se"])
    assert paired_change(before, before)["acc"] == {"delta": 0.0, "se": 0.0, "z": 0.0}


@pytest.mark.slow
def test_a_new_loss_is_one_function_and_its_knobs(tmp_path, monkeypatch):
    """The README's recipe: register a loss with its knobs; the config section, validation and
    the training run need nothing else."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from rl import losses

    monkeypatch.setattr(losses, "LOSSES", dict(losses.LOSSES))

    @dataclasses.dataclass(frozen=True)
    class Knobs:
        beta: float = 1.0
        aggregation: str = "token_mean"

    @losses.register("plain_is", Knobs)
    def plain_is(logp, old_logp, advantages, mask, k, *, denom, ref_logp, kl_coef):
        logp, old_logp, adv, mask = losses.prepare(logp, old_logp, advantages, mask)
        ratio = jnp.exp(logp - old_logp)
        per_token = -k.beta * jax.lax.stop_gradient(ratio) * adv * logp
        return losses.finish(per_token, logp, ratio, jnp.zeros_like(ratio), mask, k.aggregation, denom, ref_logp,
                              kl_coef)  # fmt: skip

    assert dict(base_config().rl.plain_is) == {"beta": 1.0, "aggregation": "token_mean"}
    c = small_toy({"steps": 2, "rl.loss": "plain_is"})
    c.rl.plain_is.beta = 0.5
    train(c, str(tmp_path), progress=False)
    r = rows(tmp_path, "loss")
    assert len(r) == 2 and all(np.isfinite(x["loss"]) for x in r)
    c.rl.plain_is.gamma = 1.0
    with pytest.raises(ValueError, match=r"'gamma' in config.rl.plain_is"):
        validate(c)
