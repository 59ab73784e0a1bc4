"""Workdirs and configs written before the layered config still work, or fail naming the fix.

tests/fixtures/pretrain_v1 is a pretraining workdir written by the code of the flat config (keys
like `learning_rate`, `log_every` at the top; DeepNorm alphas baked into the presets), stopped at
step 2 of 4; expected.json holds the losses that code logged for steps 3 and 4 when resumed.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from m1jax import config as presets
from m1jax.train import config as tc
from m1jax.train.loop import train
from m1jax.train.metrics import read_metrics

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "pretrain_v1")


@pytest.fixture
def old_workdir(tmp_path):
    path = tmp_path / "pretrain_v1"
    shutil.copytree(FIXTURE, path)
    return path


def test_upgrade_moves_every_flat_key_and_keeps_the_old_alphas():
    with open(os.path.join(FIXTURE, "config.json")) as fh:
        flat = json.load(fh)
    c = tc.load_stored(os.path.join(FIXTURE, "config.json"))
    cfg = tc.validate(c)  # no unknown or renamed field is left
    for old, new in tc.RENAMED.items():
        assert tc.field(c, new) == pytest.approx(flat[old]), old
    assert cfg.layernorm_mlp_alpha == pytest.approx((2 * 4) ** 0.25)  # the old tiny preset's, not (2 * 2) ** 0.25
    assert tc.upgrade(json.loads(c.to_json())) == json.loads(c.to_json())  # the current layout is left alone


@pytest.mark.slow
def test_an_old_workdir_resumes_with_the_losses_the_old_code_logged(old_workdir):
    with open(os.path.join(FIXTURE, "expected.json")) as fh:
        want = {int(k): v for k, v in json.load(fh)["resumed_losses"].items()}
    c = tc.load_stored(str(old_workdir / "config.json"))
    out = train(c, str(old_workdir), progress=False)
    assert out["start_step"] == 2 and out["end_step"] == 4
    got = {r["step"]: r["loss"] for r in read_metrics(str(old_workdir)) if "loss" in r}
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), (step, got[step], loss)
    stored = json.loads((old_workdir / "config.json").read_text())
    assert "optim" in stored and "learning_rate" not in stored  # rewritten in the current layout


@pytest.mark.slow
def test_resuming_with_another_model_names_the_fields(old_workdir):
    c = tc.load_stored(str(old_workdir / "config.json"))
    for f in ("layernorm_full_attention_alpha", "layernorm_linear_attention_alpha", "layernorm_mlp_alpha"):
        del c.model[f]  # a config written today: the alphas follow the layer count
    with pytest.raises(ValueError, match=r"another model: .* layernorm_full_attention_alpha=1\.68"):
        train(c, str(old_workdir), progress=False)
    c.model.hidden_size = 32
    with pytest.raises(ValueError, match=r"hidden_size=16 \(config: 32\)"):
        train(c, str(old_workdir), progress=False)


def test_rl_initialises_from_an_old_pretraining_workdir(old_workdir):
    from m1jax.sharding import mesh_from_config
    from rl.loop import load_pretrained

    pc, cfg, params = load_pretrained(str(old_workdir), mesh_from_config({"data": 1}, jax.devices()[:1]))
    assert pc.optim.learning_rate == 0.003 and cfg.num_hidden_layers == 2
    assert cfg.layernorm_mlp_alpha == pytest.approx((2 * 4) ** 0.25)
    assert params["embed"].shape == (264, 16)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_an_unreadable_stored_config_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json holds a JSON list"):
        tc.load_stored(str(path))
    path.write_text(json.dumps({"learning_rate": 1.0, "model": {"preset": "nope"}}))
    with pytest.raises(ValueError, match="not a pretraining config.*preset='nope'"):
        tc.load_stored(str(path))


def test_alphas_follow_the_layer_count_unless_set():
    alpha = lambda n: (2 * n) ** 0.25
    c = presets.tiny(num_hidden_layers=2, attn_type_list=(0, 1))
    assert c.layernorm_mlp_alpha == c.layernorm_linear_attention_alpha == pytest.approx(alpha(2))
    deeper = c.replace(num_hidden_layers=6, attn_type_list=(0, 0, 1) * 2)
    assert deeper.layernorm_full_attention_alpha == pytest.approx(alpha(6))
    pinned = presets.tiny(layernorm_mlp_alpha=1.5).replace(num_hidden_layers=8, attn_type_list=(0,) * 7 + (1,))
    assert pinned.layernorm_mlp_alpha == 1.5 and pinned.layernorm_full_attention_alpha == pytest.approx(alpha(8))
    assert presets.medium().layernorm_mlp_alpha == pytest.approx(alpha(16))  # was 8 layers' alpha
    assert presets.minimax_m1().layernorm_mlp_alpha == pytest.approx(presets.M1_ALPHA)
    assert presets.ModelConfig.from_dict(c.to_dict()) == c
    # A preset's depth alone can be overridden: its 7:1 (tiny: 3:1) pattern follows.
    assert presets.mini(num_hidden_layers=16).attn_type_list == presets.m1_layer_types(16, 8)
