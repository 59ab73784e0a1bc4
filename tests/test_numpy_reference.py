"""m1jax vs an independent float64 NumPy reference (tests/numpy_m1.py), through official-layout checkpoints."""

from __future__ import annotations

import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np
import numpy_m1 as ref
import pytest

from conftest import rel_err
from m1jax import M1Model
from m1jax.hf import CheckpointError, load_pretrained

BLOCK = 16  # m1jax's lightning block size in these tests: T spans several blocks


def official_config(layers: list[int], **kw) -> dict:
    """A small official MiniMax-M1 config.json (attn_type_list: 0 lightning, 1 softmax)."""
    alpha = (2 * len(layers)) ** 0.25
    c = dict(
        architectures=["MiniMaxM1ForCausalLM"],
        model_type="minimax_m1",
        vocab_size=61,
        hidden_size=40,
        num_hidden_layers=len(layers),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rotary_dim=8,
        rope_theta=10_000.0,
        intermediate_size=24,
        num_local_experts=4,
        num_experts_per_tok=2,
        attn_type_list=layers,
        rms_norm_eps=1e-5,
        postnorm=True,
        tie_word_embeddings=False,
        hidden_act="silu",
        torch_dtype="float32",
    )
    for kind in ("full_attention", "linear_attention", "mlp"):
        c[f"layernorm_{kind}_alpha"], c[f"layernorm_{kind}_beta"] = alpha, 1.0
    c.update(kw)
    return c


CASES = {
    # 3:1 pattern, top-2, hidden 40 != 4*16, ragged T over 3 blocks
    "3to1_top2": (official_config([0, 0, 0, 1]), 45, 1),
    # 7:1 pattern, 6 heads / 2 kv heads (non-power-of-two ALiBi slopes), top-1, sharded checkpoint
    "7to1_6heads_top1_sharded": (
        official_config([0] * 7 + [1], num_attention_heads=6, num_key_value_heads=2, num_experts_per_tok=1),
        45,
        3,
    ),
    # head_dim 32 / rotary 16, 3 heads sharing one kv head, 8 experts top-2, exactly 4 blocks
    "hd32_rot16_3heads": (
        official_config(
            [0, 1, 0, 0, 1],
            hidden_size=48,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=32,
            rotary_dim=16,
            num_local_experts=8,
            rope_theta=1e7,
        ),
        64,
        2,
    ),
    # distinct alpha/beta per kind, softmax first, 12 heads / 4 kv heads
    "per_kind_alpha_beta_12heads": (
        official_config(
            [1, 0, 0, 1, 0, 0],
            num_attention_heads=12,
            num_key_value_heads=4,
            hidden_size=56,
            layernorm_full_attention_alpha=2.1,
            layernorm_full_attention_beta=0.7,
            layernorm_linear_attention_alpha=1.3,
            layernorm_linear_attention_beta=1.2,
            layernorm_mlp_alpha=1.7,
            layernorm_mlp_beta=0.9,
        ),
        40,
        1,
    ),
    # a single lightning layer: the slope factor is 1 + 1e-5 (no division by L - 1 = 0)
    "single_lightning_layer": (official_config([0], num_attention_heads=5, num_key_value_heads=5), 37, 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_m1jax_matches_numpy_reference(name, tmp_path):
    config, t, shards = CASES[name]
    tensors = ref.random_official(config, seed=sum(map(ord, name)))
    ref.write_official_checkpoint(str(tmp_path), config, tensors, shards=shards)
    if shards > 1:
        assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) == shards
    tokens = np.random.default_rng(0).integers(0, config["vocab_size"], size=(2, t))
    want = ref.forward(config, tensors, tokens)

    cfg, params = load_pretrained(str(tmp_path), dtype="float32", block_size=BLOCK)
    logits, _ = M1Model(cfg).apply({"params": params}, jnp.asarray(tokens))
    err = rel_err(logits, want)
    print(f"{name}: max|m1jax - numpy| / max|numpy| = {err:.2e} (max|numpy| = {np.max(np.abs(want)):.2f})")
    assert logits.shape == want.shape
    assert err <= 1e-4


# -- self-checks of the reference itself -----------------------------------------------------


def test_reference_lightning_recurrence_equals_direct_sum():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 9, 3, 4)) for _ in range(3))
    s = np.array([0.3, 0.05, 1.2])
    t = np.arange(9)
    decay = np.exp(-s[:, None, None] * (t[:, None] - t[None, :])) * (t[:, None] >= t[None, :])  # [H, T, T]
    direct = np.einsum("hts,bthd,bshd,bshe->bthe", decay, q, k, v)
    np.testing.assert_allclose(ref.lightning_recurrence(q, k, v, s), direct, rtol=1e-12, atol=1e-12)


def test_reference_slopes_official_rule():
    assert ref.alibi_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]
    # 6 heads: slopes of 4 heads, then every other slope of 8 heads (not 2^(-8(h+1)/6))
    assert ref.alibi_slopes(6) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    assert math.isclose(ref.lightning_decay_rates(8, 79, 80)[0], 0.5 * 1e-5)


# -- malformed checkpoints -----------------------------------------------------------------------


@pytest.fixture
def small_checkpoint():
    config = official_config([0, 1])
    return config, ref.random_official(config, seed=3)


def test_missing_tensor(small_checkpoint, tmp_path):
    config, tensors = small_checkpoint
    name = "model.layers.1.self_attn.k_proj.weight"
    del tensors[name]
    ref.write_official_checkpoint(str(tmp_path), config, tensors)
    with pytest.raises(CheckpointError, match=re.escape(name)):
        load_pretrained(str(tmp_path))


def test_wrong_shape(small_checkpoint, tmp_path):
    config, tensors = small_checkpoint
    name = "model.layers.0.self_attn.qkv_proj.weight"
    tensors[name] = tensors[name][:-1]
    ref.write_official_checkpoint(str(tmp_path), config, tensors)
    with pytest.raises(ValueError, match=re.escape(name)):
        load_pretrained(str(tmp_path))


def test_unexpected_tensor(small_checkpoint, tmp_path):
    config, tensors = small_checkpoint
    name = "model.layers.0.block_sparse_moe.experts.4.w1.weight"  # only 4 experts (0..3)
    tensors[name] = tensors["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    ref.write_official_checkpoint(str(tmp_path), config, tensors)
    with pytest.raises(ValueError, match=re.escape(name)):
        load_pretrained(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(small_checkpoint, tmp_path, damage):
    config, tensors = small_checkpoint
    ref.write_official_checkpoint(str(tmp_path), config, tensors)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": np.random.default_rng(0).bytes(4096), "empty": b""}[damage]
    )
    with pytest.raises(ValueError, match="corrupt"):
        load_pretrained(str(tmp_path))


def test_sharded_index_errors(small_checkpoint, tmp_path):
    config, tensors = small_checkpoint
    ref.write_official_checkpoint(str(tmp_path), config, tensors, shards=2)
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[1]  # the index points at the wrong shard
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        load_pretrained(str(tmp_path))
    (tmp_path / shards[1]).unlink()  # a shard named by the index is gone
    with pytest.raises(CheckpointError, match=re.escape(shards[1])):
        load_pretrained(str(tmp_path))


def test_missing_or_bad_config(small_checkpoint, tmp_path):
    config, tensors = small_checkpoint
    ref.write_official_checkpoint(str(tmp_path), config, tensors)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        load_pretrained(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(str(tmp_path))
