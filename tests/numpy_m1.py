"""Independent float64 NumPy reference of MiniMax-M1 (SPEC section 1), read from an official-layout checkpoint.

Written literally from the spec, for clarity rather than speed: lightning attention is the token recurrence,
softmax attention is the quadratic form, the MoE evaluates every expert densely. It must not import m1jax,
jax or torch, so that it stays an oracle independent of the code under test.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from safetensors.numpy import save_file

# -- building blocks ---------------------------------------------------------------------


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def alibi_slopes(n: int) -> list[float]:
    """The official MiniMax `_build_slope_tensor` rule (ALiBi), valid for any head count."""

    def power_of_2(m: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))  # = 2^(-8/m)
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    p = 2 ** math.floor(math.log2(n))
    return power_of_2(p) + alibi_slopes(2 * p)[0::2][: n - p]


def lightning_decay_rates(num_heads: int, layer: int, num_layers: int) -> np.ndarray:
    """s_{l,h} (lambda = exp(-s)) with l the GLOBAL 0-based layer index."""
    factor = 1 + 1e-5 if num_layers <= 1 else 1 - layer / (num_layers - 1) + 1e-5
    return np.asarray(alibi_slopes(num_heads), np.float64) * factor


def lightning_recurrence(q: np.ndarray, k: np.ndarray, v: np.ndarray, s: np.ndarray) -> np.ndarray:
    """q, k, v [B, T, H, D], s [H] -> o [B, T, H, D] by S_t = lambda S_{t-1} + k_t^T v_t; o_t = q_t S_t."""
    b, t, h, d = q.shape
    lam = np.exp(-s)[None, :, None, None]
    state = np.zeros((b, h, d, v.shape[-1]))
    out = np.zeros((b, t, h, v.shape[-1]))
    for i in range(t):
        state = lam * state + k[:, i, :, :, None] * v[:, i, :, None, :]
        out[:, i] = np.einsum("bhd,bhde->bhe", q[:, i], state)
    return out


def rope(x: np.ndarray, rotary_dim: int, theta: float) -> np.ndarray:
    """Partial NeoX rotate-half RoPE on the first rotary_dim dims of x [B, T, H, D], positions 0..T-1."""
    r = rotary_dim
    if r == 0:
        return x
    inv_freq = theta ** (-np.arange(0, r, 2, dtype=np.float64) / r)  # theta^(-2i/r)
    freqs = np.arange(x.shape[1], dtype=np.float64)[:, None] * inv_freq[None]  # [T, r/2]
    emb = np.concatenate([freqs, freqs], axis=-1)[None, :, None, :]  # [1, T, 1, r]
    xr = x[..., :r]
    rotated = np.concatenate([-xr[..., r // 2 :], xr[..., : r // 2]], axis=-1)
    return np.concatenate([xr * np.cos(emb) + rotated * np.sin(emb), x[..., r:]], axis=-1)


# -- layers ------------------------------------------------------------------------------


def lightning_attention(c: dict, w, pre: str, x: np.ndarray, layer: int) -> np.ndarray:
    b, t, _ = x.shape
    h, d = c["num_attention_heads"], c["head_dim"]
    qkv = silu(x @ w(pre + "qkv_proj").T).reshape(b, t, h, 3 * d)  # per head: [q_h | k_h | v_h]
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    o = lightning_recurrence(q, k, v, lightning_decay_rates(h, layer, c["num_hidden_layers"]))
    o = rms_norm(o.reshape(b, t, h * d), w(pre + "norm"), 1e-6)  # one norm over all heads jointly
    o = sigmoid(x @ w(pre + "output_gate").T) * o
    return o @ w(pre + "out_proj").T


def softmax_attention(c: dict, w, pre: str, x: np.ndarray) -> np.ndarray:
    b, t, _ = x.shape
    h, g, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    r, theta = c.get("rotary_dim", d), c["rope_theta"]
    q = rope((x @ w(pre + "q_proj").T).reshape(b, t, h, d), r, theta)
    k = rope((x @ w(pre + "k_proj").T).reshape(b, t, g, d), r, theta)
    v = (x @ w(pre + "v_proj").T).reshape(b, t, g, d)
    kv_of_head = np.arange(h) // (h // g)  # consecutive query heads share a kv head
    k, v = k[:, :, kv_of_head], v[:, :, kv_of_head]
    scores = np.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    o = np.einsum("bhij,bjhd->bihd", softmax(scores), v)
    return o.reshape(b, t, h * d) @ w(pre + "o_proj").T


def moe(c: dict, w, pre: str, x: np.ndarray) -> np.ndarray:
    e, k = c["num_local_experts"], c["num_experts_per_tok"]
    p = softmax(x @ w(pre + "gate").T)  # [B, T, E] over all experts
    top = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    top_p = np.take_along_axis(p, top, axis=-1)
    weights = np.zeros_like(p)
    np.put_along_axis(weights, top, top_p / top_p.sum(-1, keepdims=True), axis=-1)  # renormalised top-k
    y = np.zeros_like(x)
    for i in range(e):  # dense: every expert on every token, weighted by 0 if not chosen
        ex = f"{pre}experts.{i}."
        ffn = (silu(x @ w(ex + "w1").T) * (x @ w(ex + "w3").T)) @ w(ex + "w2").T
        y += weights[..., i : i + 1] * ffn
    return y


def forward(config: dict, tensors: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """Official MiniMax-M1 forward pass in float64: tokens [B, T] -> logits [B, T, V]."""
    c = config

    def w(name: str) -> np.ndarray:
        return np.asarray(tensors[name + ".weight"], np.float64)

    eps = c["rms_norm_eps"]
    x = w("model.embed_tokens")[np.asarray(tokens)]
    for layer, kind in enumerate(c["attn_type_list"]):
        pre = f"model.layers.{layer}."
        h = rms_norm(x, w(pre + "input_layernorm"), eps)
        if kind == 0:
            a = lightning_attention(c, w, pre + "self_attn.", h, layer)
            alpha, beta = c["layernorm_linear_attention_alpha"], c["layernorm_linear_attention_beta"]
        else:
            a = softmax_attention(c, w, pre + "self_attn.", h)
            alpha, beta = c["layernorm_full_attention_alpha"], c["layernorm_full_attention_beta"]
        y = alpha * h + beta * a  # post-norm: the residual branch is the normed input
        z = rms_norm(y, w(pre + "post_attention_layernorm"), eps)
        x = c["layernorm_mlp_alpha"] * z + c["layernorm_mlp_beta"] * moe(c, w, pre + "block_sparse_moe.", z)
    return rms_norm(x, w("model.norm"), eps) @ w("lm_head").T


# -- checkpoints -------------------------------------------------------------------------


def official_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name of an official-layout checkpoint -> its PyTorch ([out, in]) shape."""
    v, d, h, g, hd = (
        c["vocab_size"],
        c["hidden_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["head_dim"],
    )
    e, f = c["num_local_experts"], c["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (v, d)}
    for layer, kind in enumerate(c["attn_type_list"]):
        pre = f"model.layers.{layer}."
        shapes[pre + "input_layernorm.weight"] = (d,)
        shapes[pre + "post_attention_layernorm.weight"] = (d,)
        a = pre + "self_attn."
        if kind == 0:
            shapes.update({a + "qkv_proj.weight": (3 * h * hd, d), a + "output_gate.weight": (h * hd, d)})
            shapes.update({a + "norm.weight": (h * hd,), a + "out_proj.weight": (d, h * hd)})
        else:
            shapes.update({a + "q_proj.weight": (h * hd, d), a + "k_proj.weight": (g * hd, d)})
            shapes.update({a + "v_proj.weight": (g * hd, d), a + "o_proj.weight": (d, h * hd)})
        shapes[pre + "block_sparse_moe.gate.weight"] = (e, d)
        for i in range(e):
            ex = f"{pre}block_sparse_moe.experts.{i}."
            shapes.update({ex + "w1.weight": (f, d), ex + "w3.weight": (f, d), ex + "w2.weight": (d, f)})
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (v, d)
    return shapes


def random_official(config: dict, seed: int) -> dict[str, np.ndarray]:
    """Random weights, O(1) activations: linears 0.7 N(0, 1/fan_in), routers 2 N(0, 1/fan_in), norms 1 + 0.1 N(0, 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in official_shapes(config).items():
        if len(shape) == 1:  # RMSNorm scales
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            a = rng.standard_normal(shape)
        elif name.endswith("gate.weight") and "block_sparse_moe" in name:  # router: peaked, non-uniform routing
            a = 2.0 * rng.standard_normal(shape) / math.sqrt(shape[1])
        else:
            a = 0.7 * rng.standard_normal(shape) / math.sqrt(shape[1])
        out[name] = a.astype(np.float32)
    return out


def write_official_checkpoint(path: str, config: dict, tensors: dict, shards: int = 1) -> None:
    """config.json + model.safetensors (float32), or `shards` files + model.safetensors.index.json."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    arrays = {n: np.ascontiguousarray(t, dtype=np.float32) for n, t in tensors.items()}
    if shards <= 1:
        save_file(arrays, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(arrays)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[j]: arrays[names[j]] for j in part}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({names[j]: file for j in part})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in arrays.values()))}, "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh, indent=2)
