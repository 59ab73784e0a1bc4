"""An asynchronous RL run killed with SIGKILL resumes with no batch lost or repeated.

This file is also the driver of the killed run:
    python tests/test_rl_faults.py WORKDIR OVERRIDES_JSON KILL_AT
runs `rl.loop.train` on `small_toy(overrides)` and SIGKILLs itself when the learner asks for the
batch of step KILL_AT (the rollout thread is then sampling later batches, and the last checkpoint's
asynchronous save may still be in flight).
"""

import json
import os
import signal
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OVERRIDES = {"steps": 6, "rl.max_staleness": 1, "rl.old_logp": "sampler", "checkpoint.every": 2, "eval.every": 100}


def _drive(workdir: str, overrides: str, kill_at: int) -> None:
    sys.path.insert(0, HERE)
    from test_rl_train import small_toy

    import conftest  # noqa: F401 (the tests' XLA flags and platform)
    from rl import worker
    from rl.loop import train

    get = worker.RolloutWorker.get

    def dying_get(self, step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return get(self, step)

    worker.RolloutWorker.get = dying_get
    train(small_toy(json.loads(overrides)), workdir, progress=False)


def _values(workdir):
    from test_rl_train import rows

    from rl.loop import TIMINGS  # (imported late: this file is also a driver)

    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows(workdir, "loss")]


@pytest.mark.slow
def test_sigkill_mid_run_resumes_the_uninterrupted_rows(tmp_path):
    from test_rl_train import small_toy

    from rl.loop import train

    full = train(small_toy(OVERRIDES), str(tmp_path / "full"), progress=False)
    wd = str(tmp_path / "killed")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, __file__, wd, json.dumps(OVERRIDES), "5"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert os.listdir(os.path.join(wd, "rollouts"))  # the batches sampled by versions a checkpoint cannot recreate
    resumed = train(small_toy(OVERRIDES), wd, progress=False)
    assert resumed["start_step"] in (2, 4) and resumed["end_step"] == 6
    a, b = _values(tmp_path / "full"), _values(wd)
    assert [r["step"] for r in b] == list(range(1, 7))  # rows past the checkpoint are superseded, none twice
    assert a == b
    assert resumed["final"] == full["final"]


if __name__ == "__main__":
    _drive(sys.argv[1], sys.argv[2], int(sys.argv[3]))
