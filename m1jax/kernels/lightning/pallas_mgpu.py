"""Lightning attention forward for Hopper GPUs in Mosaic GPU: TMA loads, wgmma on tensor cores.

Same chunk-parallel plan as the Triton kernel (`pallas_triton.py`), so B x H = 8 still fills the
device: the sequence is cut into R spans of blocks of C = 64 tokens, grid (B*H, R, Dv/64), one
warpgroup per program.

1. `_states_kernel`: each span's own end state from a zero start, S <- g S + K^T diag(w) V, for
   all spans but the last (skipped when R = 1, i.e. when B x H alone fills the device).
2. `spans.cross_span` (jnp, R x R per head): the state entering each span (SPEC 4).
3. `_outputs_kernel`: each span replays its blocks from its incoming state,
   O = [(Q K^T) * D] V + diag(u) Q S, then updates S as in 1; the last span's S is the final state.

Per block that is four wgmmas ([C,Dk]x[Dk,C], [C,C]x[C,64], [C,Dk]x[Dk,64], [Dk,C]x[C,64]) on bf16
operands in swizzled SMEM with fp32 accumulators; the state stays in registers in fp32 and is
rounded to the input dtype only as a wgmma operand. The next block's tiles are
loaded by TMA while the current one computes (two slots).

Decays and document masks are per-token vectors computed in jnp beforehand (`_decays`), so the
kernel has no segment branch: u = lambda^(i+1) [incoming doc], w = lambda^(m-1-j) [valid, last doc],
g = lambda^m [no boundary] per block, f = in-block index of each token's document start (the
intra-block mask is f_i <= j <= i). They add ~1% to the bytes read at D = 128.

Constraints: 16-bit inputs (wgmma on fp32 would round to tf32), Dk and Dv each 64 or 128.
`supports` says whether a call qualifies; `m1jax.kernels` falls back to the Triton kernel otherwise.
"""

from __future__ import annotations

import inspect
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from m1jax.kernels.lightning.spans import cross_span, plan

_F32 = jnp.float32
C = 64  # block length: the wgmma M tile and one 128-byte swizzle row of bf16
BV = 64  # Dv columns per program
_LOAD_TAKES_IDX = "idx" in inspect.signature(plgpu.load).parameters  # jax < 0.11: load(ref, idx)


def supports(dtype, dk: int, dv: int) -> bool:
    """16-bit inputs and Dk, Dv in {64, 128}: the [Dk, 64] fp32 state and its update fit in registers,
    and the backward's calls swap Dk and Dv (vjp.py), so both must qualify."""
    sixteen = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return sixteen and dk in (64, 128) and dv in (64, 128)


def interpret_available() -> bool:
    """Mosaic GPU interpret mode runs wgmma and layouts on CPU from jax 0.11 on."""
    return hasattr(plgpu, "InterpretGPUParams")


def _interpret_params():
    if not interpret_available():
        raise NotImplementedError(f"Mosaic GPU interpret mode needs jax >= 0.11 (this is {jax.__version__})")
    return plgpu.InterpretGPUParams(detect_races=True, on_race="raise")


def _load(ref, layout, gmem=False):
    """ref[...] into registers in `layout`; GMEM refs take the plain (non-swizzled) transfer."""
    kw = dict(layout=layout, optimized=not gmem)
    return plgpu.load(ref, (), **kw) if _LOAD_TAKES_IDX else plgpu.load(ref, **kw)


_ROW = plgpu.Layout.WGMMA.reduce(1)  # a [C] vector indexed by the row of a WGMMA tile


def _mm(a, b, shape):
    """a @ b on tensor cores, fp32 [M, N] in WGMMA layout (a, b: SMEM refs, b may be `.T`)."""

    def run(acc):
        plgpu.wgmma(acc, a, b)
        return acc[...]

    return pl.run_scoped(run, plgpu.ACC(shape, _F32))


def _rows(vec, shape):
    return lax.broadcast_in_dim(vec, shape, [0])


def _update(state, k_smem, v_smem, vw_smem, w, g):
    """g S + K^T diag(w) V: V is scaled in registers and staged in SMEM for the wgmma."""
    v = _load(v_smem, plgpu.Layout.WGMMA).astype(_F32)
    vw_smem[...] = (v * _rows(w, v.shape)).astype(vw_smem.dtype)
    plgpu.commit_smem()
    return g * state + _mm(k_smem.T, vw_smem, state.shape)


def _span_loop(n_blocks, load, body, init):
    """Blocks of this program's span with the next block's TMA in flight: body(i, slot, carry)."""
    load(0, 0)

    def step(i, carry):
        slot = lax.rem(i, 2)

        @pl.when(i + 1 < n_blocks)
        def _():
            load(i + 1, 1 - slot)

        return body(i, slot, carry)

    return lax.fori_loop(0, n_blocks, step, init)


