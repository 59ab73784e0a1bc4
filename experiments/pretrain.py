"""Pretrain an M1-style hybrid MoE model.

    python -m experiments.pretrain [--config configs/pretrain_tiny.py] [--workdir DIR] [--config.steps=500 ...]

Without --config it runs the embedded default (configs/pretrain_tiny.py: a small 7:1 hybrid MoE on
the generated reasoning-task corpus, ~10 minutes on a 2-core CPU). Re-running with the same
--workdir resumes from the last checkpoint; on a finished run it says so (a larger
--config.steps extends it). A bad config or an expected failure is one `error:` line, exit 1;
the full log is in WORKDIR/run.log.
"""

from __future__ import annotations

import os

from experiments import cli

_CONFIG, _WORKDIR, _PROGRESS = cli.run_flags(
    "pretrain_tiny.py", "runs/pretrain", "checkpoints, metrics.jsonl, TensorBoard events, samples"
)


def main(argv) -> None:
    del argv
    summary = cli.train("m1jax.train.loop:train", _CONFIG.value, _WORKDIR.value, _PROGRESS.value)
    report(summary, _WORKDIR.value)


def report(summary: dict, workdir: str) -> None:
    import jax

    if summary["stopped_by"]:
        print(f"stopped by {summary['stopped_by']} at step {summary['end_step']}; checkpoint saved in {workdir}")
        return
    loss = summary.get("last_loss")
    loss_text = "n/a" if loss is None else f"{loss:.4f}"
    if summary.get("complete"):
        print(
            f"the run in {workdir} is already complete at step {summary['end_step']} (loss {loss_text}); "
            f"results in {os.path.join(workdir, 'metrics.jsonl')}, summary.json and samples.jsonl. "
            "Raise --config.steps to train further."
        )
    else:
        print(f"trained to step {summary['end_step']}: loss {loss_text}; workdir {workdir}")
    if jax.process_index() != 0:  # the samples are the same on every process: shown once, by the first
        return
    for r in summary.get("samples", [])[:6]:
        mark = "ok " if r["reward"] == 1.0 else "bad"
        print(f"[{mark}] {r['prompt'].strip()}  ->  {r['completion'].strip()}   (answer {r['answer']})")
    if summary.get("sample_accuracy") is not None:
        n = len(summary["samples"])
        print(f"held-out greedy accuracy: {summary['sample_accuracy']:.1%} of {n} prompts")


if __name__ == "__main__":
    cli.launch(main)
