"""A ~480M-parameter (~180M active) 7:1 hybrid MoE for one GPU (bf16 compute, fp32 params).

16 layers (2 x [7 lightning + 1 softmax]), 8 experts top-2, byte tokenizer on the task corpus by
default; point `data.source` / `data.tokenizer` at your own files for real text.
"""

from m1jax.config import m1_layer_types
from m1jax.train.config import base_config


def get_config():
    c = base_config()
    layers = 16
    c.model.update(
        preset="small",
        vocab_size=264,
        hidden_size=1024,
        num_hidden_layers=layers,
        attn_type_list=m1_layer_types(layers, 8),
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        rotary_dim=32,
        intermediate_size=1024,
        num_local_experts=8,
        num_experts_per_tok=2,
        block_size=128,
        remat="dots_no_batch",
        dtype="auto",
    )
    c.steps = 20_000
    c.batch_size = 64
    c.seq_len = 2048
    c.learning_rate = 1e-3
    c.warmup_steps = 1_000
    c.schedule = "wsd"
    c.log_every = 50
    c.eval_every = 1_000
    c.checkpoint_every = 1_000
    c.data.num_train_docs = 2_000_000
    c.data.num_eval_docs = 2_000
    return c
