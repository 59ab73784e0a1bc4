"""Lightning attention forward as a Mosaic TPU Pallas kernel.

Grid (B, H, T / C): the chunk axis is sequential ("arbitrary") and carries the fp32 state
[Dk, Dv] in a VMEM scratch buffer, so HBM sees q, k, v once and o once. B and H are "parallel"
(megacore splits them across TensorCores). Blocks are [C, D] tiles of head-major arrays, so the
(8, 128) tiling holds for C a multiple of 128 (or C = T) and any D. The backward is three calls of
this forward (`vjp.py`).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from m1jax.kernels.lightning import block

_F32 = jnp.float32


def _kernel(t_total, c, segmented, slopes_ref, q_ref, k_ref, v_ref, h0_ref, *refs):
    if segmented:
        ids_col_ref, ids_row_ref, prev_col_ref, o_ref, sf_ref, state_ref = refs
    else:
        o_ref, sf_ref, state_ref = refs
    head, n = pl.program_id(1), pl.program_id(2)

    @pl.when(n == 0)
    def _():
        state_ref[...] = h0_ref[...]

    slope = slopes_ref[head]
    m = jnp.minimum(c, t_total - n * c).astype(jnp.int32)
    mk = block.masks(ids_col_ref[...], ids_row_ref[...], prev_col_ref[...]) if segmented else None
    q, k, v, state = q_ref[...], k_ref[...], v_ref[...], state_ref[...]
    o_ref[...] = block.block_output(q, k, v, state, slope, mk).astype(o_ref.dtype)
    state = block.block_state(k, v, state, slope, m, mk)
    state_ref[...] = state

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        sf_ref[...] = state


def chunk_size(t: int, block_size: int, interpret: bool = False) -> int:
    """Chunk length: T rounded up to 16 rows when the sequence fits one block, else `block_size`
    rounded up to the 128-lane tile (Mosaic needs it for the [1, C] id rows; interpret mode does not).
    """
    if t <= block_size:
        return -(-t // 16) * 16
    return block_size if interpret else -(-block_size // 128) * 128


@partial(jax.jit, static_argnames=("block_size", "interpret"))
def forward(q, k, v, slopes, h0, runs, *, block_size: int = 256, interpret: bool = False):
    """Head-major forward: q, k [B, H, T, Dk], v [B, H, T, Dv], slopes [H], h0 fp32 [B, H, Dk, Dv],
    runs int32 [B, T] (non-decreasing run ids) or None. Returns (o [B, H, T, Dv], final fp32 state)."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    c = chunk_size(t, block_size, interpret)
    nb = -(-t // c)
    pad = nb * c - t
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
    tile = lambda d: pl.BlockSpec((None, None, c, d), lambda bi, hi, ni: (bi, hi, ni, 0))
    state = pl.BlockSpec((None, None, dk, dv), lambda bi, hi, ni: (bi, hi, 0, 0))
    in_specs = [pl.BlockSpec(memory_space=pltpu.SMEM), tile(dk), tile(dk), tile(dv), state]
    args = [slopes.astype(_F32), q, k, v, h0.astype(_F32)]
    segmented = runs is not None
    if segmented:
        runs = jnp.pad(runs.astype(jnp.int32), ((0, 0), (0, pad)), mode="edge")
        prev = jnp.concatenate([runs[:, :1], runs[:, :-1]], axis=1)  # id of the token before
        col = pl.BlockSpec((None, c, 1), lambda bi, hi, ni: (bi, ni, 0))
        row = pl.BlockSpec((None, 1, c), lambda bi, hi, ni: (bi, 0, ni))
        in_specs += [col, row, col]
        args += [runs[:, :, None], runs[:, None, :], prev[:, :, None]]
    flops = 2 * b * h * nb * c * (c * (dk + dv) + 2 * dk * dv)
    nbytes = sum(x.size * x.dtype.itemsize for x in (q, k, v)) + b * h * nb * c * dv * q.dtype.itemsize
    o, final = pl.pallas_call(
        partial(_kernel, t, c, segmented),
        grid=(b, h, nb),
        in_specs=in_specs,
        out_specs=[tile(dv), state],
        out_shape=[jax.ShapeDtypeStruct((b, h, nb * c, dv), q.dtype), jax.ShapeDtypeStruct((b, h, dk, dv), _F32)],
        scratch_shapes=[pltpu.VMEM((dk, dv), _F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=b * h * nb * c * c, bytes_accessed=nbytes),
        interpret=interpret,
        name="lightning_fwd_tpu",
    )(*args)
    return o[:, :, :t], final
