"""Compute kernels behind one stable signature each; `impl` picks the implementation."""

from __future__ import annotations

from m1jax.kernels import lightning as _lightning

LIGHTNING_IMPLS = ("reference", "recurrent")


def lightning_attention(q, k, v, slopes, *, initial_state=None, segment_ids=None, impl="reference", block_size=256):
    """Causal lightning attention.

    Args:
      q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; slopes: [H] (decay exp(-slope) per token).
      initial_state: optional fp32 [B, H, Dk, Dv] state entering the first token.
      segment_ids: optional [B, T] ids; attention and state stay inside each contiguous run.
      impl: "reference" (chunked jnp, `lax.scan` over blocks) or "recurrent" (token by token).
    Returns:
      (out [B, T, H, Dv] in q's dtype, final_state fp32 [B, H, Dk, Dv]).
    """
    if impl == "reference":
        return _lightning.lightning_chunked(
            q, k, v, slopes, initial_state=initial_state, segment_ids=segment_ids, block_size=block_size
        )
    if impl == "recurrent":
        return _lightning.lightning_recurrence(q, k, v, slopes, initial_state=initial_state, segment_ids=segment_ids)
    raise ValueError(f"lightning_attention: unknown impl {impl!r}; expected one of {list(LIGHTNING_IMPLS)}")


__all__ = ["LIGHTNING_IMPLS", "lightning_attention"]
