"""Model configuration: one frozen dataclass, validated before anything is built.

Field names follow MiniMax-M1's own `config.json` where one exists (`attn_type_list`,
`layernorm_*_alpha`, `rotary_dim`, ...), so a checkpoint's config maps onto it key for key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from m1jax.kernels.registry import LIGHTNING_IMPLS, SOFTMAX_IMPLS

LIGHTNING = 0  # attn_type_list value of a lightning (linear) attention layer
SOFTMAX = 1  # attn_type_list value of a softmax (full) attention layer

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MOE_IMPLS = ("auto", "dense", "tiled", "ragged")
PARALLEL_IMPLS = ("shard_map", "gspmd")  # see m1jax.parallel
# How the model is computed, not what it computes: free to change when a run resumes.
IMPL_FIELDS = ("block_size", "dtype", "param_dtype", "lm_head_fp32", "remat", "moe_impl", "lightning_impl")
IMPL_FIELDS += ("softmax_impl", "parallel_impl", "moe_capacity_factor")
_ALPHAS = ("layernorm_full_attention_alpha", "layernorm_linear_attention_alpha", "layernorm_mlp_alpha")


def deepnorm_alpha(num_layers: int) -> float:
    """DeepNorm's residual scale (2N)^(1/4) for N layers (M1, N = 80: 3.5566)."""
    return (2 * num_layers) ** 0.25


M1_ALPHA = deepnorm_alpha(80)


