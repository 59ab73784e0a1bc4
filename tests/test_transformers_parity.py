"""Logits and aux loss against transformers' MiniMaxForCausalLM (random weights, fp32, torch CPU).

transformers rotates the whole head, so every config here has rotary_dim == head_dim
(partial RoPE is checked against the NumPy reference in test_numpy_reference.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import rel_err  # noqa: E402
from m1jax import M1Model, config, init_params  # noqa: E402
from m1jax.hf import load_pretrained, save_pretrained  # noqa: E402

L, F = "linear_attention", "full_attention"
CASES = {
    # heads*head_dim (64) != hidden (48); GQA 2 q heads per kv head; 3:1 pattern; 4 lightning blocks.
    "gqa_3to1_top2": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          layer_types=[L, L, L, F], num_experts_per_tok=2, block_size=16, seq=53),
    # MHA, top-1, M1's 7:1 pattern, 5 blocks of 8.
    "mha_7to1_top1": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                          layer_types=[L] * 7 + [F], num_experts_per_tok=1, block_size=8, seq=37),
    # softmax first, 4 q heads per kv head, 8 experts top-2, distinct alpha/beta per kind.
    "softmax_first_alpha": dict(hidden_size=40, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                layer_types=[F, L, L, F, L], num_local_experts=8, block_size=16, seq=41,
                                full_attn_alpha_factor=1.3, linear_attn_alpha_factor=2.1, mlp_alpha_factor=1.7,
                                full_attn_beta_factor=0.9, linear_attn_beta_factor=1.1, mlp_beta_factor=0.8),
}  # fmt: skip


def torch_model(seed=0, seq=None, **kw):
    base = dict(vocab_size=101, intermediate_size=40, num_local_experts=4, full_attn_alpha_factor=1.7,
                linear_attn_alpha_factor=1.7, mlp_alpha_factor=1.7)  # fmt: skip
    base["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    base.update(kw)
    base["num_hidden_layers"] = len(base["layer_types"])
    torch.manual_seed(seed)
    model = transformers.MiniMaxForCausalLM(transformers.MiniMaxConfig(**base)).eval()
    with torch.no_grad():  # O(1) activations so the comparison means something
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "gate.weight" in name:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.5 / p.shape[-1] ** 0.5)
    return model


def tokens(seq, batch=2, seed=0, vocab=101):
    return np.random.RandomState(seed).randint(0, vocab, (batch, seq))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    kw = dict(CASES[case])
    seq = kw.pop("seq")
    model = torch_model(**kw)
    model.save_pretrained(tmp_path)
    cfg, params = load_pretrained(str(tmp_path), dtype="float32")
    assert cfg.rotary_dim == cfg.head_dim
    tok = tokens(seq)
    with torch.no_grad():
        ref = model(torch.tensor(tok), output_router_logits=True)
    logits, aux = M1Model(cfg).apply({"params": params}, jnp.asarray(tok))
    err = rel_err(logits, ref.logits.numpy())
    print(f"{case}: logits rel err {err:.2e}")
    assert err <= 1e-4
    np.testing.assert_allclose(float(aux["router_aux_loss"]), float(ref.aux_loss), rtol=1e-5)


@pytest.mark.slow
def test_save_pretrained_round_trips_through_transformers(tmp_path):
    cfg = config.tiny(rotary_dim=16, num_hidden_layers=6, attn_type_list=(0, 0, 1, 0, 0, 1))
    params = init_params(cfg, jax.random.PRNGKey(3))
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim > 2 else x, params)  # std 0.08, not 0.02
    save_pretrained(cfg, params, str(tmp_path))
    model, info = transformers.MiniMaxForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tok = tokens(45, vocab=cfg.vocab_size)
    with torch.no_grad():
        ref = model.eval()(torch.tensor(tok)).logits.numpy()
    ours, _ = M1Model(cfg).apply({"params": params}, jnp.asarray(tok))
    assert rel_err(ours, ref) <= 1e-4
    cfg2, params2 = load_pretrained(str(tmp_path), dtype="float32", remat="none")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.slow
def test_partial_rotary_save_warns_and_reloads(tmp_path):
    cfg = config.tiny()  # rotary_dim 8 < head_dim 16
    params = init_params(cfg, jax.random.PRNGKey(0))
    with pytest.warns(UserWarning, match="rotary_dim"):
        save_pretrained(cfg, params, str(tmp_path), max_shard_bytes=20_000)  # several shards
    assert (tmp_path / "model.safetensors.index.json").exists()
    cfg2, params2 = load_pretrained(str(tmp_path), dtype="float32", remat="none")
    assert cfg2.rotary_dim == 8
    jax.tree.map(np.testing.assert_array_equal, params2, params)
