"""Causal GQA softmax attention in jnp loops with an online softmax (FlashAttention-2 schedule).

The blocked form in `reference.causal_attention` writes every [rows, keys] score block to
memory and reads it back three times; on CPU that traffic, not the matmuls, bounds it. Here each
query block walks its key blocks in a loop, so a [c*R, c] score tile lives in cache, and blocks
above the diagonal are never visited (the loop's trip count is dynamic). The backward pass is a
custom VJP that recomputes the probabilities from the saved log-sum-exp, one key block at a time.

Layout: rows of a query block are (token, head-in-group) pairs, [nb, B, G, c*R, D], so the R query
heads sharing a kv head make one matmul against that head's keys.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32
BLOCK = 256  # tokens per query/key block: a [4*256, 256] fp32 tile is 1 MiB, cache-sized


def flash_attention(q, k, v, runs=None, *, block: int = BLOCK, q_offset=None, q_runs=None):
    """q [B, T, H, D], k/v [B, T, G, D] (query head h uses kv head h // (H/G)), runs: optional
    [B, T] document index (attention stays inside a document). Causal. Returns [B, T, H, D].

    q_offset: for queries that are a slice of a longer key sequence (sequence parallelism): q is
    [B, Tq, H, D] at positions q_offset .. q_offset + Tq - 1 of k's S = len(k) tokens (a traced
    scalar; Tq and q_offset multiples of the block, which then divides S), q_runs their [B, Tq]
    document index beside `runs` [B, S] of the keys.
    """
    b, t, h, d = q.shape
    g = k.shape[2]
    r = h // g
    c = min(block, t)
    if q_offset is None:
        nb = -(-t // c)
        pad = nb * c - t
        if pad:  # padded keys come after every real query: the causal mask hides them
            q, k, v = (jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (q, k, v))
            runs = None if runs is None else jnp.pad(runs, [(0, 0), (0, pad)], constant_values=-1)
        q_runs, q_offset, aligned = runs, 0, True
    else:
        if t % c or k.shape[1] % c:
            raise ValueError(f"flash_attention: query length {t} and key length {k.shape[1]} must be multiples of {c}")
        nb, aligned = t // c, False
        q_offset = q_offset // c  # in blocks
    nk = k.shape[1] // c
    qb = (q * d**-0.5).reshape(b, nb, c, g, r, d).transpose(1, 0, 3, 2, 4, 5).reshape(nb, b, g, c * r, d)
    kb, vb = (x.reshape(b, nk, c, g, d).transpose(1, 0, 3, 2, 4) for x in (k, v))  # [nk, B, G, c, D]
    blocks = lambda x, n: None if x is None else x.astype(jnp.int32).reshape(b, n, c).transpose(1, 0, 2)
    out = _flash(qb, kb, vb, blocks(q_runs, nb), blocks(runs, nk), jnp.asarray(q_offset, jnp.int32), r, aligned)
    out = out.reshape(nb, b, g, c, r, d).transpose(1, 0, 3, 2, 4, 5).reshape(b, nb * c, h, d)
    return out[:, :t].astype(q.dtype)


def _keep(i, j, r: int, c: int, qruns, kruns, diagonal: bool):
    """[B or 1, c*R, c] keep-mask of query block i against key block j, or None (keep all): the
    causal triangle only on the diagonal block, the document test only with packed rows."""
    keep = None
    if diagonal:
        keep = (jnp.arange(c * r)[:, None] // r >= jnp.arange(c)[None, :])[None]
    if kruns is not None:
        same = jnp.repeat(qruns[i], r, axis=1)[:, :, None] == kruns[j][:, None, :]
        keep = same if keep is None else keep & same
    return keep


def _scores(qi, kj, keep):
    s = jnp.einsum("bgmd,bgnd->bgmn", qi, kj, preferred_element_type=_F32)
    return s if keep is None else jnp.where(keep[:, None], s, -jnp.inf)


@partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q, k, v, qruns, kruns, off, r: int, aligned: bool):
    """q [nq, B, G, M, D] (pre-scaled, M = c*R), k/v [nk, B, G, c, D], q/k runs [nq or nk, B, c] or
    None; query block i sits at key block off + i (aligned: off = 0 and nq = nk, statically)."""
    return _forward(q, k, v, qruns, kruns, off, r)[0]


def _forward(q, k, v, qruns, kruns, off, r):
    c = k.shape[3]

    def query_block(_, xs):
        i, qi = xs
        gi = i + off  # its key block on the diagonal

        def step(j, carry, diagonal=False):
            m, den, acc = carry
            s = _scores(qi, k[j], _keep(i, j, r, c, qruns, kruns, diagonal))
            m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with no key in its document yet
            p = jnp.exp(s - m_safe)
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("bgmn,bgnd->bgmd", p.astype(v.dtype), v[j], preferred_element_type=_F32)
            return m_new, alpha * den + jnp.sum(p, axis=-1, keepdims=True), alpha * acc + pv

        rows = qi.shape[:-1] + (1,)
        carry = (jnp.full(rows, -jnp.inf, _F32), jnp.zeros(rows, _F32), jnp.zeros(qi.shape, _F32))
        carry = lax.fori_loop(0, gi, step, carry)  # key blocks below the diagonal: no causal mask
        m, den, acc = step(gi, carry, diagonal=True)
        return None, ((acc / den).astype(qi.dtype), (m + jnp.log(den))[..., 0])

    _, (out, lse) = lax.scan(query_block, None, (jnp.arange(q.shape[0]), q))
    return out, lse


def _flash_fwd(q, k, v, qruns, kruns, off, r, aligned):
    out, lse = _forward(q, k, v, qruns, kruns, off, r)
    return out, (q, k, v, qruns, kruns, off, out, lse)


def _flash_bwd(r, aligned, res, dout):
    q, k, v, qruns, kruns, off, out, lse = res
    nq, c = q.shape[0], k.shape[3]
    delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1)  # [nq, B, G, M]

    def key_block(dq, xs):
        j, kj, vj = xs
        diag = j - off  # the query block whose diagonal is key block j (may lie outside this slice)

        def step(i, carry, diagonal=False):  # query block i (key block off + i >= j) against key block j
            dq, dk, dv = carry
            qi, doi = q[i], dout[i]
            p = jnp.exp(_scores(qi, kj, _keep(i, j, r, c, qruns, kruns, diagonal)) - lse[i][..., None])
            dv = dv + jnp.einsum("bgmn,bgmd->bgnd", p.astype(doi.dtype), doi, preferred_element_type=_F32)
            dp = jnp.einsum("bgmd,bgnd->bgmn", doi, vj, preferred_element_type=_F32)
            ds = p * (dp - delta[i][..., None])
            dk = dk + jnp.einsum("bgmn,bgmd->bgnd", ds.astype(qi.dtype), qi, preferred_element_type=_F32)
            dqi = jnp.einsum("bgmn,bgnd->bgmd", ds.astype(kj.dtype), kj, preferred_element_type=_F32)
            return lax.dynamic_update_index_in_dim(dq, dq[i] + dqi, i, 0), dk, dv

        zeros = jnp.zeros(kj.shape, _F32)
        carry = (dq, zeros, zeros)
        if aligned:
            carry = step(diag, carry, diagonal=True)
        else:
            inside = (diag >= 0) & (diag < nq)
            carry = lax.cond(
                inside, lambda cr: step(jnp.clip(diag, 0, nq - 1), cr, diagonal=True), lambda cr: cr, carry
            )
        dq, dk, dv = lax.fori_loop(jnp.maximum(diag + 1, 0), nq, step, carry)
        return dq, (dk, dv)

    dq, (dk, dv) = lax.scan(key_block, jnp.zeros(q.shape, _F32), (jnp.arange(k.shape[0]), k, v))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
