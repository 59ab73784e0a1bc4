"""The embedded default: a ~2M-parameter 7:1 hybrid MoE on the generated reasoning-task corpus.

About 10 minutes on a 2-core CPU. Override any field from the command line, e.g.
`--config.steps=1000 --config.model.hidden_size=256`.
"""

from m1jax.config import m1_layer_types
from m1jax.train.config import base_config


def get_config():
    c = base_config()
    layers = 8
    c.model.update(
        preset="small",
        vocab_size=264,  # the byte tokenizer's 261 ids, rounded up
        hidden_size=128,
        num_hidden_layers=layers,
        attn_type_list=m1_layer_types(layers, 8),  # 7 lightning + 1 softmax
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rotary_dim=16,
        intermediate_size=256,
        num_local_experts=4,
        num_experts_per_tok=2,
        block_size=32,
        remat="none",
        dtype="auto",
    )
    c.steps = 500
    c.batch_size = 8
    c.seq_len = 256
    c.learning_rate = 3e-3
    c.warmup_steps = 25
    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 100
    c.num_samples = 32
    return c
