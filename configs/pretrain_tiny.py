"""The embedded default: the `mini` preset (3.8M parameters, 2.2M active; 8 layers, 7:1 hybrid MoE)
on the generated reasoning-task corpus. About 10 minutes on a 2-core CPU.

Override any field from the command line, e.g. `--config.steps=1000 --config.model.hidden_size=256`.
"""

from m1jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.preset = "mini"
    c.update(steps=500, batch_size=8, seq_len=256)
    c.optim.update(learning_rate=3e-3, warmup_steps=25)
    c.eval.update(every=100, num_samples=32)
    c.log.every, c.checkpoint.every = 10, 100
    return c
