"""Length control: the max_new_tokens schedule (runs, evaluates and resumes stage by stage) and
DAPO's soft overlong penalty."""

import json
import os

import numpy as np
import pytest
from test_rl_train import small_toy

import rl.loop
from rl.config import base_config, max_new_tokens_at, overlong_limits, token_schedule, validate
from rl.loop import train
from rl.rewards import soft_overlong_penalty


def metric_rows(workdir, key):
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if key in r]


def test_schedule_parses_and_picks_the_last_stage_started():
    assert token_schedule("") == []
    assert token_schedule(" 0:64, 100:128 ") == [(0, 64), (100, 128)]
    c = base_config()
    assert [max_new_tokens_at(c, s) for s in (0, 500)] == [96, 96]  # no schedule: max_new_tokens
    c.rl.sampling.max_new_tokens_schedule = "0:64,100:128,250:256"
    validate(c)
    got = [max_new_tokens_at(c, s) for s in (0, 99, 100, 249, 250, 10_000)]
    assert got == [64, 64, 128, 128, 256, 256]


@pytest.mark.parametrize(
    "spec,match",
    [
        ("0:64,100", "'100' is not step:tokens"),
        ("0:64,x:128", "'x:128' is not step:tokens"),
        ("0:64:128", "is not step:tokens"),
        ("10:64,100:128", "first stage must start at step 0, not 10"),
        ("0:0", "tokens must be >= 1"),
        ("0:64,100:64", "strictly increase"),  # tokens not increasing
        ("0:128,100:64", "strictly increase"),
        ("0:64,100:128,100:256", "strictly increase"),  # steps not increasing
        ("0:64,200:128,100:256", "strictly increase"),
    ],
)
def test_schedule_errors_name_the_field(spec, match):
    c = base_config()
    c.rl.sampling.max_new_tokens_schedule = spec
    with pytest.raises(ValueError, match=rf"config.rl.sampling.max_new_tokens_schedule='{spec}': .*{match}"):
        validate(c)


@pytest.mark.parametrize(
    "overlong,schedule,match",
    [
        ({"max_length": -1}, "", "config.rl.overlong.max_length=-1: must be >= 0"),
        ({"buffer": -2}, "", "config.rl.overlong.buffer=-2: must be >= 0"),
        ({"buffer": 96}, "", r"config.rl.overlong.buffer=96: must be < max_length \(96"),
        ({"max_length": 40, "buffer": 40}, "", r"config.rl.overlong.buffer=40: must be < max_length \(40"),
        ({"buffer": 16}, "0:16,10:64", r"config.rl.overlong.buffer=16: must be < max_length \(16"),  # every stage
        ({"buffer": 15}, "0:16,10:64", None),
        ({"max_length": 200, "buffer": 50}, "0:16,10:64", None),  # its own max_length, not the budgets
    ],
)
def test_overlong_errors_name_the_field(overlong, schedule, match):
    c = base_config()
    c.rl.overlong.update(enabled=True, **overlong)
    c.rl.sampling.max_new_tokens_schedule = schedule
    if match is None:
        validate(c)
        return
    with pytest.raises(ValueError, match=match):
        validate(c)
    c.rl.overlong.enabled = False  # off: its fields are not checked
    validate(c)


def test_overlong_limits_default_to_the_stage_budget():
    c = base_config()
    assert overlong_limits(c, 20480) == (20480, 4096)  # DAPO's 4,096-token cache of 20,480
    assert overlong_limits(c, 3) == (3, 1)
    c.rl.overlong.update(max_length=100, buffer=10)
    assert overlong_limits(c, 20480) == (100, 10)


def _eq13(length, l_max, l_c):
    """DAPO arXiv 2503.14476 eq. 13, written case by case."""
    if length <= l_max - l_c:
        return 0.0
    if length <= l_max:
        return (l_max - l_c - length) / l_c
    return -1.0


