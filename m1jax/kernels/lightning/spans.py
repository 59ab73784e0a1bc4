"""How the GPU kernels cut a sequence into spans, and the states that enter each span (SPEC 4).

Both GPU kernels (`pallas_triton`, `pallas_mgpu`) run chunk-parallel: each span's end state from a
zero start, then this R x R contraction per head gives the state entering every span (LASP-2 form,
terms across a document boundary masked to zero), then each span replays its blocks.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_F32 = jnp.float32
MAX_BLOCK = 64  # chunk length cap: [C, C] scores and the [Dk, bv] state live in registers
TARGET_PROGRAMS = 512  # ~4 waves of programs on a 132-SM H100


def plan(b: int, h: int, t: int, dv: int, block_size: int, spans: int | None = None) -> tuple[int, int, int, int]:
    """(C, blocks per span, spans R, bv): enough programs to fill the device, no more."""
    c = min(block_size, MAX_BLOCK, max(16, pl.next_power_of_2(t)))
    nb = -(-t // c)
    bv = 64 if dv % 64 == 0 else dv
    if spans is None:
        spans = -(-TARGET_PROGRAMS // (b * h * (dv // bv)))
    r = min(nb, max(1, spans))
    per_span = -(-nb // r)
    r = -(-nb // per_span)
    return c, per_span, r, bv


def cross_span(ds, slopes, h0, runs, t, span_len):
    """From the end states ds of spans 0..R-1 [B, H, R, Dk, Dv] (each from a zero start), the states
    entering spans 0..R: [B, H, R + 1, Dk, Dv] fp32 (SPEC 4). The kernels pass all spans but the
    last, so row R is the state entering the last span."""
    b, h, r = ds.shape[:3]
    ends = jnp.minimum(span_len * (jnp.arange(r) + 1), t) - 1  # last valid token of span j
    before = jnp.concatenate([jnp.array([-1]), ends])  # token before span r (row R: the last token)
    s = slopes.astype(_F32)[None, :, None, None]
    dist = (before[:, None] - ends[None, :]).astype(_F32)  # [R+1, R]
    ok = jnp.arange(r)[None, :] < jnp.arange(r + 1)[:, None]  # j < r
    ok0 = jnp.arange(r + 1) > 0
    if runs is not None:
        run_end = runs[:, ends]  # [B, R]
        run_before = runs[:, jnp.maximum(before, 0)]  # [B, R+1]
        ok = ok[None] & (run_end[:, None, :] == run_before[:, :, None])  # [B, R+1, R]
        ok0 = ok0[None] & (run_before == runs[:, :1])  # [B, R+1]
        ok, ok0 = ok[:, None], ok0[:, None]  # broadcast over heads
    coef = jnp.exp(jnp.where(ok, -s * dist, -jnp.inf))  # [B|1, H, R+1, R]
    coef0 = jnp.exp(jnp.where(ok0, -s[..., 0] * (before + 1).astype(_F32), -jnp.inf))  # [B|1, H, R+1]
    coef0 = jnp.where(jnp.arange(r + 1) == 0, 1.0, coef0)
    coef = jnp.broadcast_to(coef, (b, h, r + 1, r))
    states = jnp.einsum("bhrj,bhjkv->bhrkv", coef, ds, precision=lax.Precision.HIGHEST)
    return states + coef0[..., None, None] * h0[:, :, None]
