"""Causal softmax attention (GQA, packed documents) for the every-8th softmax layer."""

from m1jax.kernels.softmax.flash import BLOCK, flash_attention

__all__ = ["BLOCK", "flash_attention"]
