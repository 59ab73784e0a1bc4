"""Lightning attention: causal linear attention with a fixed per-head exponential decay."""

from m1jax.kernels.lightning.reference import (
    decode_step,
    lightning_chunked,
    lightning_recurrence,
    run_ids,
)

__all__ = ["decode_step", "lightning_chunked", "lightning_recurrence", "run_ids"]
