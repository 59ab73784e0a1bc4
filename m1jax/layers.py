"""Small shared pieces: logical-axis parameters, RMSNorm, partial NeoX RoPE, lightning slopes."""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32


def param(module: nn.Module, name: str, shape, axes: tuple[str | None, ...], init, dtype):
    """A parameter annotated with logical axis names (mapped onto a mesh by `m1jax.sharding`)."""
    assert len(shape) == len(axes), (name, shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), dtype)


def project(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """x [..., *in] @ w [*in, *out] -> [..., *out]: the last `n_in` dims of x contract with the first
    `n_in` of w, as one 2-D matmul over the flattened leading (token) dims. An einsum over [B, T, ...]
    leaves transposes in XLA's backward pass (the LM-head gradient ran 1.6x slower on CPU)."""
    k = math.prod(w.shape[:n_in])
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1))
    return y.reshape(*x.shape[: x.ndim - n_in], *w.shape[n_in:])


class Context(NamedTuple):
    """Per-call arrays every layer sees (broadcast over the layer scan).

    positions: [B, T] RoPE positions. runs: [B, T] contiguous-document index or None.
    valid: [B, T] bool, tokens that count in the router statistics.
    index: int32 cache slot of the current token (decode only): a scalar, or [B] per row.
    start: [B] int32 first valid cache slot per row (prefill/decode; left padding).
    routes: [L, B, T, k] expert ids to replay in every layer's MoE (router replay), or None.
    experts: decode only, the unsliced expert weights of the layers in scope (see `M1Model.run`).
    """

    positions: jax.Array
    runs: jax.Array | None
    valid: jax.Array
    index: jax.Array | None = None
    start: jax.Array | None = None
    routes: jax.Array | None = None
    experts: tuple | None = None


class RMSNorm(nn.Module):
    """RMSNorm over the trailing `len(axes)` dims, statistics in fp32 (as the reference code)."""

    eps: float
    axes: tuple[str, ...] = ("norm",)
    param_dtype: jnp.dtype = _F32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = len(self.axes)
        scale = param(self, "scale", x.shape[-n:], self.axes, nn.initializers.ones, self.param_dtype)
        x32 = x.astype(_F32)
        var = jnp.mean(jnp.square(x32), axis=tuple(range(-n, 0)), keepdims=True)
        # Normalise in fp32, cast back, then scale: the order of the published implementation.
        return (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype) * scale.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, rotary_dim: int, theta: float) -> jax.Array:
    """Partial NeoX ("rotate half") RoPE on the first `rotary_dim` dims of each head.

    x: [B, T, H, D]; positions: [B, T]. Dims rotary_dim..D pass through unchanged.
    """
    if rotary_dim == 0:
        return x
    half = rotary_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=_F32) / rotary_dim))  # [r/2]
    angle = positions.astype(_F32)[..., None] * inv_freq  # [B, T, r/2]
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    xr = x[..., :rotary_dim].astype(_F32)
    x1, x2 = xr[..., :half], xr[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return jnp.concatenate([rotated, x[..., rotary_dim:]], axis=-1)


def base_slopes(num_heads: int) -> np.ndarray:
    """Per-head ALiBi slopes of the official MiniMax code: 2^(-8(h+1)/H) for H a power of two;
    otherwise the slopes of the largest power of two p < H, then every other slope for 2p."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    def slopes(n: int) -> list[float]:
        if math.log2(n).is_integer():
            return power_of_two(n)
        p = 2 ** math.floor(math.log2(n))
        return power_of_two(p) + slopes(2 * p)[0::2][: n - p]

    return np.asarray(slopes(num_heads), np.float32)


def layer_slopes(num_heads: int, layer_idx, num_layers: int) -> jax.Array:
    """[H] decay rates of lightning layer `layer_idx` (global index; may be traced).

    s = base * (1 - l / (L - 1) + 1e-5): layer 0 decays fast, the last layers barely decay.
    """
    base = jnp.asarray(base_slopes(num_heads))
    if num_layers <= 1:
        return base * (1.0 + 1e-5)
    factor = 1.0 - jnp.asarray(layer_idx, _F32) / (num_layers - 1) + 1e-5
    return base * factor
