"""From-scratch CISPO toy: copy a 4-digit string, reward = fraction of correct positions.

A 2-layer hybrid (1 lightning + 1 softmax, MoE) with a 14-token digit vocabulary, no pretraining:
about a minute on a 2-core CPU, and the end-to-end test of the RL stack.
"""

from rl.config import base_config


def get_config():
    c = base_config()
    c.model.update(
        preset="tiny",
        vocab_size=16,
        hidden_size=64,
        num_hidden_layers=2,
        attn_type_list=(0, 1),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rotary_dim=16,
        intermediate_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        block_size=8,
        dtype="float32",
        remat="none",
    )
    c.data.source = "toy_copy"
    c.data.toy_length = 4
    c.reward = "positions"
    c.max_new_tokens = 4
    c.steps = 90
    c.prompts_per_step = 32
    c.samples_per_prompt = 8
    c.updates_per_rollout = 2
    c.learning_rate = 3e-3
    c.eps = 1e-8  # from scratch the gradients are not tiny; M1's 1e-15 is for fine-tuning
    c.eval_every = 30
    c.eval_prompts = 64
    c.checkpoint_every = 30
    return c
