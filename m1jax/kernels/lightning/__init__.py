"""Lightning attention: causal linear attention with a fixed per-head exponential decay.

reference.py (recurrence and blocked jnp form), block.py (per-block math traced by the kernels),
pallas_tpu.py, pallas_mgpu.py (Mosaic GPU, Hopper) and pallas_triton.py (kernels), vjp.py
(backward as three forward calls), *_test.py.
"""

from m1jax.kernels.lightning.reference import (
    decode_step,
    lightning_chunked,
    lightning_recurrence,
    run_ids,
)
from m1jax.kernels.lightning.vjp import lightning_vjp

__all__ = ["decode_step", "lightning_chunked", "lightning_recurrence", "lightning_vjp", "run_ids"]
