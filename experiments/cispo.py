"""Post-train with CISPO (or GRPO / DAPO / GSPO) on verifiable rewards.

    python -m experiments.cispo --config configs/cispo_tiny.py --workdir runs/cispo \
        --config.rl.init_from=runs/pretrain [--config.rl.loss=cispo|grpo|dapo|gspo] [--config.steps=...]

configs/cispo_toy.py trains a small model from scratch on a digit-copy toy in about a minute.
Re-running with the same --workdir resumes from the last checkpoint; on a finished run it says
so. A bad config or an expected failure is one `error:` line, exit 1; the log is WORKDIR/run.log.
"""

from __future__ import annotations

import os

from experiments import cli

_CONFIG, _WORKDIR, _PROGRESS = cli.run_flags(
    "cispo_toy.py", "runs/cispo", "checkpoints, metrics.jsonl, TensorBoard events"
)


def main(argv) -> None:
    del argv
    summary = cli.train("rl.loop:train", _CONFIG.value, _WORKDIR.value, _PROGRESS.value)
    report(summary, _WORKDIR.value)


def report(summary: dict, workdir: str) -> None:
    if summary["stopped_by"]:
        print(f"stopped by {summary['stopped_by']} at step {summary['end_step']}; checkpoint saved in {workdir}")
        return
    before, after = summary.get("initial"), summary["final"]

    def line(m):
        sampled = m.get("eval_sampled_accuracy")
        extra = "" if sampled is None else f", sampled accuracy {sampled:.1%}"
        return f"greedy accuracy {m['eval_accuracy']:.1%}, mean reward {m['eval_reward']:.3f}{extra}"

    if summary.get("complete"):
        print(
            f"the run in {workdir} is already complete at step {summary['end_step']}; results in "
            f"{os.path.join(workdir, 'metrics.jsonl')} and summary.json. Raise --config.steps to train further."
        )
    if before:
        print(f"held-out before: {line(before)}")
    print(f"held-out after {summary['end_step']} steps: {line(after)}; workdir {workdir}")
    names = {"eval_accuracy": "greedy accuracy", "eval_sampled_accuracy": "sampled accuracy", "eval_reward": "reward"}
    for k, name in names.items():  # paired over the same held-out prompts
        if (d := summary.get("change", {}).get(k)) is not None:
            print(f"change in {name}: {d['delta']:+.4f} ± {d['se']:.4f} (paired s.e. over prompts, z = {d['z']:.1f})")


if __name__ == "__main__":
    cli.launch(main)
