"""Hugging Face checkpoints: read both layouts of SPEC 1.5, write transformers' `MiniMaxForCausalLM`.

Tensor names on disk are shared by the official remote-code layout (`MiniMaxM1ForCausalLM`) and
transformers' port; they differ in config.json. Loading streams tensor by tensor into preallocated
stacked arrays, so peak host memory is about one copy of the model.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import warnings
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from m1jax.config import LIGHTNING, SOFTMAX, ModelConfig, layer_plan
from m1jax.layers import layer_slopes
from m1jax.model import abstract_params, pattern_runs

_LIGHTNING_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")  # derived, not weights
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: missing, unexpected or misshapen tensors."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor on disk and where it lives in the params tree.

    Ours is `[in..., out...]`; a PyTorch Linear is `[out, in]`, hence `transpose`.
    """

    name: str
    hf_shape: tuple[int, ...]
    path: tuple[str, ...]
    index: tuple[int, ...]  # position inside the stacked array (layer group, layer in run[, expert])
    shape: tuple[int, ...]  # our (unstacked) shape
    transpose: bool

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        return (w.T if self.transpose else w).reshape(self.shape)

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        if self.transpose:
            return np.ascontiguousarray(a.reshape(self.hf_shape[1], self.hf_shape[0]).T)
        return a.reshape(self.hf_shape)


# -- config ------------------------------------------------------------------------------


