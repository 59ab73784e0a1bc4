"""Post-train with CISPO (or GRPO / DAPO / GSPO) on verifiable rewards.

    python -m experiments.cispo --config configs/cispo_tiny.py --workdir runs/cispo \
        --config.init_from=runs/pretrain [--config.loss=cispo|grpo|dapo|gspo] [--config.steps=...]

configs/cispo_toy.py trains a small model from scratch on a digit-copy toy in about a minute.
Re-running with the same --workdir resumes from the last checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "cispo_toy.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/cispo", "checkpoints, metrics.jsonl, TensorBoard events")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from m1jax import distributed
    from rl.loop import train  # after flag parsing: keeps --help fast

    try:
        distributed.initialize()  # multi-host jobs (launch/): before any JAX work
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    try:
        summary = train(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)
    except ValueError as e:  # config errors: a clear message, no traceback
        raise SystemExit(f"error: {e}") from None
    if summary["stopped_by"]:
        print(f"stopped by {summary['stopped_by']} at step {summary['end_step']}; checkpoint saved in {_WORKDIR.value}")
        return
    before, after = summary.get("initial"), summary["final"]

    def line(m):
        sampled = m.get("eval_sampled_accuracy")
        extra = "" if sampled is None else f", sampled accuracy {sampled:.1%}"
        return f"greedy accuracy {m['eval_accuracy']:.1%}, mean reward {m['eval_reward']:.3f}{extra}"

    if before:
        print(f"held-out before: {line(before)}")
    print(f"held-out after {summary['end_step']} steps: {line(after)}; workdir {_WORKDIR.value}")
    names = {"eval_accuracy": "greedy accuracy", "eval_sampled_accuracy": "sampled accuracy", "eval_reward": "reward"}
    for k, name in names.items():  # paired over the same held-out prompts
        if (d := summary.get("change", {}).get(k)) is not None:
            print(f"change in {name}: {d['delta']:+.4f} ± {d['se']:.4f} (paired s.e. over prompts, z = {d['z']:.1f})")


if __name__ == "__main__":
    from m1jax import host

    host.reexec_with_hugepages()  # first: glibc reads its tunables at start-up
    app.run(main)
