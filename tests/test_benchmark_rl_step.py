"""experiments/benchmarks/rl_step.py in --quick mode. TRL is not a test dependency: without it
(the test venv, CI) this test is skipped; run it where trl is installed beside m1jax."""

import json
import sys

import pytest

pytest.importorskip("trl", reason="the RL step benchmark compares against TRL, which is not installed")


@pytest.mark.slow
def test_rl_step_benchmark_quick_mode(tmp_path, monkeypatch):
    from experiments.benchmarks import rl_step

    out = tmp_path / "rl_step.json"
    monkeypatch.setattr(sys, "argv", ["rl_step", "--quick", "--out", str(out)])
    rl_step.main()
    r = json.loads(out.read_text())
    assert r["parity"]["max_abs_logp_diff"] < 1e-4  # both sides start from the same function
    assert r["shape"]["rows"] == 16 and r["shape"]["updates_per_rollout"] == 2
    for side in ("m1jax", "trl"):
        assert len(r[side]["times_s"]) == r["warmup"] + r["steps"]
        assert r[side]["step_s"] > 0
    assert set(r["m1jax"]["phases_s"]) >= {"gen_time_s", "reward_time_s", "logprob_time_s", "update_time_s"}
    assert len(r["trl"]["optimizer_step_times_s"]) == 2 * (r["warmup"] + r["steps"])
    assert r["ratio"] > 0
