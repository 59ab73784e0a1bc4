"""Model FLOPs per token (SPEC section 3 counting) and model FLOPs utilisation.

Matmuls: 2 FLOPs per active weight per token (embedding lookup excluded, LM head included; a
token's top-k experts and the router). Attention: softmax causal 2*N*D per token per head
(forward); lightning 2C(Dk+Dv) + 4 Dk Dv per token per head (forward, chunk C), linear in N.
Training counts 3x the forward for matmuls and softmax attention, and 3.5x for lightning
(its backward is ~2.5x its forward).

Generation (`decode_flops_per_token`, `generation_flops`): each generated token is one forward of
one position through the cache. Matmuls as above (2 per active weight, LM head included). A
softmax layer scores the token's query against every cached key and mixes the values: QK^T and PV
are 2 * ctx * D FLOPs each per query head, 4 * H * D * ctx per token for `ctx` attended positions
(itself included), so it grows with the context. A lightning layer updates and reads its constant
[H, Dk, Dv] state (SPEC 1.2): S = lambda S + k^T v (2 Dk Dv, the decay multiply is elementwise and
not counted, like norms and activations elsewhere) and o = q S (2 Dk Dv), 4 * H * Dk * Dv per
token whatever the context. Elementwise work (norms, gates, softmax exponentials, RoPE) is left
out everywhere.
"""

from __future__ import annotations

import jax

from m1jax.config import LIGHTNING, ModelConfig

# Dense bf16 peak per chip, TFLOP/s (SPEC section 3 and vendor sheets). Matched in order.
PEAK_TFLOPS = (
    ("h100", 989.0),
    ("h200", 989.0),
    ("gh200", 989.0),
    ("a100", 312.0),
    ("v6", 918.0),
    ("v5 lite", 197.0),
    ("v5e", 197.0),
    ("v5p", 459.0),
    ("v5", 459.0),  # a v5p reports its kind as "TPU v5"
    ("v4", 275.0),
)


def _matmul_flops_per_token(cfg: ModelConfig) -> dict[str, float]:
    """2 FLOPs per active weight per token: attention projections by layer kind, MoE (top-k experts
    and the router), LM head. The embedding lookup is not a matmul."""
    d, h, g, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    moe = 2 * (cfg.num_experts_per_tok * 3 * d * cfg.intermediate_size + d * cfg.num_local_experts)
    n_light = sum(kind == LIGHTNING for kind in cfg.attn_type_list)
    n_soft = len(cfg.attn_type_list) - n_light
    return {
        "lightning_proj": float(n_light * 2 * (5 * d * h * hd)),  # q, k, v, gate, out
        "softmax_proj": float(n_soft * 2 * (2 * d * h * hd + 2 * d * g * hd)),  # q, o; k, v
        "moe": float(len(cfg.attn_type_list) * moe),
        "lm_head": 2.0 * d * cfg.vocab_size,
    }


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by component, for rows of `seq_len` tokens."""
    h, hd = cfg.num_attention_heads, cfg.head_dim
    mm = _matmul_flops_per_token(cfg)
    n_light = sum(kind == LIGHTNING for kind in cfg.attn_type_list)
    n_soft = len(cfg.attn_type_list) - n_light
    c = min(cfg.block_size, seq_len)
    out = {"lightning_proj": mm["lightning_proj"], "softmax_proj": mm["softmax_proj"], "moe": mm["moe"]}
    out["lightning_attn"] = float(n_light * h * (2 * c * (hd + hd) + 4 * hd * hd))
    out["softmax_attn"] = float(n_soft * h * 2 * seq_len * hd)
    out["lm_head"] = mm["lm_head"]
    return out


def decode_flops_per_token(cfg: ModelConfig, context_len: int) -> dict[str, float]:
    """Forward FLOPs of one generated token that attends to `context_len` positions (itself
    included), by component: the matmuls of `forward_flops_per_token`, softmax layers
    4 * H * D * context_len, lightning layers 4 * H * Dk * Dv (constant-size state)."""
    if context_len < 1:
        raise ValueError(f"context_len must be >= 1, got {context_len}")
    h, hd = cfg.num_attention_heads, cfg.head_dim
    n_light = sum(kind == LIGHTNING for kind in cfg.attn_type_list)
    n_soft = len(cfg.attn_type_list) - n_light
    out = _matmul_flops_per_token(cfg)
    out["lightning_attn"] = float(n_light * 4 * h * hd * hd)
    out["softmax_attn"] = float(n_soft * 4 * h * hd * context_len)
    return out


def generation_flops_by_component(
    cfg: ModelConfig, prompt_len: int, gen_len: int, *, include_prefill: bool = False
) -> dict[str, float]:
    """FLOPs per sequence to generate `gen_len` tokens after a `prompt_len`-token prompt, by component.

    Generated token j (1-based) is one decode step at context `prompt_len + j`, so the softmax term
    sums to 4 * H * D * (gen_len * prompt_len + gen_len * (gen_len + 1) / 2) per softmax layer
    (quadratic in gen_len) and everything else is gen_len times the per-token cost (linear).
    include_prefill adds the prompt's forward pass (`prompt_len` tokens of `forward_flops_per_token`)
    under "prefill"; by default only the generation is counted.
    """
    if prompt_len < 0 or gen_len < 0:
        raise ValueError(f"prompt_len and gen_len must be >= 0, got {prompt_len}, {gen_len}")
    per = decode_flops_per_token(cfg, 1)
    out = {k: v * gen_len for k, v in per.items()}
    ctx_sum = gen_len * prompt_len + gen_len * (gen_len + 1) / 2  # sum of the contexts of the gen_len steps
    out["softmax_attn"] = per["softmax_attn"] * ctx_sum  # per["softmax_attn"] is the cost at context 1
    if include_prefill:
        out["prefill"] = sum(forward_flops_per_token(cfg, prompt_len).values()) * prompt_len if prompt_len else 0.0
    return out


def generation_flops(cfg: ModelConfig, prompt_len: int, gen_len: int, *, include_prefill: bool = False) -> float:
    """Total FLOPs per sequence to generate `gen_len` tokens after a `prompt_len`-token prompt
    (the sum of `generation_flops_by_component`; the prompt's forward pass only with include_prefill)."""
    return sum(generation_flops_by_component(cfg, prompt_len, gen_len, include_prefill=include_prefill).values())


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    f = forward_flops_per_token(cfg, seq_len)
    return 3.5 * f["lightning_attn"] + 3.0 * sum(v for k, v in f.items() if k != "lightning_attn")


def peak_flops_per_device(device=None, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device, from `override_tflops` or the device kind; None if unknown (CPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    kind = (device or jax.devices()[0]).device_kind.lower()
    for key, tflops in PEAK_TFLOPS:
        if key in kind:
            return tflops * 1e12
    return None


def mfu(tokens_per_s: float, flops_per_token: float, num_devices: int, peak_per_device: float | None):
    if not peak_per_device:
        return None
    return tokens_per_s * flops_per_token / (num_devices * peak_per_device)
