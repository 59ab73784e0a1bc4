"""From-scratch CISPO toy: copy a 4-digit string, reward = fraction of correct positions.

The `toy` preset (2 layers: 1 lightning + 1 softmax, MoE) over a 14-token digit vocabulary, no
pretraining: about a minute on a 2-core CPU, and the end-to-end test of the RL stack.
"""

from rl.config import base_config


def get_config():
    c = base_config()
    c.model.preset = "toy"
    c.data.source = "toy_copy"
    c.data.toy_length = 4
    c.steps = 90
    c.optim.learning_rate = 3e-3
    c.optim.eps = 1e-8  # from scratch the gradients are not tiny; M1's 1e-15 is for fine-tuning
    c.eval.update(every=30, prompts=64)
    c.checkpoint.every = 30
    c.rl.update(reward="positions", prompts_per_step=32, samples_per_prompt=8, updates_per_rollout=2)
    c.rl.sampling.max_new_tokens = 4
    return c
