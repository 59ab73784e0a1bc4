"""The `medium` preset (480M parameters, 180M active; 16 layers, 8 experts top-2) for one GPU:
bf16 compute, fp32 parameters, the byte tokenizer on the task corpus by default; point
`data.source` / `data.tokenizer` at your own files for real text.
"""

from m1jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.preset = "medium"
    c.update(steps=20_000, batch_size=64, seq_len=2048)
    c.optim.update(learning_rate=1e-3, warmup_steps=1_000, schedule="wsd")
    c.log.every, c.eval.every, c.checkpoint.every = 50, 1_000, 1_000
    c.data.update(num_train_docs=2_000_000, num_eval_docs=2_000)
    return c
