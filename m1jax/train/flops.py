"""Model FLOPs per token (SPEC section 3 counting) and model FLOPs utilisation.

Matmuls: 2 FLOPs per active weight per token (embedding lookup excluded, LM head included; a
token's top-k experts and the router). Attention: softmax causal 2*N*D per token per head
(forward); lightning 2C(Dk+Dv) + 4 Dk Dv per token per head (forward, chunk C), linear in N.
Training counts 3x the forward for matmuls and softmax attention, and 3.5x for lightning
(its backward is ~2.5x its forward).
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


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by component, for rows of `seq_len` tokens."""
    d, h, g, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    moe = 2 * (cfg.num_experts_per_tok * 3 * d * cfg.intermediate_size + d * cfg.num_local_experts)
    out = {"lightning_proj": 0.0, "softmax_proj": 0.0, "moe": 0.0, "lightning_attn": 0.0, "softmax_attn": 0.0}
    c = min(cfg.block_size, seq_len)
    for kind in cfg.attn_type_list:
        out["moe"] += moe
        if kind == LIGHTNING:
            out["lightning_proj"] += 2 * (5 * d * h * hd)  # q, k, v, gate, out
            out["lightning_attn"] += h * (2 * c * (hd + hd) + 4 * hd * hd)
        else:
            out["softmax_proj"] += 2 * (2 * d * h * hd + 2 * d * g * hd)  # q, o; k, v
            out["softmax_attn"] += h * 2 * seq_len * hd
    out["lm_head"] = 2.0 * d * cfg.vocab_size
    return out


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
