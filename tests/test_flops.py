"""Analytic FLOP counts (m1jax.train.flops): hand counts on the tiny config, and the shape of the
generation cost (linear for lightning layers, quadratic for softmax layers)."""

import math

import pytest

from m1jax import config
from m1jax.config import LIGHTNING
from m1jax.summary import param_counts
from m1jax.train import flops

# config.tiny(): vocab 97, hidden 48, 4 layers (3 lightning, 1 softmax), 4 heads x 16, 2 kv heads,
# 4 experts of intermediate 32, top-2. Per token, by hand:
LIGHTNING_PROJ = 3 * 2 * 5 * 48 * (4 * 16)  # q, k, v, gate, out: 48 x 64 each = 92160
SOFTMAX_PROJ = 1 * 2 * (2 * 48 * 64 + 2 * 48 * 32)  # q, o: 48 x 64; k, v: 48 x 32 = 18432
MOE = 4 * 2 * (2 * 3 * 48 * 32 + 48 * 4)  # 2 experts x (w1, w3, w2) + router, 4 layers = 75264
LM_HEAD = 2 * 48 * 97  # 9312
LIGHTNING_DECODE = 3 * 4 * 4 * 16 * 16  # 3 layers x 4 heads x (k^T v + q S: 4 Dk Dv) = 12288
SOFTMAX_PER_CTX = 1 * 4 * 4 * 16  # 1 layer x 4 heads x (QK + PV: 4 D) per attended position = 256


def test_decode_flops_hand_count():
    cfg = config.tiny()
    assert LIGHTNING_PROJ == 92160 and SOFTMAX_PROJ == 18432 and MOE == 75264 and LIGHTNING_DECODE == 12288
    got = flops.decode_flops_per_token(cfg, 10)
    assert got == {
        "lightning_proj": LIGHTNING_PROJ,
        "softmax_proj": SOFTMAX_PROJ,
        "moe": MOE,
        "lm_head": LM_HEAD,
        "lightning_attn": LIGHTNING_DECODE,
        "softmax_attn": SOFTMAX_PER_CTX * 10,
    }
    with pytest.raises(ValueError, match="context_len"):
        flops.decode_flops_per_token(cfg, 0)


def test_generation_flops_closed_form_equals_sum_of_steps():
    cfg = config.tiny()
    const = LIGHTNING_PROJ + SOFTMAX_PROJ + MOE + LM_HEAD + LIGHTNING_DECODE
    for prompt, n in ((0, 1), (0, 7), (5, 1), (13, 20), (100, 333)):
        by_hand = n * const + SOFTMAX_PER_CTX * (n * prompt + n * (n + 1) // 2)
        steps = sum(sum(flops.decode_flops_per_token(cfg, prompt + j).values()) for j in range(1, n + 1))
        assert flops.generation_flops(cfg, prompt, n) == pytest.approx(by_hand, rel=1e-12)
        assert steps == pytest.approx(by_hand, rel=1e-12)
    assert flops.generation_flops(cfg, 8, 0) == 0.0
    with pytest.raises(ValueError):
        flops.generation_flops(cfg, -1, 4)


def test_generation_flops_prefill():
    cfg = config.tiny()
    prompt = sum(flops.forward_flops_per_token(cfg, 64).values()) * 64
    parts = flops.generation_flops_by_component(cfg, 64, 0, include_prefill=True)
    assert parts["prefill"] == pytest.approx(prompt)
    assert flops.generation_flops(cfg, 64, 10, include_prefill=True) == pytest.approx(
        prompt + flops.generation_flops(cfg, 64, 10)
    )
    assert flops.generation_flops_by_component(cfg, 0, 5, include_prefill=True)["prefill"] == 0.0


def test_generation_linear_for_lightning_quadratic_for_softmax():
    lin = config.tiny(attn_type_list=(0, 0, 0, 0))
    soft = config.tiny(attn_type_list=(1, 1, 1, 1))
    hybrid = config.tiny()
    f = lambda cfg, n: flops.generation_flops(cfg, 16, n)
    ns = [1, 2, 3, 50, 51, 52, 1000, 1001, 1002]
    # lightning only: every token costs the same
    assert all(f(lin, n) == pytest.approx(n * f(lin, 1), rel=1e-12) for n in ns)
    # softmax only: constant second difference = 4 * H * D per softmax layer
    for n in (1, 50, 1000):
        second = f(soft, n + 2) - 2 * f(soft, n + 1) + f(soft, n)
        assert second == pytest.approx(4 * SOFTMAX_PER_CTX, rel=1e-9)
    # increasing in the generated length; in the prompt length only through softmax layers
    for cfg in (lin, soft, hybrid):
        assert all(f(cfg, a) < f(cfg, b) for a, b in zip(ns, ns[1:], strict=False))
    assert flops.generation_flops(lin, 10, 8) == flops.generation_flops(lin, 20, 8)
    assert flops.generation_flops(hybrid, 10, 8) < flops.generation_flops(hybrid, 20, 8)
    # the hybrid's attention FLOPs tend to (softmax layers / layers) of the all-softmax model's
    attn = lambda cfg, n: sum(
        v for k, v in flops.generation_flops_by_component(cfg, 0, n).items() if k.endswith("attn")
    )
    ratios = [attn(hybrid, n) / attn(soft, n) for n in (10, 1000, 10**6)]
    assert ratios[0] > ratios[1] > ratios[2] > 0.25 and ratios[2] == pytest.approx(0.25, rel=1e-3)


@pytest.mark.parametrize("name", ["tiny", "minimax_m1"])
def test_matmul_flops_are_twice_the_active_weights(name):
    cfg = getattr(config, name)()
    p = param_counts(cfg)  # from jax.eval_shape: the model's real parameters
    n_light = sum(kind == LIGHTNING for kind in cfg.attn_type_list)
    # active weights that are not matmul inputs: norm scales (incl. the lightning output norm)
    matmul_weights = p["active"] - p["norms"] - n_light * cfg.num_attention_heads * cfg.head_dim
    got = flops.decode_flops_per_token(cfg, 1)
    assert got["lightning_proj"] + got["softmax_proj"] + got["moe"] == 2 * matmul_weights
    assert got["lm_head"] == 2 * p["lm_head"]


def test_m1_hybrid_vs_softmax_only():
    """The numbers notebook 01 reports: M1 against the same config with every layer softmax."""
    m1 = config.minimax_m1()
    soft = m1.replace(attn_type_list=(1,) * m1.num_hidden_layers)
    r64 = flops.generation_flops(m1, 0, 65536) / flops.generation_flops(soft, 0, 65536)
    r100 = flops.generation_flops(m1, 0, 100_000) / flops.generation_flops(soft, 0, 100_000)
    assert 0.6 < r64 < 0.7 and 0.5 < r100 < 0.6 and r100 < r64
    # per token at large context: M1 ~ 2 x 45.94B active + head, independent of context but for 10 layers
    per = flops.decode_flops_per_token(m1, 1)
    assert math.isclose(per["lightning_proj"] + per["softmax_proj"] + per["moe"], 2 * 45.94e9, rel_tol=2e-3)
