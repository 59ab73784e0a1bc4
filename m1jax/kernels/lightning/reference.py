"""Pure-jnp lightning attention: the token recurrence (ground truth) and the chunked form.

Per head, with decay lambda = exp(-slope) and an fp32 state S of shape [Dk, Dv]:

    S_t = lambda * S_{t-1} + k_t^T v_t        o_t = q_t S_t

No 1/sqrt(d) scale and no normaliser (MiniMax-M1, SPEC 1.2). Packed documents (segment ids) reset
S to zero at every change of segment id; an initial state feeds the first document of each row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def run_ids(segment_ids: jax.Array) -> jax.Array:
    """[B, T] ids -> [B, T] int32 index of the contiguous run each token belongs to (0, 1, ...).

    Documents are contiguous runs of equal ids, so [1, 1, 2, 2, 1] holds three documents.
    """
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    zero = jnp.zeros_like(segment_ids[:, :1], dtype=jnp.int32)
    return jnp.concatenate([zero, jnp.cumsum(change, axis=1, dtype=jnp.int32)], axis=1)


def _mm(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum with fp32 accumulation; full fp32 precision when the operands are fp32."""
    prec = lax.Precision.HIGHEST if a.dtype == _F32 and b.dtype == _F32 else None
    return jnp.einsum(eq, a, b, preferred_element_type=_F32, precision=prec)


def decode_step(q, k, v, slopes, state):
    """One token of the recurrence: q, k [B, H, Dk], v [B, H, Dv], state fp32 [B, H, Dk, Dv]."""
    lam = jnp.exp(-slopes.astype(_F32))[None, :, None, None]
    kv = k.astype(_F32)[..., :, None] * v.astype(_F32)[..., None, :]
    state = lam * state + kv
    out = _mm("bhk,bhkv->bhv", q.astype(_F32), state)
    return out.astype(q.dtype), state


