"""CISPO on the embedded reasoning tasks, starting from the tiny pretrained model.

    python -m experiments.pretrain --workdir runs/pretrain
    python -m experiments.cispo --config configs/cispo_tiny.py --workdir runs/cispo --config.init_from=runs/pretrain

The model, tokenizer and parameters come from the pretraining workdir. About 10 minutes on a
2-core CPU (150 steps of ~3.5 s, and 4 held-out evaluations of 256 prompts).
"""

from rl.config import base_config


def get_config():
    c = base_config()
    c.init_from = "runs/pretrain"
    c.data.source = "tasks"
    # The tasks where the tiny model's samples disagree within a group (copy: ~78% of groups, reverse:
    # ~63% at temperature 1), i.e. where group-relative advantages carry signal. Arithmetic is mostly
    # all-wrong (mul: pass@8 = 0), so it only dilutes the batch.
    c.data.tasks = ("copy", "reverse")
    c.reward = "task"
    c.steps = 150
    c.prompts_per_step = 16
    c.samples_per_prompt = 8
    c.updates_per_rollout = 4
    c.max_new_tokens = 64
    c.learning_rate = 5e-5  # 3e-4 collapses the pretrained policy (KL > 1 within a step)
    c.eval_every = 50
    c.eval_prompts = 256  # paired standard errors of before / after are ~2-3 points
    c.checkpoint_every = 50
    return c
