"""Lightning attention forward on the Triton backend (any CUDA GPU; Hopper gets `pallas_mgpu.py`): chunk-parallel.

M1 under tensor parallelism runs 8 heads per device at batch 1, far fewer (b, h) pairs than SMs. So
the sequence is cut into R spans of L tokens (L a multiple of the block C), chosen so that
B * H * R * (Dv / bv) programs cover the device, and the work runs in three phases:

1. `_span_state_kernel`, grid (B, H, R-1, Dv/bv): each span's own end state from a zero start
   (blocks of C tokens in a loop, state [Dk, bv] in registers), for all spans but the last; skipped
   when R = 1. Reads k, v once.
2. A tiny jnp contraction across spans (R x R per head): the state entering span r is
   sum_{j<r} lambda^(end_{r-1} - end_j) dS_j + lambda^(end_{r-1}+1) h0 (SPEC 4, LASP-2), with the
   terms that cross a document boundary masked to zero.
3. `_span_output_kernel`, grid (B, H, R, Dv/bv): each span replays its blocks from its incoming
   state and writes the outputs; the last span's end state is the final state. Reads q, k, v once.

Written in backend-neutral Pallas (refs, `pl.ds`, `dot_general`), lowered by the Triton backend; the
per-block math is `block.py`, shared with the TPU kernel. The backward is three calls (`vjp.py`).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from m1jax.kernels.lightning import block
from m1jax.kernels.lightning.spans import cross_span, plan

_F32 = jnp.float32


def _compiler_params():
    try:
        from jax.experimental.pallas import triton as pltr

        return pltr.CompilerParams(num_warps=4, num_stages=2)
    except (ImportError, AttributeError):  # pragma: no cover - jax without the Triton backend
        return None


def _loop_blocks(t_total, c, n_blocks, slopes_ref, ids_ref, prev_ref, fn, init):
    """fori_loop over this program's span, one block of C tokens per step.

    Calls fn(rows, m, slope, masks, carry): rows = the block's `pl.ds` in the span, m = its valid
    tokens (0 past the end of the sequence), masks = `block.Masks` or None without segment ids.
    """
    slope = slopes_ref[pl.program_id(1)]
    span = pl.program_id(2) * (n_blocks * c)

    def body(i, carry):
        start = i * c
        rows = pl.ds(start, c)
        m = jnp.clip(t_total - (span + start), 0, c).astype(jnp.int32)
        mk = None
        if ids_ref is not None:
            ids = ids_ref[rows]
            mk = block.masks(ids[:, None], ids[None, :], prev_ref[rows][:, None])
        return fn(rows, m, slope, mk, carry)

    return lax.fori_loop(0, n_blocks, body, init)


def _span_state_kernel(t_total, c, n_blocks, segmented, slopes_ref, k_ref, v_ref, *refs):
    ids_ref, prev_ref, ds_ref = refs if segmented else (None, None, refs[0])

    def step(rows, m, slope, mk, state):
        return block.block_state(k_ref[rows, :], v_ref[rows, :], state, slope, m, mk)

    init = jnp.zeros(ds_ref.shape, _F32)
    ds_ref[...] = _loop_blocks(t_total, c, n_blocks, slopes_ref, ids_ref, prev_ref, step, init)


def _span_output_kernel(t_total, c, n_blocks, segmented, slopes_ref, q_ref, k_ref, v_ref, s_ref, *refs):
    ids_ref, prev_ref, o_ref, fin_ref = refs if segmented else (None, None, *refs)

    def step(rows, m, slope, mk, state):
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        o_ref[rows, :] = block.block_output(q, k, v, state, slope, mk).astype(o_ref.dtype)
        return block.block_state(k, v, state, slope, m, mk)

    fin_ref[...] = _loop_blocks(t_total, c, n_blocks, slopes_ref, ids_ref, prev_ref, step, s_ref[...])


@partial(jax.jit, static_argnames=("block_size", "spans", "interpret"))
def forward(q, k, v, slopes, h0, runs, *, block_size: int = 64, spans: int | None = None, interpret: bool = False):
    """Head-major forward: q, k [B, H, T, Dk], v [B, H, T, Dv], slopes [H], h0 fp32 [B, H, Dk, Dv],
    runs int32 [B, T] (non-decreasing run ids) or None. Returns (o [B, H, T, Dv], final fp32 state).

    spans: number of sequence spans R (None: enough to fill the device, see `plan`)."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    c, per_span, r, bv = plan(b, h, t, dv, block_size, spans)
    span_len = per_span * c
    pad = r * span_len - t
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
    grid = (b, h, r, dv // bv)
    span = lambda d: pl.BlockSpec((None, None, span_len, d), lambda bi, hi, ri, vi: (bi, hi, ri, 0))
    span_v = pl.BlockSpec((None, None, span_len, bv), lambda bi, hi, ri, vi: (bi, hi, ri, vi))
    state = pl.BlockSpec((None, None, None, dk, bv), lambda bi, hi, ri, vi: (bi, hi, ri, 0, vi))
    whole = pl.BlockSpec(slopes.shape, lambda *_: (0,))
    segmented = runs is not None
    extra_specs, extra = [], []
    if segmented:
        runs = runs.astype(jnp.int32)
        padded = jnp.pad(runs, ((0, 0), (0, pad)), mode="edge")
        prev = jnp.concatenate([padded[:, :1], padded[:, :-1]], axis=1)
        ids_spec = pl.BlockSpec((None, span_len), lambda bi, hi, ri, vi: (bi, ri))
        extra_specs, extra = [ids_spec, ids_spec], [padded, prev]
    slopes = slopes.astype(_F32)
    common = dict(compiler_params=_compiler_params(), interpret=interpret)
    h0 = h0.astype(_F32)
    if r > 1:  # end states of all spans but the last; the output kernel ends the last one
        ds = pl.pallas_call(
            partial(_span_state_kernel, t, c, per_span, segmented),
            grid=(b, h, r - 1, dv // bv),
            in_specs=[whole, span(dk), span_v] + extra_specs,
            out_specs=state,
            out_shape=jax.ShapeDtypeStruct((b, h, r - 1, dk, dv), _F32),
            name="lightning_span_states",
            **common,
        )(slopes, k, v, *extra)
        states = cross_span(ds, slopes, h0, runs, t, span_len)  # [B, H, R, Dk, Dv]: entering each span
    else:  # one span: no state pass, k and v are read once
        states = h0[:, :, None]
    o, fin = pl.pallas_call(
        partial(_span_output_kernel, t, c, per_span, segmented),
        grid=grid,
        in_specs=[whole, span(dk), span(dk), span_v, state] + extra_specs,
        out_specs=[span_v, state],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, r * span_len, dv), q.dtype),
            jax.ShapeDtypeStruct((b, h, r, dk, dv), _F32),
        ],
        name="lightning_span_outputs",
        **common,
    )(slopes, q, k, v, states, *extra)
    return o[:, :, :t], fin[:, :, r - 1]
