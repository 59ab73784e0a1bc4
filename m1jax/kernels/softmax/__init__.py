"""Causal softmax attention (GQA, packed documents) for the every-8th softmax layer."""

from m1jax.kernels.softmax.flash import BLOCK, flash_attention
from m1jax.kernels.softmax.reference import causal_attention, gqa_attention

__all__ = ["BLOCK", "causal_attention", "flash_attention", "gqa_attention"]
