"""Pretrain an M1-style hybrid MoE model.

    python -m experiments.pretrain [--config configs/pretrain_tiny.py] [--workdir DIR] [--config.steps=500 ...]

Without --config it runs the embedded default (configs/pretrain_tiny.py: a small 7:1 hybrid MoE on
the generated reasoning-task corpus, ~10 minutes on a 2-core CPU). Re-running with the same
--workdir resumes from the last checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "pretrain_tiny.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/pretrain", "checkpoints, metrics.jsonl, TensorBoard events, samples")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
    from m1jax import distributed
    from m1jax.train.loop import train  # after flag parsing: keeps --help fast

    try:
        distributed.initialize()  # multi-host jobs (launch/): before any JAX work
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    try:
        summary = train(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)
    except ValueError as e:  # config / data errors: a clear message, no traceback
        raise SystemExit(f"error: {e}") from None
    if summary["stopped_by"]:
        print(f"stopped by {summary['stopped_by']} at step {summary['end_step']}; checkpoint saved in {_WORKDIR.value}")
        return
    print(f"trained to step {summary['end_step']}: loss {summary['last_loss']:.4f}; workdir {_WORKDIR.value}")
    import jax

    if jax.process_index() != 0:  # the samples are the same on every process: shown once, by the first
        return
    for r in summary.get("samples", [])[:6]:
        mark = "ok " if r["reward"] == 1.0 else "bad"
        print(f"[{mark}] {r['prompt'].strip()}  ->  {r['completion'].strip()}   (answer {r['answer']})")
    if summary.get("sample_accuracy") is not None:
        n = len(summary["samples"])
        print(f"held-out greedy accuracy: {summary['sample_accuracy']:.1%} of {n} prompts")


if __name__ == "__main__":
    from m1jax import host

    host.reexec_with_hugepages()  # first: glibc reads its tunables at start-up
    app.run(main)
