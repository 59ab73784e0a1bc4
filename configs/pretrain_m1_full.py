"""The exact MiniMax-M1 architecture (456B parameters, 45.9B active) at 32K context, for a TPU v5p slice.

The model section is `m1jax.config.minimax_m1()` (plus implementation choices: full remat, an
expert all-to-all capacity of 1.25x the balanced load); the tokenizer should be the real MiniMax
one (`data.tokenizer=/path/to/tokenizer.json`, vocab 200064). The mesh fits a 256-chip v5p slice
(topology 4x8x8): experts over `expert` (8 x 4 experts), each 32K row over `sequence` (4 x 8K
tokens, LASP-2 in the lightning layers), the rest FSDP. Global batch 128 x 32K = 4M tokens in 2
micro-batches. Check a slice before renting it:

    python -m experiments.aot --config configs/pretrain_m1_full.py --topology v5p:4x8x8

(README, "Scale-out: full M1 ahead of time", has the per-chip memory it reports.)
"""

from m1jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.update(preset="minimax_m1", remat="full", moe_capacity_factor=1.25)
    c.steps = 100_000
    c.batch_size = 128
    c.seq_len = 32768
    c.micro_batches = 2
    c.loss_chunk = 2048  # one 32K row's fp32 logits over 200K tokens would be 26 GB
    c.optim.update(learning_rate=2e-4, warmup_steps=2_000, schedule="wsd", eps=1e-15)
    c.log.every = 10
    c.eval.every = 1_000
    c.checkpoint.every = 500
    c.mesh.update(data=1, fsdp=-1, expert=8, tensor=1, sequence=4)
    return c