def _smem(shape, dtype):
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    return plgpu.SMEM(shape, dtype, transforms=swizzled)


def _coords(n_blocks, n_heads):
    bh, r, vi = lax.axis_index("bh"), lax.axis_index("r"), lax.axis_index("v")
    return lax.div(bh, n_heads), lax.rem(bh, n_heads), r, vi, r * n_blocks


def _states_kernel(n_blocks, n_heads, dtype, k_ref, v_ref, w_ref, g_ref, ds_ref):
    dk = k_ref.shape[-1]
    b, h, r, vi, blk0 = _coords(n_blocks, n_heads)
    cols = pl.ds(vi * BV, BV)

    def scoped(k_smem, v_smem, vw_smem, bars):
        def load(i, slot):
            rows = pl.ds((blk0 + i) * C, C)
            plgpu.copy_gmem_to_smem(k_ref.at[b, h, rows], k_smem.at[slot], bars.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, h, rows, cols], v_smem.at[slot], bars.at[slot])

        def body(i, slot, state):
            plgpu.barrier_wait(bars.at[slot])
            w = _load(w_ref.at[b, h, pl.ds((blk0 + i) * C, C)], _ROW, gmem=True)
            return _update(state, k_smem.at[slot], v_smem.at[slot], vw_smem, w, g_ref[b, h, blk0 + i])

        init = plgpu.layout_cast(jnp.zeros((dk, BV), _F32), plgpu.Layout.WGMMA)
        ds_ref[b, h, r, :, cols] = _span_loop(n_blocks, load, body, init)

    pl.run_scoped(
        scoped,
        _smem((2, C, dk), dtype),
        _smem((2, C, BV), dtype),
        _smem((C, BV), dtype),
        plgpu.Barrier(num_arrivals=2, num_barriers=2),  # one arrival per TMA copy: k, v
    )


def _outputs_kernel(
    n_blocks, n_heads, dtype, q_ref, k_ref, v_ref, u_ref, w_ref, f_ref, g_ref, s_ref, sl_ref, o_ref, fin_ref
):
    dk = k_ref.shape[-1]
    b, h, r, vi, blk0 = _coords(n_blocks, n_heads)
    cols = pl.ds(vi * BV, BV)
    slope = sl_ref[h]

    def scoped(q_smem, k_smem, v_smem, s_smem, o_smem, bars):
        # s_smem holds in turn the incoming state (for Q S), then P, then diag(w) V: each is dead
        # before the next is written (every wgmma is waited), and 16 KB less SMEM lets 2 CTAs share an SM.
        stage = s_smem.at[pl.ds(0, C)]  # [C, 64]: P is [C, C] with C = 64

        def load(i, slot):
            rows = pl.ds((blk0 + i) * C, C)
            plgpu.copy_gmem_to_smem(q_ref.at[b, h, rows], q_smem.at[slot], bars.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[b, h, rows], k_smem.at[slot], bars.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, h, rows, cols], v_smem.at[slot], bars.at[slot])

        def body(i, slot, state):
            t0 = (blk0 + i) * C
            vec = lambda ref: _load(ref.at[b, h, pl.ds(t0, C)], _ROW, gmem=True)
            u, w = vec(u_ref), vec(w_ref)
            first = _load(f_ref.at[b, pl.ds(t0, C)], _ROW, gmem=True)
            s_smem[...] = state.astype(dtype)  # the incoming state as a wgmma operand
            plgpu.commit_smem()
            plgpu.barrier_wait(bars.at[slot])
            q, k, v = q_smem.at[slot], k_smem.at[slot], v_smem.at[slot]
            inter = _rows(u, (C, BV)) * _mm(q, s_smem, (C, BV))
            # Index tiles made here, not hoisted: 3 x 32 registers live across the loop would spill.
            i_idx = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=plgpu.Layout.WGMMA)
            j_idx = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=plgpu.Layout.WGMMA)
            keep = (j_idx <= i_idx) & (j_idx >= _rows(first, (C, C)))  # causal, same document
            decay = jnp.exp(jnp.where(keep, -slope * (i_idx - j_idx).astype(_F32), -jnp.inf))
            stage[...] = (_mm(q, k.T, (C, C)) * decay).astype(dtype)
            plgpu.commit_smem()
            out = _mm(stage, v, (C, BV)) + inter
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous block's store has read o_smem
            o_smem[...] = out.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, pl.ds(t0, C), cols])
            return _update(state, k, v, stage, w, g_ref[b, h, blk0 + i])

        init = _load(s_ref.at[b, h, r, :, cols], plgpu.Layout.WGMMA, gmem=True)
        fin_ref[b, h, r, :, cols] = _span_loop(n_blocks, load, body, init)  # the last span's is the final state
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(  # 104 KB at Dk = 128
        scoped,
        _smem((2, C, dk), dtype),
        _smem((2, C, dk), dtype),
        _smem((2, C, BV), dtype),
        _smem((dk, BV), dtype),
        _smem((C, BV), dtype),
        plgpu.Barrier(num_arrivals=3, num_barriers=2),  # q, k, v
    )


