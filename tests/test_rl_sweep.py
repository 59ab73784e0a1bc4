"""rl.sweep: a losses x seeds comparison is the same harness as rl.loop.train; its summaries."""

import json
import os

import numpy as np
import pytest
from test_rl_train import small_toy

from rl import sweep
from rl.loop import train


def test_moving_average_and_steps_to_reach():
    np.testing.assert_allclose(sweep.moving_average([1, 2, 3, 4], 1), [1, 2, 3, 4])
    np.testing.assert_allclose(sweep.moving_average([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(sweep.moving_average([3, 0, 0, 3], 3), [3, 1.5, 1, 1])
    steps, vals = [1, 2, 3, 4, 5], [0.1, 0.6, 0.2, 0.5, 0.7]
    assert sweep.steps_to_reach(steps, vals, 0.5) == 2
    assert sweep.steps_to_reach(steps, vals, 0.5, window=2) == 5  # (0.5 + 0.7) / 2; a spike alone is not enough
    assert sweep.steps_to_reach(steps, vals, 0.55, window=3) is None
    assert sweep.steps_to_reach([10, 20], [0.0, 1.0], 1.0) == 20  # the logged step, not the index
    with pytest.raises(ValueError, match="values"):
        sweep.steps_to_reach([1, 2], [0.1], 0.5)
    with pytest.raises(ValueError, match="window"):
        sweep.moving_average([1.0], 0)


def test_band_and_summarize():
    b = sweep.band([[0.0, 1.0], [2.0, 3.0]])
    np.testing.assert_allclose(b["mean"], [1, 2])
    np.testing.assert_allclose(b["std"], [1, 1])
    np.testing.assert_allclose(b["min"], [0, 1])
    np.testing.assert_allclose(b["max"], [2, 3])
    with pytest.raises(ValueError, match="seeds, steps"):
        sweep.band([1.0, 2.0])

    def row(step, reward):
        return {"step": step, "reward": reward, "clip_fraction": 0.1, "kl": 0.0, "ratio_max": 1.5, "ratio_min": 0.5}

    runs = {"cispo": {0: [row(1, 0.1), row(2, 0.5)], 1: [row(1, 0.2), row(2, 0.3)]}}
    s = sweep.summarize(runs, 0.4, last=1)["cispo"]
    assert s["steps_to_target"] == {0: 2, 1: None} and s["reached"] == 1 and s["seeds"] == 2
    assert s["mean_steps_to_target"] == 2
    assert s["final_reward_mean"] == pytest.approx(0.4) and s["final_reward_std"] == pytest.approx(0.1)
    assert s["clip_fraction_mean"] == pytest.approx(0.1) and s["ratio_max"] == 1.5 and s["ratio_min"] == 0.5


@pytest.mark.slow
def test_compare_rows_equal_train_metrics(tmp_path):
    """Losses share the sampler, log-probs and initial states; each run is still exactly train()'s run."""
    c = small_toy({"steps": 3})
    runs = sweep.compare(c, ["cispo", "grpo"], [0, 1])
    assert set(runs) == {"cispo", "grpo"} and all(set(v) == {0, 1} for v in runs.values())
    assert [r["step"] for r in runs["grpo"][1]] == [1, 2, 3]
    assert runs["cispo"][0][0]["reward"] == runs["grpo"][0][0]["reward"]  # same initial policy, same prompts
    assert runs["cispo"][0][0]["reward"] != runs["cispo"][1][0]["reward"]  # another seed: another init
    # The second loss and seed: the shared log-probs and the cached initial state are used.
    train(small_toy({"steps": 3, "rl.loss": "grpo", "seed": 1}), str(tmp_path), progress=False)
    with open(os.path.join(tmp_path, "metrics.jsonl")) as fh:
        ref = [r for r in map(json.loads, fh) if "loss" in r]
    assert len(ref) == 3
    for x, y in zip(ref, runs["grpo"][1], strict=True):
        assert x["step"] == y["step"]
        for k in ("reward", "loss", "grad_norm", "clip_fraction", "kl", "ratio_max"):
            np.testing.assert_allclose(y[k], x[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.slow
def test_compare_from_a_pretraining_workdir(tmp_path):
    """init_from: every (loss, seed) run starts from the pretrained policy (KL 0 at the first update)."""
    from test_train import quick_config

    from m1jax.train.loop import train as pretrain
    from rl.config import base_config

    pre = quick_config({"steps": 2, "checkpoint.every": 2, "eval.num_samples": 0})
    pretrain(pre, str(tmp_path / "pre"), progress=False)
    c = base_config()
    c.steps, c.optim.learning_rate = 2, 1e-6
    c.rl.update(init_from=str(tmp_path / "pre"), prompts_per_step=4, samples_per_prompt=4, updates_per_rollout=2)
    c.rl.sampling.max_new_tokens = 8
    runs = sweep.compare(c, ["cispo", "dapo"], [0, 1])
    for loss in ("cispo", "dapo"):
        for seed in (0, 1):
            first = runs[loss][seed][0]
            assert first["kl"] < 1e-3 and first["logp_gap"] < 1e-4, (loss, seed, first)
    assert runs["cispo"][1][0]["reward"] == runs["dapo"][1][0]["reward"]  # same policy, same samples
    c.rl.init_from = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="init_from"):
        sweep.compare(c, ["cispo"], [0])
