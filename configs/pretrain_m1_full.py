"""The exact MiniMax-M1 architecture (456B parameters, 45.9B active), for a TPU pod slice.

The model section is `m1jax.config.minimax_m1()` unchanged; the tokenizer should be the real
MiniMax one (`data.tokenizer=/path/to/tokenizer.json`, vocab 200064). The mesh below is a
starting point for a v5p-512-class slice; the scale-out work (expert / sequence parallelism,
`experiments.aot`) makes this config run.
"""

from m1jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.update(preset="minimax_m1", remat="full")
    c.steps = 100_000
    c.batch_size = 512
    c.seq_len = 8192
    c.micro_batches = 1
    c.learning_rate = 2e-4
    c.warmup_steps = 2_000
    c.schedule = "wsd"
    c.eps = 1e-15
    c.log_every = 10
    c.eval_every = 1_000
    c.checkpoint_every = 500
    c.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
    return c