def _decays(slopes, runs, t: int, t_pad: int, b: int):
    """Per-token u, w [B, H, Tp], document starts f [B, Tp] (int32) and per-block g [B, H, Tp/C]."""
    n = t_pad // C
    pos = jnp.arange(t_pad)
    i = pos % C
    m = jnp.clip(t - (pos - i), 0, C)  # valid tokens in the token's block
    s = slopes.astype(_F32)[None, :, None]  # [1, H, 1]
    if runs is None:
        q_in = k_last = jnp.ones((b, t_pad), bool)
        keep = jnp.ones((b, n), bool)
        first = jnp.full((b, t_pad), -1, jnp.int32)
    else:
        runs = jnp.pad(runs.astype(jnp.int32), ((0, 0), (0, t_pad - t)), mode="edge")
        blocks = runs.reshape(b, n, C)
        before = jnp.concatenate([runs[:, :1], runs[:, C - 1 :: C][:, :-1]], axis=1)  # [B, n]: id entering
        last = blocks[:, :, -1]  # edge padding: the id of the block's last valid token
        q_in = (blocks == before[..., None]).reshape(b, t_pad)
        k_last = (blocks == last[..., None]).reshape(b, t_pad)
        keep = last == before
        new_doc = jnp.concatenate([jnp.ones((b, 1), bool), runs[:, 1:] != runs[:, :-1]], axis=1)
        start = lax.cummax(jnp.where(new_doc, pos[None], 0), axis=1)
        first = (start - (pos - i)[None]).astype(jnp.int32)  # < 0: the document began before the block
    u = jnp.where(q_in[:, None], jnp.exp(-s * (i + 1)), 0.0)
    w = jnp.where((k_last & (i < m))[:, None], jnp.exp(-s * jnp.maximum(m - 1 - i, 0)), 0.0)
    g_blk = jnp.exp(-s * m[::C])  # [1, H, n]
    g = jnp.where(keep[:, None], g_blk, 0.0)
    return u, w, first, g


@partial(jax.jit, static_argnames=("block_size", "spans", "interpret"))
def forward(q, k, v, slopes, h0, runs, *, block_size: int = C, spans: int | None = None, interpret: bool = False):
    """Head-major forward: q, k [B, H, T, Dk], v [B, H, T, Dv] (bf16/fp16), slopes [H], h0 fp32
    [B, H, Dk, Dv], runs int32 [B, T] (non-decreasing run ids) or None -> (o, final fp32 state).

    block_size is fixed at C = 64 (the wgmma tile); spans: sequence spans R (None: fill the device).
    """
    del block_size
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    if not supports(q.dtype, dk, dv):
        raise ValueError(
            f"lightning pallas_mgpu: needs bf16/fp16 inputs and Dk, Dv each 64 or 128; got {q.dtype}, "
            f"Dk={dk}, Dv={dv} (use impl='pallas_triton')"
        )
    _, per_span, r, _ = plan(b, h, max(t, C), dv, C, spans)  # max: blocks of exactly C tokens
    span_len = per_span * C
    t_pad = r * span_len
    if t_pad != t:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, t_pad - t), (0, 0))) for x in (q, k, v))
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    slopes = slopes.astype(_F32)
    u, w, first, g = _decays(slopes, runs, t, t_pad, b)
    params = _interpret_params() if interpret else None
    grid = dict(grid_names=("bh", "r", "v"), interpret=params)
    h0 = h0.astype(_F32)
    if r > 1:  # end states of all spans but the last; the outputs kernel ends the last one
        ds = plgpu.kernel(
            partial(_states_kernel, per_span, h, q.dtype),
            out_type=jax.ShapeDtypeStruct((b, h, r - 1, dk, dv), _F32),
            grid=(b * h, r - 1, dv // BV),
            **grid,
        )(k, v, w, g)
        states = cross_span(ds, slopes, h0, runs, t, span_len)  # [B, H, R, Dk, Dv]: entering each span
    else:  # one span (B x H fills the device): no state pass, k and v are read once
        states = h0[:, :, None]
    o, fin = plgpu.kernel(
        partial(_outputs_kernel, per_span, h, q.dtype),
        out_type=(
            jax.ShapeDtypeStruct((b, h, t_pad, dv), q.dtype),
            jax.ShapeDtypeStruct((b, h, r, dk, dv), _F32),
        ),
        compiler_params=plgpu.CompilerParams(approx_math=True),  # ex2.approx for the decays of P (bf16)
        grid=(b * h, r, dv // BV),
        **grid,
    )(q, k, v, u, w, first, g, states, slopes)
    return o[:, :, :t], fin[:, :, r - 1]