def lightning_recurrence(q, k, v, slopes, *, initial_state=None, segment_ids=None):
    """Ground truth, one token at a time. q, k [B, T, H, Dk], v [B, T, H, Dv], slopes [H].

    Returns (out [B, T, H, Dv] in q's dtype, final state fp32 [B, H, Dk, Dv]).
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    s0 = jnp.zeros((b, h, dk, dv), _F32) if initial_state is None else initial_state.astype(_F32)
    runs = jnp.zeros((b, t), jnp.int32) if segment_ids is None else run_ids(segment_ids)
    starts = jnp.concatenate([jnp.zeros((b, 1), bool), runs[:, 1:] != runs[:, :-1]], axis=1)

    def step(state, xs):
        qt, kt, vt, start = xs
        state = jnp.where(start[:, None, None, None], 0.0, state)
        out, state = decode_step(qt, kt, vt, slopes, state)
        return state, out

    xs = (q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), starts.swapaxes(0, 1))
    state, out = lax.scan(step, s0, xs)
    return out.swapaxes(0, 1), state


SPAN = 2048  # tokens per outer step of `lightning_chunked` on long sequences


def lightning_chunked(q, k, v, slopes, *, initial_state=None, segment_ids=None, block_size=256, span=SPAN):
    """Blocked form of the recurrence (SPEC 1.2), exact up to float rounding.

    Sequences longer than 2 * `span` run as an outer `lax.scan` over spans of `span` tokens that
    carries the state (so each step's [nb, C, C] and per-block-state intermediates stay
    cache-sized and time grows linearly), plus one call for the remainder.
    """
    b, t = q.shape[:2]
    if t <= 2 * span:
        return _chunked(q, k, v, slopes, initial_state, segment_ids, block_size)
    n, rest = divmod(t, span)
    h, dk, dv = q.shape[2], q.shape[3], v.shape[-1]
    runs = jnp.zeros((b, t), jnp.int32) if segment_ids is None else run_ids(segment_ids)
    s0 = jnp.zeros((b, h, dk, dv), _F32) if initial_state is None else initial_state.astype(_F32)
    # The carried state dies where a span starts a new document.
    prev = jnp.concatenate([runs[:, :1], runs[:, :-1]], axis=1)
    new_doc = (runs != prev)[:, : n * span : span].T  # [n, B]

    def spans(x):  # [B, T, ...] -> [n, B, span, ...]
        return jnp.moveaxis(x[:, : n * span].reshape(b, n, span, *x.shape[2:]), 1, 0)

    def step(state, xs):
        qs, ks, vs, rs, cut = xs
        state = jnp.where(cut[:, None, None, None], 0.0, state)
        out, state = _chunked(qs, ks, vs, slopes, state, rs if segment_ids is not None else None, block_size)
        return state, out

    state, out = lax.scan(step, s0, (spans(q), spans(k), spans(v), spans(runs), new_doc))
    out = jnp.moveaxis(out, 0, 1).reshape(b, n * span, h, dv)
    if rest:
        tail = slice(n * span, t)
        state = jnp.where((runs[:, n * span] != runs[:, n * span - 1])[:, None, None, None], 0.0, state)
        seg = runs[:, tail] if segment_ids is not None else None
        out_tail, state = _chunked(q[:, tail], k[:, tail], v[:, tail], slopes, state, seg, block_size)
        out = jnp.concatenate([out, out_tail], axis=1)
    return out, state


def _chunked(q, k, v, slopes, initial_state, segment_ids, block_size):
    """One call of the blocked form: vectorised over blocks, `lax.scan` only over the state."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = min(block_size, t)
    nb = -(-t // c)
    pad = nb * c - t
    s = slopes.astype(_F32)

    def blocks(x):  # [B, T, ...] -> [B, nb, C, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(b, nb, c, *x.shape[2:])

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    idx = jnp.arange(c)
    valid = jnp.minimum(c, t - jnp.arange(nb) * c)  # [nb] valid tokens per block (m)
    diff = (idx[:, None] - idx[None, :]).astype(_F32)  # i - j
    causal = idx[:, None] >= idx[None, :]
    key_ok = idx[None, :] < valid[:, None]  # [nb, C]
    key_dist = (valid[:, None] - 1 - idx[None, :]).astype(_F32)  # m - 1 - j

    if segment_ids is None:
        intra_exp = jnp.where(causal, -s[:, None, None] * diff, -jnp.inf)  # [H, C, C]
        intra_decay = jnp.exp(intra_exp)[None, None]  # [1, 1, H, C, C]
        key_exp = jnp.where(key_ok[:, None, :], -s[None, :, None] * key_dist[:, None, :], -jnp.inf)
        key_decay = jnp.exp(key_exp)[None]  # [1, nb, H, C]
        q_decay = jnp.exp(-s[None, :] * (idx[:, None] + 1.0))[None, None]  # [1, 1, C, H]
        block_decay = jnp.broadcast_to(jnp.exp(-s[None, :] * valid[:, None])[None], (b, nb, h))
    else:
        runs = blocks(run_ids(segment_ids))  # [B, nb, C]; pads repeat the last run id (0 pad)
        run_last = jnp.take_along_axis(runs, (valid - 1)[None, :, None], axis=2)[..., 0]  # [B, nb]
        first = runs[:, :1, 0]  # the run before block 0 is the first run: it inherits h0
        run_prev = jnp.concatenate([first, run_last[:, :-1]], axis=1)  # [B, nb]
        same = runs[..., :, None] == runs[..., None, :]  # [B, nb, C, C]
        intra_exp = jnp.where((causal & same)[:, :, None], -s[:, None, None] * diff, -jnp.inf)
        intra_decay = jnp.exp(intra_exp)  # [B, nb, H, C, C]
        k_ok = key_ok[None] & (runs == run_last[..., None])  # [B, nb, C]
        key_exp = jnp.where(k_ok[:, :, None, :], -s[None, None, :, None] * key_dist[None, :, None, :], -jnp.inf)
        key_decay = jnp.exp(key_exp)  # [B, nb, H, C]
        q_ok = runs == run_prev[..., None]  # [B, nb, C]: token still in the incoming document
        q_exp = jnp.where(q_ok[..., None], -s * (idx[:, None] + 1.0), -jnp.inf)
        q_decay = jnp.exp(q_exp)  # [B, nb, C, H]
        keep = run_last == run_prev  # no boundary inside the block: the old state survives
        block_decay = jnp.where(keep[..., None], jnp.exp(-s[None, None, :] * valid[None, :, None]), 0.0)

    # Head-major [B, H, nb, C, D] from here on: every einsum is then a batched GEMM over leading dims
    # (2-3x faster on CPU than batching over the interleaved H axis at long T).
    hm = lambda x: jnp.moveaxis(x, 3, 1)  # [B, nb, C, H, D] -> [B, H, nb, C, D]
    qb, kb, vb = hm(qb), hm(kb), hm(vb)
    intra_decay = jnp.swapaxes(intra_decay, 1, 2)  # [., H, ., C, C]
    key_decay = jnp.swapaxes(key_decay, 1, 2)  # [., H, nb, C]
    q_decay = jnp.moveaxis(q_decay, 3, 1)  # [., H, ., C]
    scores = _mm("bhnid,bhnjd->bhnij", qb, kb) * intra_decay
    intra = _mm("bhnij,bhnjv->bhniv", scores.astype(vb.dtype), vb)
    kw = (kb.astype(_F32) * key_decay[..., None]).astype(kb.dtype)
    block_kv = _mm("bhnjk,bhnjv->bhnkv", kw, vb)  # [B, H, nb, Dk, Dv]

    s0 = jnp.zeros((b, h, dk, dv), _F32) if initial_state is None else initial_state.astype(_F32)

    def step(state, xs):
        kv, g = xs
        return g[..., None, None] * state + kv, state  # emit the state entering this block

    final, s_in = lax.scan(step, s0, (jnp.moveaxis(block_kv, 2, 0), jnp.moveaxis(block_decay, 1, 0)))
    s_in = jnp.moveaxis(s_in, 0, 2)  # [B, H, nb, Dk, Dv]
    inter = _mm("bhnik,bhnkv->bhniv", qb.astype(_F32), s_in) * q_decay[..., None]
    out = jnp.moveaxis(intra + inter, 1, 3).reshape(b, nb * c, h, dv)[:, :t]
    return out.astype(q.dtype), final