_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def config_from_hf(d: dict[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from either layout's config.json (dict). `overrides` win (e.g. dtype)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"config.json: expected a JSON object, got a JSON {type(d).__name__}")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise CheckpointError(f"config.json: missing required key(s) {missing}")
    model_type = d.get("model_type", "")
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act={d['hidden_act']!r} is not supported (only silu)")
    if d.get("shared_intermediate_size", 0):
        raise CheckpointError("config.json: shared experts (shared_intermediate_size > 0) are not part of M1")
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    kw: dict[str, Any] = {
        k: d[k]
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "num_local_experts",
            "num_experts_per_tok",
            "rms_norm_eps",
            "router_aux_loss_coef",
            "tie_word_embeddings",
            "initializer_range",
        )
        if k in d
    }
    kw["head_dim"] = head_dim
    kw["num_key_value_heads"] = d.get("num_key_value_heads") or heads
    if "attn_type_list" in d:  # official layout
        kw["attn_type_list"] = tuple(d["attn_type_list"])
        kw["rotary_dim"] = d.get("rotary_dim", head_dim)
        kw["rope_theta"] = d.get("rope_theta", 10_000.0)
        kw["postnorm"] = d.get("postnorm", True)
        for kind in ("full_attention", "linear_attention", "mlp"):
            for ab in ("alpha", "beta"):
                key = f"layernorm_{kind}_{ab}"
                kw[key] = d.get(key, 1.0)
    elif "layer_types" in d or model_type == "minimax":  # transformers layout
        names = {"linear_attention": LIGHTNING, "full_attention": SOFTMAX}
        types = d.get("layer_types") or ["full_attention"] * d["num_hidden_layers"]
        unknown = sorted({t for t in types if t not in names})
        if unknown:
            raise CheckpointError(f"config.json: unknown layer_types {unknown}")
        kw["attn_type_list"] = tuple(names[t] for t in types)
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise CheckpointError(f"config.json: rope_type={rope['rope_type']!r} is not supported")
        kw["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 1_000_000.0))
        kw["rotary_dim"] = d.get("rotary_dim", head_dim)  # transformers itself rotates the whole head
        kw["block_size"] = d.get("block_size", 256)
        kw["postnorm"] = True
        for ours, theirs in (("full_attention", "full_attn"), ("linear_attention", "linear_attn"), ("mlp", "mlp")):
            kw[f"layernorm_{ours}_alpha"] = d.get(f"{theirs}_alpha_factor", 1.0)
            kw[f"layernorm_{ours}_beta"] = d.get(f"{theirs}_beta_factor", 1.0)
    else:
        raise CheckpointError(
            f"config.json: neither `attn_type_list` (official layout) nor `layer_types` (transformers) found; "
            f"model_type={model_type!r}"
        )
    dtype = str(d.get("dtype") or d.get("torch_dtype") or "float32")
    kw["param_dtype"] = dtype if dtype in _NP_DTYPES else "float32"
    kw.update(overrides)
    return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json of transformers' MiniMaxForCausalLM (plus `rotary_dim`, which it ignores)."""
    kinds = {LIGHTNING: "linear_attention", SOFTMAX: "full_attention"}
    return {
        "architectures": ["MiniMaxForCausalLM"],
        "model_type": "minimax",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "num_local_experts": cfg.num_local_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "rms_norm_eps": cfg.rms_norm_eps,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "layer_types": [kinds[t] for t in cfg.attn_type_list],
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rotary_dim": cfg.rotary_dim,
        "block_size": cfg.block_size,
        "max_position_embeddings": 10_240_000,
        "full_attn_alpha_factor": cfg.layernorm_full_attention_alpha,
        "full_attn_beta_factor": cfg.layernorm_full_attention_beta,
        "linear_attn_alpha_factor": cfg.layernorm_linear_attention_alpha,
        "linear_attn_beta_factor": cfg.layernorm_linear_attention_beta,
        "mlp_alpha_factor": cfg.layernorm_mlp_alpha,
        "mlp_beta_factor": cfg.layernorm_mlp_beta,
        "dtype": cfg.param_dtype,
    }


# -- tensor map --------------------------------------------------------------------------


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every weight tensor of the checkpoint, in a fixed order."""
    d, h, g, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    e, f, v = cfg.num_local_experts, cfg.intermediate_size, cfg.vocab_size
    specs = [TensorSpec("model.embed_tokens.weight", (v, d), ("embed",), (), (v, d), False)]
    pattern, n_groups, tail = layer_plan(cfg)
    p = len(pattern)
    for layer, kind in enumerate(cfg.attn_type_list):
        stack, group = ("groups", layer // p) if layer < n_groups * p else ("tail", 0)
        pos = layer % p if stack == "groups" else layer - n_groups * p
        run, (_, offset, _) = next(
            (j, r) for j, r in enumerate(pattern_runs(pattern if stack == "groups" else tail)) if r[1] + r[2] > pos
        )
        base, index = (stack, f"run_{run}"), (group, pos - offset)
        pre = f"model.layers.{layer}."

        def add(name, hf_shape, path, shape, transpose, extra=(), base=base, pre=pre, index=index):
            specs.append(TensorSpec(pre + name, hf_shape, base + path, (*index, *extra), shape, transpose))

        add("input_layernorm.weight", (d,), ("input_norm", "scale"), (d,), False)
        add("post_attention_layernorm.weight", (d,), ("post_norm", "scale"), (d,), False)
        if kind == LIGHTNING:
            add("self_attn.qkv_proj.weight", (3 * h * hd, d), ("attn", "qkv"), (d, h, 3, hd), True)
            add("self_attn.output_gate.weight", (h * hd, d), ("attn", "gate"), (d, h, hd), True)
            add("self_attn.norm.weight", (h * hd,), ("attn", "norm", "scale"), (h, hd), False)
            add("self_attn.out_proj.weight", (d, h * hd), ("attn", "out"), (h, hd, d), True)
        else:
            add("self_attn.q_proj.weight", (h * hd, d), ("attn", "q"), (d, h, hd), True)
            add("self_attn.k_proj.weight", (g * hd, d), ("attn", "k"), (d, g, hd), True)
            add("self_attn.v_proj.weight", (g * hd, d), ("attn", "v"), (d, g, hd), True)
            add("self_attn.o_proj.weight", (d, h * hd), ("attn", "o"), (h, hd, d), True)
        add("block_sparse_moe.gate.weight", (e, d), ("moe", "router"), (d, e), True)
        for x in range(e):
            ex = f"block_sparse_moe.experts.{x}."
            add(ex + "w1.weight", (f, d), ("moe", "w1"), (d, f), True, (x,))
            add(ex + "w3.weight", (f, d), ("moe", "w3"), (d, f), True, (x,))
            add(ex + "w2.weight", (d, f), ("moe", "w2"), (f, d), True, (x,))
    specs.append(TensorSpec("model.norm.weight", (d,), ("final_norm", "scale"), (), (d,), False))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (v, d), ("lm_head",), (), (d, v), True))
    return specs


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _is_derived(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in _LIGHTNING_BUFFERS or name.endswith("rotary_emb.inv_freq")


# -- loading -----------------------------------------------------------------------------


def _shard_files(path: str) -> dict[str, str]:
    """tensor name -> safetensors file, from the files' own headers, checked against the index."""
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        single = os.path.join(path, "model.safetensors")
        if not os.path.exists(single):
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
        return {n: single for n in _open(single).keys()}
    try:
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
    files: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        file = os.path.join(path, shard)
        if not os.path.exists(file):
            raise CheckpointError(f"{index} names shard {shard}, which does not exist")
        for name in _open(file).keys():  # reads the header only
            files[name] = file
    for name, shard in weight_map.items():
        if files.get(name) != os.path.join(path, shard):
            raise CheckpointError(f"{index} places tensor {name} in {shard}, but that shard does not hold it")
    return files


def _open(file: str):
    try:
        return safe_open(file, framework="numpy")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: corrupt or unreadable safetensors file ({e})") from e


def load_pretrained(
    path: str, *, param_dtype: str | None = None, shardings=None, check_finite: bool = True, **overrides: Any
):
    """Read a Hugging Face MiniMax checkpoint directory -> (ModelConfig, params).

    Accepts the official (`attn_type_list`) and transformers (`layer_types`) layouts, single or
    sharded safetensors. `param_dtype` defaults to the checkpoint's dtype; `overrides` are
    ModelConfig fields (e.g. dtype="float32"). `shardings`: optional `cfg -> pytree of
    jax.sharding.Sharding` (e.g. `lambda c: m1jax.sharding.param_shardings(c, mesh)`); each
    parameter goes straight onto its devices. Raises CheckpointError naming any missing,
    unexpected or misshapen tensor, and (`check_finite`, on by default) any tensor holding NaN or
    Inf; on a huge model `check_finite=False` skips that pass over the weights.

    Memory: parameters are assembled one stacked array at a time and handed to JAX at once, so the
    host holds the model plus one stacked array, never two copies.
    """
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise CheckpointError(f"{path}: no config.json")
    try:
        with open(cfg_file) as fh:
            hf_cfg = json.load(fh)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from e
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    try:
        cfg = config_from_hf(hf_cfg, **overrides)
    except CheckpointError as e:
        raise CheckpointError(f"{cfg_file}: {str(e).removeprefix('config.json: ')}") from None
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as e:  # a key of the wrong type or value
        raise CheckpointError(f"{cfg_file}: invalid config ({type(e).__name__}: {e})") from e
    specs = tensor_specs(cfg)
    files = _shard_files(path)
    expected = {s.name for s in specs}
    missing = sorted(expected - set(files))
    if missing:
        raise CheckpointError(
            f"{path}: missing tensor(s) {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else "")
        )
    unexpected = sorted(n for n in files if n not in expected and not _is_derived(n))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {', '.join(unexpected[:8])}")

    shapes = nn.unbox(abstract_params(cfg))
    placement = shardings(cfg) if shardings is not None else jax.tree.map(lambda _: None, shapes)
    by_leaf: dict[tuple[str, ...], list[TensorSpec]] = {}
    for spec in specs:
        by_leaf.setdefault(spec.path, []).append(spec)
    reader = _ShardReader()
    out: dict = {}
    for leaf_path, leaf_specs in by_leaf.items():
        shape = _get(shapes, leaf_path)
        buf = np.empty(shape.shape, _NP_DTYPES[str(jnp.dtype(shape.dtype))])
        for spec in sorted(leaf_specs, key=lambda s: files[s.name]):  # few shard switches
            w = reader.get(files[spec.name], spec.name)
            if tuple(w.shape) != spec.hf_shape:
                raise CheckpointError(f"tensor {spec.name} has shape {tuple(w.shape)}, expected {spec.hf_shape}")
            if check_finite and not np.isfinite(w).all():
                bad = int(np.size(w) - np.count_nonzero(np.isfinite(w)))
                raise CheckpointError(
                    f"{files[spec.name]}: tensor {spec.name} holds {bad} NaN/Inf value(s) "
                    "(check_finite=False loads it anyway)"
                )
            buf[spec.index] = spec.to_ours(w).astype(buf.dtype, copy=False)
        sharding = _get(placement, leaf_path)
        _set(out, leaf_path, jax.block_until_ready(jax.device_put(buf, sharding)))
        del buf
        _release_freed_memory()
    reader.close()
    return cfg, out


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps buffers below its mmap threshold)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class _ShardReader:
    """One open safetensors file at a time: a closed file's mmapped pages do not stay resident."""

    def __init__(self):
        self.file, self.handle = None, None

    def get(self, file: str, name: str) -> np.ndarray:
        if file != self.file:
            self.close()
            self.file, self.handle = file, _open(file)
        try:
            return self.handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {name} ({e})") from e

    def close(self):
        self.file, self.handle = None, None


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# -- saving ------------------------------------------------------------------------------


def _lightning_buffers(cfg: ModelConfig, layer: int) -> dict[str, np.ndarray]:
    """transformers' derived lightning buffers, computed from the official slopes, so that
    transformers (which would use its own slope formula) reproduces this model exactly."""
    s = np.asarray(layer_slopes(cfg.num_attention_heads, layer, cfg.num_hidden_layers), np.float32)[:, None, None]
    r = np.arange(cfg.block_size, dtype=np.float32) + 1
    diag = s[None] * (r[:, None] - r[None, :])[None, None]
    with np.errstate(over="ignore"):
        diag = np.exp(np.where(diag >= 0, -diag, -np.inf)).astype(np.float32)
    return {
        "slope_rate": s,
        "query_decay": np.exp(-s * r[:, None]).astype(np.float32),
        "key_decay": np.exp(-s * (cfg.block_size - r[:, None])).astype(np.float32),
        "diagonal_decay": diag,
    }


def _hf_tensors(cfg: ModelConfig, params) -> Iterator[tuple[str, np.ndarray]]:
    dtype = _NP_DTYPES[cfg.param_dtype]
    for spec in tensor_specs(cfg):
        a = np.asarray(_get(params, spec.path)[spec.index])
        if a.shape != spec.shape:
            raise CheckpointError(
                f"param {'/'.join(spec.path)}{list(spec.index)} has shape {a.shape}, expected {spec.shape}"
            )
        keep_f32 = spec.path[-1] == "router"
        yield spec.name, spec.to_hf(a).astype(np.float32 if keep_f32 else dtype)
    for layer, kind in enumerate(cfg.attn_type_list):
        if kind == LIGHTNING:
            for k, buf in _lightning_buffers(cfg, layer).items():
                yield f"model.layers.{layer}.self_attn.{k}", buf


def save_pretrained(cfg: ModelConfig, params, path: str, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write transformers' MiniMaxForCausalLM layout: config.json + (sharded) safetensors."""
    if cfg.rotary_dim != cfg.head_dim:
        warnings.warn(
            f"rotary_dim={cfg.rotary_dim} < head_dim={cfg.head_dim}: transformers' MiniMax rotates the whole head, "
            "so it will not reproduce this model (m1jax.hf.load_pretrained reads rotary_dim back and does).",
            stacklevel=2,
        )
    os.makedirs(path, exist_ok=True)
    shard: dict[str, np.ndarray] = {}
    shard_bytes = 0
    sizes: list[int] = []  # bytes of each shard written so far
    weight_map: dict[str, int] = {}
    for name, t in _hf_tensors(cfg, params):
        if shard and shard_bytes + t.nbytes > max_shard_bytes:
            sizes.append(_write_shard(path, len(sizes), shard))  # hold one shard in memory at a time
            shard, shard_bytes = {}, 0
        shard[name] = t
        shard_bytes += t.nbytes
        weight_map[name] = len(sizes)
    sizes.append(_write_shard(path, len(sizes), shard))
    total = len(sizes)
    names = (
        [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)] if total > 1 else ["model.safetensors"]
    )
    for i, name in enumerate(names):
        os.replace(_tmp_name(path, i), os.path.join(path, name))
    if total > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": {n: names[i] for n, i in weight_map.items()}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
            json.dump(index, fh, indent=2)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config_to_hf(cfg), fh, indent=2)


def _tmp_name(path: str, i: int) -> str:
    return os.path.join(path, f".shard-{i:05d}.tmp")


def _write_shard(path: str, i: int, tensors: dict[str, np.ndarray]) -> int:
    """Write shard i under a temporary name (renamed once all are written); returns its bytes."""
    save_file(tensors, _tmp_name(path, i), metadata={"format": "pt"})
    return sum(t.nbytes for t in tensors.values())
