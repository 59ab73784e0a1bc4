"""Pretraining: learning, exact resume, preemption, corrupt checkpoints, non-finite steps, packing."""

from __future__ import annotations

import json
import logging
import os
import runpy
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax import M1Model
from m1jax import sharding as shd
from m1jax.objective import targets_and_mask, token_nll
from m1jax.train import config as tc
from m1jax.train import optim
from m1jax.train.checkpoint import Checkpointer
from m1jax.train.loop import NonFiniteError, check_finite, train
from m1jax.train.metrics import read_metrics
from m1jax.train.step import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_config(overrides: dict | None = None):
    """A seconds-per-run config: the tiny preset (3 lightning + 1 softmax) on the task corpus;
    `overrides` by dotted name ({"checkpoint.every": 2})."""
    c = tc.base_config()
    c.model.update(preset="tiny", vocab_size=264)
    c.update(steps=12, batch_size=4, seq_len=64)
    c.optim.warmup_steps = 2
    c.log.every, c.checkpoint.every = 1, 4
    c.eval.update(every=6, num_samples=2, max_new_tokens=8)
    c.data.update(num_train_docs=2000, num_eval_docs=50)
    c.update_from_flattened_dict(overrides or {})
    return c


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.mark.slow
def test_default_config_learns(tmp_path):
    """The embedded default (configs/pretrain_tiny.py, 7:1 hybrid MoE) loses well over 1 nat in 100 steps."""
    c = runpy.run_path(os.path.join(ROOT, "configs", "pretrain_tiny.py"))["get_config"]()
    cfg = tc.model_config(c.model)
    assert list(cfg.attn_type_list) == [0] * 7 + [1] and cfg.num_local_experts > 1
    c.update(steps=100, batch_size=4)
    c.log.every, c.checkpoint.every = 10, 50
    c.eval.update(every=50, num_samples=2)
    c.data.update(num_train_docs=5000, num_eval_docs=100)
    out = train(c, str(tmp_path), progress=False)
    curve = losses(tmp_path)
    assert curve[10] - curve[100] > 1.5, curve
    rows = read_metrics(tmp_path)
    assert any("eval_loss" in r for r in rows) and all("step" in r for r in rows)
    assert {"grad_norm", "lr", "tokens_per_s", "perplexity", "expert_load"} <= set(rows[0])
    assert os.listdir(tmp_path / "tb") and (tmp_path / "samples.jsonl").exists()
    assert out["sample_accuracy"] is not None and out["checkpoints"][-1] == 100


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    full, parts = tmp_path / "full", tmp_path / "parts"
    train(quick_config(), str(full), progress=False)
    first = train(quick_config(), str(parts), progress=False, stop_at=6)
    assert first["stopped_by"] == "stop_at" and first["end_step"] == 6
    second = train(quick_config(), str(parts), progress=False)
    assert second["start_step"] == 6
    a, b = losses(full), losses(parts)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
    train(quick_config({"steps": 8}), str(tmp_path), progress=False)
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(int(p) for p in os.listdir(ckpt_dir) if p.isdigit()) == [4, 8]
    for root, _, files in os.walk(ckpt_dir / "8"):  # truncate every file of the latest checkpoint
        for f in files:
            open(os.path.join(root, f), "w").close()
    with caplog.at_level(logging.WARNING, logger="m1jax"):
        out = train(quick_config({"steps": 10}), str(tmp_path), progress=False)
    assert out["start_step"] == 4
    assert any("step 8" in r.message and "falling back" in r.message for r in caplog.records)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_current_step(tmp_path):
    args = [
        sys.executable, "-m", "experiments.pretrain", f"--workdir={tmp_path}", "--noprogress",
        "--config.model.preset=tiny", "--config.model.vocab_size=264",
        "--config.steps=100000", "--config.batch_size=2", "--config.seq_len=32", "--config.log.every=1",
        "--config.checkpoint.every=100000", "--config.eval.every=100000", "--config.optim.warmup_steps=1",
        "--config.data.num_train_docs=500", "--config.data.num_eval_docs=20",
    ]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    last = max(r["step"] for r in read_metrics(tmp_path) if "loss" in r)
    steps = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
    assert steps[-1] >= last >= 3 and steps[-1] <= last + 1, (steps, last)
    assert "stopped by SIGTERM" in out


def _trainer(c, micro_batches=1):
    cfg = tc.validate(c)
    lr = optim.schedule(c.optim.schedule, c.optim.learning_rate, c.steps, c.optim.warmup_steps)
    tx = optim.adamw(lr, grad_clip=c.optim.grad_clip)
    mesh = shd.mesh_from_config({"data": 1}, jax.devices()[:1])
    return cfg, Trainer(cfg, tx, lr, mesh, micro_batches)


def _batch(seed, b=4, t=64, vocab=261):
    rng = np.random.default_rng(seed)
    segs = np.sort(rng.integers(1, 4, (b, t)), axis=1).astype(np.int32)
    return {"tokens": rng.integers(0, vocab, (b, t)).astype(np.int32), "segment_ids": segs}


@pytest.mark.slow
def test_nonfinite_step_is_skipped():
    cfg, tr = _trainer(quick_config())
    state = tr.init(jax.random.PRNGKey(0))
    bad = _batch(0)
    bad["tokens"][0, 5] = cfg.vocab_size  # out of range under jit: the embedding lookup gives NaN
    before = jax.device_get(state["params"])
    state, m = tr.step(state, tr.put_batch(bad))
    assert not bool(m["finite"]) and int(m["skipped"]) == 1 and int(m["bad_streak"]) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), before)
    state, m = tr.step(state, tr.put_batch(_batch(1)))
    assert bool(m["finite"]) and int(m["bad_streak"]) == 0 and int(m["skipped"]) == 1 and int(state["step"]) == 2
    check_finite(2, {"bad_streak": 1, "loss": float("nan")}, max_bad=2)  # one bad step: a warning
    with pytest.raises(NonFiniteError, match="consecutive"):
        check_finite(3, {"bad_streak": 2, "loss": float("nan")}, max_bad=2)


