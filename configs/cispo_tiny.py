"""CISPO on the embedded reasoning tasks, starting from the pretrained embedded default.

    python -m experiments.pretrain --workdir runs/pretrain
    python -m experiments.cispo --config configs/cispo_tiny.py --workdir runs/cispo --config.rl.init_from=runs/pretrain

The model, tokenizer and parameters come from the pretraining workdir. About 10 minutes on a
2-core CPU (150 steps of ~3.5 s, and 4 held-out evaluations of 256 prompts).
"""

from rl.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tasks"
    # The tasks where the tiny model's samples disagree within a group (copy: ~78% of groups, reverse:
    # ~63% at temperature 1), i.e. where group-relative advantages carry signal. Arithmetic is mostly
    # all-wrong (mul: pass@8 = 0), so it only dilutes the batch.
    c.data.tasks = ("copy", "reverse")
    c.steps = 150
    c.optim.learning_rate = 5e-5  # 3e-4 collapses the pretrained policy (KL > 1 within a step)
    c.eval.update(every=50, prompts=256)  # paired standard errors of before / after are ~2-3 points
    c.checkpoint.every = 50
    c.rl.update(init_from="runs/pretrain", reward="task", prompts_per_step=16, samples_per_prompt=8)
    c.rl.update(updates_per_rollout=4)
    c.rl.sampling.max_new_tokens = 64
    return c
