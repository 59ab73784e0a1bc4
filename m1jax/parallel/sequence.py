"""Sequence parallelism: one row's tokens split over the `sequence` mesh axis (R shards of L).

Lightning layers (LASP-2, SPEC 4): each shard r runs the single-device lightning core on its L
tokens from a zero state, giving its local output and end state M_r. One all-gather of the M's
(R x [B, H, Dk, Dv], independent of L) lets every shard form the state entering it,
`S_in(r) = sum_{j<r} lambda^(L*(r-1-j)) M_j`, and add `lambda^(i+1) q_i S_in(r)` to its outputs.
With packed documents the chain of shard states is cut where a document starts: a shard's end
state carries the incoming one only if the whole shard is one document, and the incoming state
reaches only the tokens of the shard's first document, if that document began earlier.
Autodiff gives the backward (the all-gather transposes to a reduce-scatter).

Softmax layers: keys, values and their document ids are all-gathered over the axis; each shard
runs the causal flash loop for its queries at their global offset (blocks above the diagonal are
skipped as on one device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from m1jax import parallel
from m1jax.kernels import lightning_attention
from m1jax.kernels.softmax import flash_attention

_F32 = jnp.float32
SEQ = parallel.SEQUENCE


def _specs(mesh, b: int, h: int):
    """([B, T, H, D] activations, [H] slopes, [B, H, Dk, Dv] states, [B, T] ids) partition specs."""
    rows, heads = parallel.batch_spec(mesh, b), parallel.divides(mesh, parallel.TENSOR, h)
    return P(rows, SEQ, heads, None), P(heads), P(rows, heads, None, None), P(rows, SEQ)


def lightning(q, k, v, slopes, *, runs=None, initial_state=None, impl="auto", block_size=None, mesh=None):
    """`m1jax.kernels.lightning_attention` with T split over `mesh`'s sequence axis (LASP-2).

    q, k [B, T, H, Dk], v [B, T, H, Dv], slopes [H], runs: optional [B, T] contiguous document index
    (`m1jax.kernels.lightning.run_ids` of the segment ids, computed over the whole row). Returns
    (out [B, T, H, Dv], final state fp32 [B, H, Dk, Dv]) equal to the single-device call.
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    n = parallel.axis_size(mesh, SEQ)
    if t % n:
        raise ValueError(f"sequence length {t} is not divisible by the sequence mesh axis ({n})")
    act, head, state, ids = _specs(mesh, b, h)
    segmented = runs is not None
    h0 = jnp.zeros((b, h, dk, dv), _F32) if initial_state is None else initial_state.astype(_F32)
    runs = jnp.zeros((b, t), jnp.int32) if runs is None else runs.astype(jnp.int32)

    def local(q, k, v, slopes, h0, runs):
        seg = runs if segmented else None
        out, m = lightning_attention(q, k, v, slopes, segment_ids=seg, impl=impl, block_size=block_size)
        s_in, final = _incoming_states(m, h0, slopes, runs, q.shape[1])
        steps = jnp.arange(1, q.shape[1] + 1, dtype=_F32)[:, None]
        decay = jnp.exp(-slopes.astype(_F32)[None, :] * steps)  # [L, H]: lambda^(i+1)
        first_doc = (runs == runs[:, :1])[..., None, None]  # [B, L, 1, 1]: tokens that see S_in
        extra = jnp.einsum("bthk,bhkv->bthv", q.astype(_F32), s_in, precision=jax.lax.Precision.HIGHEST)
        out = out.astype(_F32) + jnp.where(first_doc, decay[None, :, :, None] * extra, 0.0)
        return out.astype(q.dtype), final

    fn = jax.shard_map(
        local, mesh=mesh, in_specs=(act, act, act, head, state, ids), out_specs=(act, state), check_vma=False
    )
    return fn(q, k, v, slopes, h0, runs)


def _incoming_states(m, h0, slopes, runs, length: int):
    """This shard's incoming state S_in and the row's final state, from the all-gathered end states.

    m [B, H, Dk, Dv] local end state (zero start), h0 the row's initial state, runs [B, L] this
    shard's document ids. The chain over the R shards is short and identical on every shard.
    """
    ms = jax.lax.all_gather(m, SEQ)  # [R, B, H, Dk, Dv]
    first = jax.lax.all_gather(runs[:, 0], SEQ)  # [R, B]
    last = jax.lax.all_gather(runs[:, -1], SEQ)
    lam_len = jnp.exp(-slopes.astype(_F32) * length)[None, :, None, None]  # lambda^L per head
    cast = lambda flag: flag[:, None, None, None].astype(_F32)  # [B] -> [B, 1, 1, 1]
    carry, s_ins = h0, []  # carry: the state just before shard j's first token (its own document)
    for j in range(ms.shape[0]):
        s_in = carry if j == 0 else carry * cast(first[j] == last[j - 1])  # a document starts at j: no state
        s_ins.append(s_in)
        carry = ms[j] + cast(first[j] == last[j]) * lam_len * s_in  # one document throughout: S_in decays on
    mine = jnp.stack(s_ins)[jax.lax.axis_index(SEQ)]
    return mine, carry


def softmax(q, k, v, *, runs=None, mesh=None):
    """`m1jax.kernels.softmax.flash_attention` (causal GQA) with T split over the sequence axis:
    q [B, T, H, D], k / v [B, T, G, D], runs optional [B, T]. Keys and values are all-gathered."""
    b, t, h, _ = q.shape
    g = k.shape[2]
    n = parallel.axis_size(mesh, SEQ)
    if t % n:
        raise ValueError(f"sequence length {t} is not divisible by the sequence mesh axis ({n})")
    length = t // n
    block = length & -length  # the largest power of two dividing the shard, capped by the kernel's block
    rows = parallel.batch_spec(mesh, b)
    tensor = parallel.divides(mesh, parallel.TENSOR, g)  # heads split only with whole kv groups
    heads = P(rows, SEQ, tensor, None)  # q [B, T, H, D] and k / v [B, T, G, D] alike
    segmented = runs is not None
    runs = jnp.zeros((b, t), jnp.int32) if runs is None else runs.astype(jnp.int32)

    def local(q, k, v, runs):
        gather = lambda x: jax.lax.all_gather(x, SEQ, axis=1, tiled=True)
        offset = jax.lax.axis_index(SEQ) * length
        kr = gather(runs) if segmented else None
        qr = runs if segmented else None
        return flash_attention(q, gather(k), gather(v), kr, block=min(block, 256), q_offset=offset, q_runs=qr)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, P(rows, SEQ)), out_specs=heads, check_vma=False)
    return fn(q, k, v, runs)
