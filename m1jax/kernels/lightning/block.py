"""One block of the blocked recurrence (SPEC 1.2), written for the inside of a Pallas kernel.

Both Pallas kernels trace these functions on values already loaded from their refs, so the math
lives in one place. Everything is 2-D (Mosaic and Triton lower 2-D tiles best): columns are
[C, 1], rows [1, C]. Decay exponents are masked before `exp`, so every exponent is <= 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


class Masks(NamedTuple):
    """Document structure of one block (None when the row holds a single document)."""

    same: jax.Array  # [C, C] bool: query i and key j are in the same document
    q_in: jax.Array  # [C, 1] bool: token is in the document of the incoming state
    k_last: jax.Array  # [C, 1] bool: token is in the block's last document (feeds the outgoing state)
    keep: jax.Array  # [1, 1] bool: no boundary in the block, the incoming state survives


def masks(ids_col: jax.Array, ids_row: jax.Array, prev_col: jax.Array) -> Masks:
    """Masks from non-decreasing run ids: ids [C, 1] and [1, C], prev_col [C, 1] = id of the token before.

    Padding repeats the last id, so reductions over the whole block give the first/last document.
    """
    incoming = jnp.min(prev_col, axis=0, keepdims=True)  # [1, 1]: id of the token before the block
    last = jnp.max(ids_col, axis=0, keepdims=True)  # [1, 1]
    return Masks(
        same=ids_col == ids_row,
        q_in=ids_col == incoming,
        k_last=ids_col == last,
        keep=last == incoming,
    )


def _dot(a, b, dims):
    # Always explicit, from the operand dtype: None would take a global `jax_default_matmul_precision`,
    # and Mosaic TPU rejects "highest" (an fp32 contract) on bf16. Set here rather than by a scoped
    # config reset around each kernel's tracing: one place for both kernels, next to the dot it governs.
    prec = lax.Precision.HIGHEST if a.dtype == _F32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=_F32, precision=prec)


def block_state(k, v, state, slope, m, mk: Masks | None = None):
    """State after the block: lambda^m [keep] S + (diag(lambda^(m-1-j) [last doc]) K)^T V.

    k [C, Dk], v [C, Dv] in the input dtype; state fp32 [Dk, Dv]; slope scalar fp32; m = number of
    valid tokens (scalar int32, the rest is right padding).
    """
    c = k.shape[0]
    col = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    ok = col < m
    if mk is not None:
        ok = ok & mk.k_last
    k_decay = jnp.exp(jnp.where(ok, -slope * (m - 1 - col).astype(_F32), -jnp.inf))  # [C, 1]
    kw = (k.astype(_F32) * k_decay).astype(k.dtype)
    g = jnp.exp(jnp.full((1, 1), -slope, _F32) * m.astype(_F32))  # [1, 1]
    if mk is not None:
        g = jnp.where(mk.keep, g, 0.0)
    return g * state + _dot(kw, v, ((0,), (0,)))


def block_output(q, k, v, state, slope, mk: Masks | None = None):
    """O = [(Q K^T) * Dloc] V + diag(lambda^(i+1) [incoming doc]) Q S, fp32 [C, Dv]."""
    c = q.shape[0]
    i = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    j = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    causal = i >= j
    if mk is not None:
        causal = causal & mk.same
    d_loc = jnp.exp(jnp.where(causal, -slope * (i - j).astype(_F32), -jnp.inf))
    scores = _dot(q, k, ((1,), (1,))) * d_loc
    out = _dot(scores.astype(v.dtype), v, ((1,), (0,)))
    col = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    q_arg = -slope * (col + 1).astype(_F32)
    if mk is not None:
        q_arg = jnp.where(mk.q_in, q_arg, -jnp.inf)
    return out + _dot(q, state.astype(q.dtype), ((1,), (0,))) * jnp.exp(q_arg)