@pytest.mark.slow
def test_gradient_accumulation_matches_one_batch():
    """Two micro-batches give the same loss and gradient as one (SGD with lr 1: update = -grad)."""
    import optax

    cfg = tc.validate(quick_config())
    mesh = shd.mesh_from_config({"data": 1})
    batch = _batch(3, b=4)
    out = []
    for m in (1, 2):
        tr = Trainer(cfg, optax.sgd(1.0), lambda _: 1.0, mesh, m)
        state = tr.init(jax.random.PRNGKey(0))
        before = jax.device_get(state["params"])
        state, metrics = tr.step(state, tr.put_batch(batch))
        grads = jax.tree.map(lambda a, b: a - b, before, jax.device_get(state["params"]))
        out.append((jax.device_get(metrics), grads))
    np.testing.assert_allclose(out[0][0]["loss"], out[1][0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(out[0][0]["grad_norm"], out[1][0]["grad_norm"], rtol=1e-5)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(out[0][1]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale), out[0][1], out[1][1])


@pytest.mark.slow
def test_packed_documents_do_not_influence_each_other():
    cfg = tc.validate(quick_config())
    params = M1Model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    segs = np.repeat(np.array([1, 2, 3, 0], np.int32), [20, 24, 16, 4])[None]
    tokens = rng.integers(0, 261, (1, 64)).astype(np.int32)
    changed = tokens.copy()
    changed[0, 20:44] = rng.integers(0, 261, 24)  # a different middle document, same length

    def nll(t):
        logits, _ = M1Model(cfg).apply({"params": params}, t, segs)
        targets, mask = targets_and_mask(t, segs)
        return np.asarray(token_nll(logits, targets) * mask)[0]

    a, b = nll(tokens), nll(changed)
    others = np.r_[0:19, 44:59]  # positions whose targets lie in documents 1 and 3
    np.testing.assert_allclose(a[others], b[others], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[20:43], b[20:43])
    _, mask = targets_and_mask(tokens, segs)
    assert np.asarray(mask)[0, [19, 43, 59, 60, 63]].sum() == 0  # no target across a boundary or in padding


def test_checkpointer_without_checkpoints_returns_none(tmp_path):
    _, tr = _trainer(quick_config())
    assert Checkpointer(str(tmp_path / "ck")).restore_latest(tr.abstract_state) is None


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("batch_size", 6, "micro_batches"),
        ("seq_len", 60, "block size"),
        ("schedule", "linear", "schedule"),
        ("warmup_steps", 1000, "warmup_steps"),
        ("learning_rate", 0.0, "learning_rate"),
    ],
)
def test_bad_config_is_a_clear_error(field, value, match):
    c = quick_config({"micro_batches": 4})
    c[field] = value
    with pytest.raises(ValueError, match=match):
        tc.validate(c)


def test_unknown_fields_and_small_vocab_are_errors():
    c = quick_config()
    c.model.hidden_sizes = 12
    with pytest.raises(ValueError, match="hidden_sizes"):
        tc.validate(c)
    c = quick_config()
    c.model.vocab_size = 100
    with pytest.raises(ValueError, match="vocab_size"):
        tc.validate(c, tokenizer_vocab=261)
    c = quick_config()
    with c.unlocked():
        c.stepz = 3
    with pytest.raises(ValueError, match="stepz"):
        tc.validate(c)


def test_schedules():
    cos = optim.schedule("cosine", 1.0, 100, 10, min_ratio=0.1)
    assert float(cos(0)) == pytest.approx(0.1) and float(cos(9)) == pytest.approx(1.0)
    assert float(cos(100)) == pytest.approx(0.1, abs=1e-6)
    wsd = optim.schedule("wsd", 1.0, 100, 10, min_ratio=0.0, decay_fraction=0.2)
    assert float(wsd(50)) == 1.0 and float(wsd(82)) == 1.0 and float(wsd(100)) == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < float(wsd(91)) < 1.0


@pytest.mark.slow
def test_metrics_file_is_json_lines(tmp_path):
    train(quick_config({"steps": 3, "eval.every": 3, "checkpoint.every": 3}), str(tmp_path), progress=False)
    with open(tmp_path / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


@pytest.mark.slow
def test_chunked_loss_equals_full_loss():
    """loss_chunk computes the head + cross entropy in token chunks: same loss and gradients."""
    from m1jax.train.step import batch_loss

    cfg = tc.validate(quick_config())
    params = M1Model(cfg).init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(
        lambda x: x.value if hasattr(x, "value") else x, params, is_leaf=lambda x: hasattr(x, "value")
    )
    b = _batch(5, b=2, t=64, vocab=cfg.vocab_size)
    n = float(np.sum(targets_and_mask(jnp.asarray(b["tokens"]), jnp.asarray(b["segment_ids"]))[1]))
    f = lambda p, chunk: batch_loss(cfg, p, b, n, 1.0, chunk)[0]
    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(f), static_argnums=1)(params, k) for k in (0, 16))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g0))
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=0, atol=1e-5 * scale), g1, g0)
    with pytest.raises(ValueError, match="loss_chunk"):
        tc.validate(quick_config({"loss_chunk": 48}))  # does not divide seq_len 64