def test_soft_overlong_penalty_is_dapo_eq13():
    l_max, l_c = 20, 4
    at = {16: 0.0, 17: -0.25, 18: -0.5, 20: -1.0, 21: -1.0}  # L_max - L_c, L_max - L_c + 1, ..., L_max, L_max + 1
    np.testing.assert_array_equal(soft_overlong_penalty(list(at), l_max, l_c), list(at.values()))
    lengths = np.arange(0, 40)
    want = [_eq13(n, l_max, l_c) for n in lengths]
    np.testing.assert_allclose(soft_overlong_penalty(lengths, l_max, l_c), want, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(soft_overlong_penalty([3, 4, 5], 4, 1), [0.0, -1.0, -1.0])  # a hard cut at 4
    for buffer in (0, 5):
        with pytest.raises(ValueError, match="1 <= buffer <= max_length"):
            soft_overlong_penalty([1], 4, buffer)


def scheduled(overrides: dict):
    """The small toy (8 x 4 samples) with the overlong penalty, greedy evaluation only."""
    c = small_toy({"eval.samples": 0, "eval.every": 2, **overrides})
    c.rl.overlong.update(enabled=True, buffer=1)  # -1 for L = budget, 0 below: the penalty counts the cut ones
    return c


@pytest.mark.slow
def test_a_schedule_run_and_its_resume_into_the_longer_stage(tmp_path, monkeypatch):
    """One test, as the scheduled run is also the resumed run's reference (each budget compiles anew)."""
    evals = []
    evaluate = rl.loop.evaluate

    def spy(*a, max_new_tokens=None, **kw):
        evals.append(max_new_tokens)
        return evaluate(*a, max_new_tokens=max_new_tokens, **kw)

    monkeypatch.setattr(rl.loop, "evaluate", spy)
    # Toy answers are 4 digits + EOS = 5 tokens, so a budget of 3 cuts them and 6 does not have to.
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    sa = train(scheduled({"steps": 4, "rl.sampling.max_new_tokens_schedule": "0:3,2:6"}), a, progress=False)
    ra = metric_rows(a, "loss")
    assert [r["max_new_tokens"] for r in ra] == [3, 3, 6, 6]
    for r in ra:
        assert 1 <= r["response_length_max"] <= r["max_new_tokens"]
        # Cut responses have L = budget (penalty -1); one whose EOS is the budget-th token does too.
        assert r["truncated_fraction"] <= -r["overlong_penalty"] <= 1.0
    assert ra[0]["truncated_fraction"] > 0  # the short stage does cut (so the longer one is a change)
    # Step 0 (the initial policy) at stage 0's budget; after steps 2 and 4, the budget last trained with.
    assert evals == [3, 3, 6]

    # Resume: checkpoints hold params and optimizer only (nothing [B, N]-shaped) and RL does not
    # compare the stored config, so a run of budget 3 continues under the schedule that raises it to 6.
    train(scheduled({"steps": 2, "rl.sampling.max_new_tokens": 3}), b, progress=False)
    sb = train(scheduled({"steps": 4, "rl.sampling.max_new_tokens_schedule": "0:3,2:6"}), b, progress=False)
    assert sb["start_step"] == 2 and sb["end_step"] == 4
    rb = metric_rows(b, "loss")
    assert [r["max_new_tokens"] for r in rb] == [3, 3, 6, 6]
    for x, y in zip(ra, rb, strict=True):  # (the learning rate is constant: 2 steps then 2 more = 4)
        for k in ("reward", "overlong_penalty", "loss", "grad_norm", "kl", "response_length_max"):
            np.testing.assert_allclose(y[k], x[k], rtol=1e-6, atol=1e-7, err_msg=k)
    for k, d in sa["change"].items():  # initial at budget 3, final at 6, in both
        assert sb["change"][k]["delta"] == pytest.approx(d["delta"], abs=1e-6), k


def test_groups_without_task_signal_stay_out_whatever_the_length_penalty():
    # DAPO filters groups on accuracy: an all-correct group whose lengths straddle the penalty's
    # ramp must not be kept (its std-normalised advantages would be all length).
    from rl import advantages

    task = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0]])
    shaped = task + np.array([[0.0, 0.0, 0.0, -0.01], [0.0, -0.5, 0.0, 0.0]])
    judged = advantages.compute(shaped, "group", "drop", signal=task)
    assert judged.zero_variance.tolist() == [True, False]
    assert np.all(judged.weight[0] == 0) and np.all(judged.advantages[0] == 0)
    assert np.all(judged.advantages[1] == advantages.compute(shaped, "group", "drop").advantages[1])
    assert not advantages.compute(shaped, "group", "drop").zero_variance[0]  # without it: kept
