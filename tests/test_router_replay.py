"""Router replay (R3): a forward may be given every token's experts per layer instead of routing
itself (`M1Model.run(routes=...)`), and can record the experts it chose (`record_routes=True`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax import M1Model, config, init_params

CFG = config.toy(num_hidden_layers=3, attn_type_list=(0, 0, 1), num_local_experts=4, num_experts_per_tok=2)
PARAMS = init_params(CFG, jax.random.PRNGKey(0))
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, CFG.vocab_size)


def run(tokens, params=PARAMS, **kw):
    return M1Model(CFG).apply({"params": params}, tokens, method=M1Model.run, **kw)


def test_recorded_routes_have_one_entry_per_token_layer_and_choice():
    _, aux, _ = run(TOKENS, record_routes=True)
    ids = np.asarray(aux["expert_ids"])
    assert ids.shape == (2, 12, CFG.num_hidden_layers, CFG.num_experts_per_tok)
    assert ids.min() >= 0 and ids.max() < CFG.num_local_experts
    assert (ids[..., 0] != ids[..., 1]).all()  # top-k picks distinct experts


def test_replaying_a_forwards_own_routes_reproduces_its_logits_bitwise():
    logits, aux, _ = run(TOKENS, record_routes=True)
    replayed, aux2, _ = run(TOKENS, routes=aux["expert_ids"])
    np.testing.assert_array_equal(np.asarray(replayed), np.asarray(logits))
    assert int(aux2["router_flips"]) == 0


def test_replaying_other_routes_changes_the_output_and_counts_flips():
    logits, aux, _ = run(TOKENS, record_routes=True)
    ids = np.asarray(aux["expert_ids"])
    other = (ids + 1) % CFG.num_local_experts  # every token, every layer: a different expert pair
    replayed, aux2, _ = run(TOKENS, routes=other)
    assert not np.allclose(np.asarray(replayed), np.asarray(logits))
    # Each of the 24 tokens in each of the 3 layers flips unless the shifted pair is the same set.
    same = np.all(np.sort(other, -1) == np.sort(ids, -1), -1).sum()
    assert int(aux2["router_flips"]) == 2 * 12 * 3 - same


def test_the_router_keeps_its_gradient_under_replay():
    _, aux, _ = run(TOKENS, record_routes=True)
    routes = aux["expert_ids"]

    def loss(p):
        logits, _, _ = run(TOKENS, params=p, routes=routes)
        return jnp.mean(logits**2)

    grads = jax.grad(loss)(PARAMS)
    routers = [g for path, g in jax.tree_util.tree_leaves_with_path(grads) if "router" in jax.tree_util.keystr(path)]
    assert routers and all(float(jnp.abs(g).max()) > 0 for g in routers)


def test_prefill_and_decode_record_the_routes_of_a_full_forward():
    """Routes recorded by prefill + decode steps equal the teacher-forced forward's (same tokens)."""
    _, aux, _ = run(TOKENS, record_routes=True)
    want = np.asarray(aux["expert_ids"])
    _, got, cache = M1Model(CFG).apply(
        {"params": PARAMS}, TOKENS[:, :8], mode="prefill", max_len=12, method=M1Model.run, record_routes=True
    )
    steps = [np.asarray(got["expert_ids"])]
    for t in range(8, 12):
        _, a, cache = M1Model(CFG).apply(
            {"params": PARAMS}, TOKENS[:, t : t + 1], cache=cache, mode="decode", method=M1Model.run, record_routes=True
        )
        steps.append(np.asarray(a["expert_ids"]))
    np.testing.assert_array_equal(np.concatenate(steps, axis=1), want)


@pytest.mark.parametrize("shape", [(2, 12, 4, 2), (2, 11, 3, 2), (2, 12, 3, 1)])
def test_routes_of_the_wrong_shape_are_an_error(shape):
    with pytest.raises(ValueError, match=r"routes must be \[B, T, L, k\] = \(2, 12, 3, 2\)"):
        run(TOKENS, routes=np.zeros(shape, np.int32))


@pytest.mark.parametrize("slots", [2, 8])
def test_the_engine_records_the_routes_the_trainer_would_take(slots):
    """`sample(record_routes=True)`: every real prompt token's and response token's experts equal
    those of the trainer's teacher-forced forward over [prompt | response], whatever the slots."""
    from rl.sampler import SamplingParams, sample

    prompts = [np.arange(1, 1 + n) % CFG.vocab_size for n in (3, 3, 7, 7, 12, 12, 5, 5)]
    sp = SamplingParams(10, temperature=1.0, record_routes=True, slots=slots)
    out = sample(CFG, PARAMS, prompts, sp, jax.random.PRNGKey(3), pad_multiple=8)
    b, t = out.prompt.shape
    assert out.routes.shape == (b, t + 10, CFG.num_hidden_layers, CFG.num_experts_per_tok)
    assert out.routes.dtype == np.uint8
    seq = np.concatenate([out.prompt, out.tokens], axis=1)
    real = np.arange(t)[None, :] >= (t - out.prompt_lengths)[:, None]
    segs = np.concatenate([real, out.mask > 0], axis=1).astype(np.int32)
    _, aux, _ = run(jnp.asarray(seq), segment_ids=jnp.asarray(segs), record_routes=True)
    want = np.asarray(aux["expert_ids"])
    on = segs > 0
    np.testing.assert_array_equal(out.routes[on].astype(np.int32), want[on])


def test_sample_fixed_refuses_to_record_routes():
    from rl.sampler import SamplingParams, sample_fixed

    with pytest.raises(ValueError, match="record_routes"):
        sample_fixed(CFG, PARAMS, [np.arange(1, 4)], SamplingParams(4, record_routes=True), jax.random.PRNGKey(0))


def _perturbed_router_sampler(monkeypatch, scale: float):
    """rl.loop samples with router weights off by `scale` x their std: a sampler that routes
    differently from the trainer (as bf16 inference engines do, exaggerated)."""
    from rl import loop

    sample = loop.sample

    def perturb(path, x):
        if "router" not in jax.tree_util.keystr(path):
            return x
        noise = jax.random.normal(jax.random.PRNGKey(7), x.shape, x.dtype)
        return x + scale * jnp.std(x) * noise

    monkeypatch.setattr(
        loop, "sample", lambda cfg, p, *a, **k: sample(cfg, jax.tree_util.tree_map_with_path(perturb, p), *a, **k)
    )


@pytest.mark.slow
def test_router_replay_in_an_rl_run_shrinks_the_gap_to_a_misrouting_sampler(tmp_path, monkeypatch):
    from test_rl_train import rows, small_toy

    from rl.loop import train

    _perturbed_router_sampler(monkeypatch, 1.0)
    base = {"steps": 2}
    train(small_toy(base), str(tmp_path / "free"), progress=False)
    train(small_toy(base | {"rl.mismatch.router_replay": True}), str(tmp_path / "replay"), progress=False)
    free, replay = rows(tmp_path / "free", "loss"), rows(tmp_path / "replay", "loss")
    assert "router_flip_fraction" not in free[0]
    assert 0.02 < replay[0]["router_flip_fraction"] < 0.9  # the sampler routed differently
    # Step 1 samples the same tokens in both runs; replaying the sampler's experts removes most of the gap.
    assert replay[0]["reward"] == free[0]["reward"]
    assert replay[0]["logp_gap"] < 0.5 * free[0]["logp_gap"]
