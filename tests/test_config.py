"""ModelConfig validation, presets, layer plan, and the exact M1 parameter count."""

import math

import jax
import pytest

from m1jax import abstract_params, config, layer_plan
from m1jax.config import ModelConfig


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
        (dict(rotary_dim=7), "rotary_dim"),
        (dict(rotary_dim=32), "rotary_dim"),  # > head_dim=16
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(attn_type_list=(0, 0, 2, 1)), "attn_type_list"),
        (dict(attn_type_list=(0, 1)), "attn_type_list"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(dtype="float64"), "dtype"),
        (dict(remat="sometimes"), "remat"),
        (dict(moe_impl="fast"), "moe_impl"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(block_size=0), "block_size"),
    ],
)
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        config.tiny(**changes)


def test_unknown_field_in_dict_is_an_error():
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**config.tiny().to_dict(), "bogus": 1})


def test_dict_round_trip():
    c = config.small()
    assert ModelConfig.from_dict(c.to_dict()) == c


def test_pattern_runs():
    from m1jax.model import pattern_runs

    assert pattern_runs((0,) * 7 + (1,)) == [(0, 0, 7), (1, 7, 1)]
    assert pattern_runs((1, 0, 0, 1, 1)) == [(1, 0, 1), (0, 1, 2), (1, 3, 2)]


def test_layer_plan():
    m1 = config.minimax_m1()
    assert layer_plan(m1) == ((0,) * 7 + (1,), 10, ())
    assert m1.attn_type_list.index(1) == 7 and m1.attn_type_list[79] == 1
    c = config.tiny(num_hidden_layers=10, attn_type_list=(0, 0, 0, 1) * 2 + (0, 0))
    assert layer_plan(c) == ((0, 0, 0, 1), 2, (0, 0))
    c = config.tiny(num_hidden_layers=5, attn_type_list=(1, 0, 0, 1, 1))
    assert layer_plan(c) == ((1, 0, 0, 1), 1, (1,))
    c = config.tiny(num_hidden_layers=3, attn_type_list=(1, 0, 0))
    assert layer_plan(c) == ((1, 0, 0), 1, ())


def count(cfg):
    """(total, active excluding embedding and LM head) from jax.eval_shape of init, never allocated."""
    shapes = abstract_params(cfg)
    leaves = jax.tree_util.tree_leaves_with_path(shapes, is_leaf=lambda x: hasattr(x, "names"))
    total = active = 0
    k_over_e = cfg.num_experts_per_tok / cfg.num_local_experts
    for path, leaf in leaves:
        n = math.prod(leaf.value.shape)
        name = jax.tree_util.keystr(path)
        total += n
        if "embed'" in name.split("[")[-1] or "lm_head" in name:
            continue
        active += n * k_over_e if any(w in name for w in ("'w1'", "'w2'", "'w3'")) else n
    return total, active


def test_minimax_m1_size():
    cfg = config.minimax_m1()
    total, active = count(cfg)
    assert round(total / 1e9, 2) == 456.09
    assert round(active / 1e9, 2) == 45.94
    assert cfg.layernorm_mlp_alpha == pytest.approx(3.5565588, abs=1e-7)