def m1_layer_types(num_layers: int = 80, period: int = 8) -> tuple[int, ...]:
    """`period - 1` lightning layers, then one softmax layer, repeated."""
    return tuple(SOFTMAX if (i + 1) % period == 0 else LIGHTNING for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """MiniMax-M1 hyper-parameters. Defaults are the published M1 values."""

    vocab_size: int = 200_064
    hidden_size: int = 6144
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8  # softmax layers only
    head_dim: int = 128
    intermediate_size: int = 9216  # per expert
    num_local_experts: int = 32
    num_experts_per_tok: int = 2
    attn_type_list: tuple[int, ...] = m1_layer_types()  # 0 lightning, 1 softmax
    rotary_dim: int = 64  # partial NeoX RoPE on the first rotary_dim dims of each head
    rope_theta: float = 10_000_000.0
    rms_norm_eps: float = 1e-5
    lightning_norm_eps: float = 1e-6  # the joint RMSNorm over all heads' outputs
    layernorm_full_attention_alpha: float | None = None  # None: deepnorm_alpha(num_hidden_layers)
    layernorm_full_attention_beta: float = 1.0
    layernorm_linear_attention_alpha: float | None = None  # None: deepnorm_alpha(num_hidden_layers)
    layernorm_linear_attention_beta: float = 1.0
    layernorm_mlp_alpha: float | None = None  # None: deepnorm_alpha(num_hidden_layers)
    layernorm_mlp_beta: float = 1.0
    postnorm: bool = True  # residual branch is the normed input (M1); False: the raw input
    router_aux_loss_coef: float = 0.001
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Implementation choices (not part of the published architecture).
    block_size: int = 256  # lightning chunk length
    dtype: str = "auto"  # compute dtype; auto: bfloat16 on TPU/GPU, float32 on CPU
    param_dtype: str = "float32"
    lm_head_fp32: bool = True  # LM head matmul in fp32 (M1's RL recipe)
    remat: str = "full"  # per-layer rematerialisation policy, one of REMAT_POLICIES
    moe_impl: str = "auto"  # auto: tiled on CPU, ragged_dot on accelerators
    lightning_impl: str = "auto"  # auto: the Pallas kernel on TPU/GPU, the jnp reference on CPU
    softmax_impl: str = "auto"  # auto: the flash loop (m1jax.kernels.registry.SOFTMAX)
    # On a mesh with "expert" / "sequence" axes: "shard_map" runs all-to-all expert dispatch and
    # LASP-2 / all-gathered-KV sequence parallelism (m1jax.parallel); "gspmd" leaves it to XLA.
    parallel_impl: str = "shard_map"
    moe_capacity_factor: float = 0.0  # expert all-to-all buffer per shard; 0: dropless (worst case)

    def __post_init__(self):
        if isinstance(self.attn_type_list, list):
            object.__setattr__(self, "attn_type_list", tuple(self.attn_type_list))
        # Derived unless set: the alphas follow the layer count (also through `replace`).
        derived = frozenset(f for f in _ALPHAS if getattr(self, f) is None)
        if isinstance(self.num_hidden_layers, int) and self.num_hidden_layers > 0:
            for f in derived:
                object.__setattr__(self, f, deepnorm_alpha(self.num_hidden_layers))
        object.__setattr__(self, "_derived", derived)
        _validate(self)

    # -- derived values ---------------------------------------------------------------
    @property
    def compute_dtype(self):
        if self.dtype == "auto":
            return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes`; derived fields (the DeepNorm alphas) are derived again."""
        derived = {f: None for f in getattr(self, "_derived", ()) if f not in changes}
        return dataclasses.replace(self, **derived, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attn_type_list"] = list(self.attn_type_list)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**d)


def _validate(c: ModelConfig) -> None:
    def bad(field: str, why: str):
        raise ValueError(f"ModelConfig.{field}={getattr(c, field)!r}: {why}")

    for f in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "num_local_experts",
        "num_experts_per_tok",
        "block_size",
    ):
        v = getattr(c, f)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            bad(f, "must be a positive integer")
    if c.num_attention_heads % c.num_key_value_heads:
        bad("num_key_value_heads", f"must divide num_attention_heads={c.num_attention_heads}")
    if c.num_experts_per_tok > c.num_local_experts:
        bad("num_experts_per_tok", f"top-k exceeds num_local_experts={c.num_local_experts}")
    if not isinstance(c.rotary_dim, int) or c.rotary_dim < 0 or c.rotary_dim % 2:
        bad("rotary_dim", "must be a non-negative even integer")
    if c.rotary_dim > c.head_dim:
        bad("rotary_dim", f"exceeds head_dim={c.head_dim}")
    if len(c.attn_type_list) != c.num_hidden_layers:
        bad("attn_type_list", f"has {len(c.attn_type_list)} entries, expected num_hidden_layers={c.num_hidden_layers}")
    for i, t in enumerate(c.attn_type_list):
        if t not in (LIGHTNING, SOFTMAX):
            bad("attn_type_list", f"unknown layer type {t!r} at layer {i} (0 = lightning, 1 = softmax)")
    for f in ("rms_norm_eps", "lightning_norm_eps", "rope_theta"):
        v = getattr(c, f)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            bad(f, "must be a positive finite number")
    if c.dtype != "auto" and c.dtype not in _DTYPES:
        bad("dtype", f"must be 'auto' or one of {sorted(_DTYPES)}")
    if c.param_dtype not in _DTYPES:
        bad("param_dtype", f"must be one of {sorted(_DTYPES)}")
    for f in _ALPHAS + ("layernorm_full_attention_beta", "layernorm_linear_attention_beta", "layernorm_mlp_beta"):
        v = getattr(c, f)
        if not (isinstance(v, (int, float)) and math.isfinite(v)):
            bad(f, "must be a finite number")
    if not (c.moe_capacity_factor >= 0 and math.isfinite(c.moe_capacity_factor)):
        bad("moe_capacity_factor", "must be 0 (dropless) or a positive finite number")
    for f, allowed in (
        ("remat", REMAT_POLICIES),
        ("moe_impl", MOE_IMPLS),
        ("lightning_impl", LIGHTNING_IMPLS),
        ("softmax_impl", SOFTMAX_IMPLS),
        ("parallel_impl", PARALLEL_IMPLS),
    ):
        if getattr(c, f) not in allowed:
            bad(f, f"must be one of {list(allowed)}")


# -- layer plan ------------------------------------------------------------------------


def layer_plan(c: ModelConfig) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    """Split `attn_type_list` into a repeating group and a tail.

    Returns (group pattern, number of groups, tail pattern): the model scans over the groups
    (M1: 10 x [7 lightning + 1 softmax]) and runs the tail (a prefix of the pattern, for depths
    that are not a multiple of the period) as one more scanned step.
    """
    types = c.attn_type_list
    n = len(types)
    period = next(p for p in range(1, n + 1) if all(types[i] == types[i - p] for i in range(p, n)))
    return types[:period], n // period, types[: n % period]


# -- presets: the one home of model shapes (run configs in configs/ name one) ---------------

PRESETS: dict[str, Any] = {}


def preset(fn):
    """Register a preset: a function of ModelConfig overrides, listed in PRESETS by its name."""
    PRESETS[fn.__name__] = fn
    return fn


def _layers(overrides: dict, num_layers: int, period: int) -> dict:
    """num_hidden_layers and an M1-style attn_type_list (period - 1 lightning, then softmax) of that
    depth: a preset's depth can be overridden alone."""
    n = overrides.get("num_hidden_layers", num_layers)
    return {"num_hidden_layers": n, "attn_type_list": m1_layer_types(n, period) if isinstance(n, int) and n > 0 else ()}


@preset
def minimax_m1(**overrides: Any) -> ModelConfig:
    """The published MiniMax-M1 (and MiniMax-Text-01) architecture: 456.09B parameters."""
    return ModelConfig(**(_layers(overrides, 80, 8) | overrides))


@preset
def tiny(**overrides: Any) -> ModelConfig:
    """A few-thousand-parameter model for unit tests (fp32 everywhere)."""
    base = dict(
        vocab_size=97,
        hidden_size=48,
        **_layers(overrides, 4, 4),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        rotary_dim=8,
        rope_theta=10_000.0,
        block_size=16,
        dtype="float32",
        param_dtype="float32",
        remat="none",
    )
    return ModelConfig(**(base | overrides))


@preset
def toy(**overrides: Any) -> ModelConfig:
    """`tiny` at 2 layers (1 lightning + 1 softmax) over a 16-token digit vocabulary: RL from scratch."""
    shape = dict(vocab_size=16, hidden_size=64, num_hidden_layers=2, attn_type_list=(LIGHTNING, SOFTMAX))
    return tiny(**(shape | dict(rotary_dim=16, intermediate_size=128, block_size=8) | overrides))


@preset
def mini(**overrides: Any) -> ModelConfig:
    """The embedded default: `small` narrowed to 3.8M parameters (2.2M active), byte tokenizer."""
    shape = dict(vocab_size=264, hidden_size=128, num_attention_heads=4, head_dim=32, rotary_dim=16)  # 261 ids
    shape |= dict(intermediate_size=256, num_local_experts=4, block_size=32, dtype="auto", remat="none")
    return small(**(shape | overrides))


@preset
def small(**overrides: Any) -> ModelConfig:
    """A 118M-parameter 7:1 hybrid (29M active) with a 32K vocabulary, fp32: fits a laptop CPU."""
    base = dict(
        vocab_size=32_000,
        hidden_size=512,
        **_layers(overrides, 8, 8),
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=768,
        num_local_experts=8,
        num_experts_per_tok=2,
        rotary_dim=32,
        rope_theta=10_000.0,
        block_size=64,  # the fastest jnp lightning block on CPU
        dtype="float32",
        param_dtype="float32",
    )
    return ModelConfig(**(base | overrides))


@preset
def medium(**overrides: Any) -> ModelConfig:
    """`small` at 16 layers and 1024 wide over the byte tokenizer: 480M parameters (180M active), one GPU."""
    shape = dict(vocab_size=264, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, block_size=128)
    shape |= dict(intermediate_size=1024, dtype="auto", remat="dots_no_batch")
    return small(**(shape | {"num_hidden_layers": 16} | overrides))
