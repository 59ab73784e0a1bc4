"""CISPO with a calculator: multi-turn tool episodes on the `calc` task, from `pretrain_tools`.

    python -m experiments.pretrain --config configs/pretrain_tools.py --workdir runs/pretrain_tools
    python -m experiments.cispo --config configs/cispo_tools.py --workdir runs/cispo_tools

The pretrained model calls the calculator in about half its answers and multiplies in its head in
the rest, where it is mostly wrong: the reward (exact answer) teaches it to call the tool. An
episode is at most 2 model turns and 128 tokens (call, tool output and answer together).
"""

from rl.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tasks"
    c.data.tasks = ("calc",)
    c.steps = 30
    c.optim.learning_rate = 5e-5
    c.eval.update(every=15, prompts=256)
    c.checkpoint.every = 15
    c.rl.update(init_from="runs/pretrain_tools", reward="task", prompts_per_step=16, samples_per_prompt=8)
    c.rl.update(updates_per_rollout=4)
    c.rl.sampling.max_new_tokens = 128
    c.rl.env.update(name="tools", tools="calculator", max_turns=2, timeout_s=5.0)
    return c
