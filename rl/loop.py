"""The RL run: `train(config, workdir)`, callable from the CLI or a notebook.

Each step: prompts (a pure function of seed and step) -> G responses each (`rl.sampler`) ->
rewards (`rl.rewards`) -> advantages (`rl.advantages`) -> old / reference log-probs -> the
rollout batch shuffled into `updates_per_rollout` minibatch updates. Checkpoints hold the policy
and optimizer; the reference policy is the initial one, rebuilt on resume. Re-running the same
command on the same workdir resumes; SIGTERM / SIGINT save and return.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from m1jax import sharding as shd
from m1jax.config import ModelConfig
from m1jax.data.tokenizer import load_tokenizer
from m1jax.train import optim
from m1jax.train.checkpoint import Checkpointer
from m1jax.train.config import base_config as pretrain_base
from m1jax.train.config import model_config
from m1jax.train.loop import _stop_on_signals, finished, make_optimizer, stop_requested
from m1jax.train.metrics import MetricWriter, clear_summary, write_summary
from m1jax.train.step import Trainer
from rl import advantages as adv_lib
from rl import prompts as prompt_lib
from rl import rewards as reward_lib
from rl.config import loss_kwargs, reward_weights, validate
from rl.sampler import FINISH_CONFIDENT, FINISH_LENGTH, SamplingParams, sample
from rl.step import RLTrainer

log = logging.getLogger("m1jax")


def load_pretrained(workdir: str, mesh):
    """(pretraining config, params) from a pretraining workdir's config.json and newest checkpoint."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"config.init_from={workdir!r}: no config.json there (not a pretraining workdir?)")
    with open(path) as fh:
        pc = pretrain_base()
        pc.update_from_flattened_dict(_flatten(json.load(fh)))
    cfg = model_config(pc)
    lr_fn, tx = make_optimizer(pc)  # the same optimizer-state layout as the checkpoint
    trainer = Trainer(cfg, tx, lr_fn, mesh)
    restored = Checkpointer(os.path.join(workdir, "checkpoints")).restore_latest(trainer.abstract_state)
    if restored is None:
        raise ValueError(f"config.init_from={workdir!r}: no checkpoint in {workdir}/checkpoints")
    log.info(f"initialised from {workdir} step {restored[0]}")
    return pc, cfg, restored[1]["params"]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def _tokenizer(c):
    if c.data.source.startswith("toy_"):
        return prompt_lib.DigitTokenizer()
    return load_tokenizer(c.data.tokenizer)


def _texts(tokenizer, rollout, stop_id) -> list[str]:
    toks, lengths = np.asarray(rollout.tokens), np.asarray(rollout.lengths)
    out = []
    for t, n in zip(toks, lengths, strict=True):
        ids = t[:n].tolist()
        if ids and ids[-1] == stop_id:
            ids = ids[:-1]
        out.append(tokenizer.decode(ids))
    return out


def exact(c, texts, refs) -> np.ndarray:
    """1.0 where the answer is exactly right (the task family's check, or all positions for the toy)."""
    return reward_lib.get("positions" if c.data.source != "tasks" else "task")(texts, refs) >= 1.0


def _se(x: np.ndarray) -> float:
    """Standard error of the mean of per-prompt values."""
    return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def paired_change(before: dict, after: dict) -> dict:
    """Per-prompt arrays of two `evaluate(..., per_prompt=)` calls on the same held-out prompts ->
    {metric: {"delta", "se", "z"}}: the mean change and its paired standard error (the prompts are
    the same, so prompt difficulty cancels out of the error)."""
    out = {}
    for k in before.keys() & after.keys():
        d = np.asarray(after[k], np.float64) - np.asarray(before[k], np.float64)
        se = _se(d)
        out[k] = {"delta": float(d.mean()), "se": se, "z": float(d.mean() / se) if se > 0 else 0.0}
    return out


def evaluate(cfg, params, tokenizer, c, reward_fn, per_prompt: dict | None = None) -> dict:
    """Held-out prompts: greedy mean reward and exact-answer accuracy, and the accuracy of
    `eval_samples` sampled responses per prompt at the training temperature (avg@k), each with
    its standard error over prompts (`*_se`). Prompts and sampling keys are fixed, so two calls
    see the same prompts; `per_prompt`, if given, receives the per-prompt values."""
    split = "test" if c.data.source == "tasks" else "eval"
    pairs = prompt_lib.batch(
        c.data.source, c.data.seed, -1, c.eval_prompts, tasks=c.data.tasks, toy_length=c.data.toy_length, split=split
    )
    sp = SamplingParams(c.max_new_tokens, greedy=True, stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
    r = sample(cfg, params, [tokenizer.encode(p, bos=True) for p, _ in pairs], sp, jax.random.PRNGKey(0))
    texts = _texts(tokenizer, r, tokenizer.eos_id)
    refs = [ref for _, ref in pairs]
    vals = {"eval_reward": np.asarray(reward_fn(texts, refs)), "eval_accuracy": exact(c, texts, refs).astype(float)}
    if c.eval_samples > 0:  # the sampling policy RL optimises: accuracy averaged over k samples per prompt
        sp = dataclasses.replace(sp, greedy=False, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k)
        prompts = [tokenizer.encode(p, bos=True) for p, _ in pairs for _ in range(c.eval_samples)]
        r = sample(cfg, params, prompts, sp, jax.random.PRNGKey(1))
        k_refs = [ref for ref in refs for _ in range(c.eval_samples)]
        hits = exact(c, _texts(tokenizer, r, tokenizer.eos_id), k_refs).astype(float)
        vals["eval_sampled_accuracy"] = hits.reshape(len(pairs), c.eval_samples).mean(axis=1)
    if per_prompt is not None:
        per_prompt.update(vals)
    out = {k: float(np.mean(v)) for k, v in vals.items()}
    out |= {f"{k}_se": _se(v) for k, v in vals.items() if k != "eval_reward"}
    return out


class Setup(NamedTuple):
    """What every RL run of a config starts from (`train`, and `rl.sweep.compare` for many runs)."""

    cfg: ModelConfig  # the policy's model, with the fp32 LM head (M1's RL recipe)
    tokenizer: object
    init_params: object | None  # pretrained parameters (config.init_from), or None: random init
    reward_fn: object
    sampling: SamplingParams


def setup(c: ml_collections.ConfigDict, mesh) -> Setup:
    tokenizer = _tokenizer(c)
    if c.init_from:
        pc, cfg, init_params = load_pretrained(c.init_from, mesh)
        if not c.data.source.startswith("toy_"):
            tokenizer = load_tokenizer(pc.data.tokenizer)
    else:
        pc = pretrain_base()
        pc.model = c.model
        cfg, init_params = model_config(pc), None
    cfg = dataclasses.replace(cfg, lm_head_fp32=True)  # M1: fp32 LM head for RL log-probs
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"model vocab_size={cfg.vocab_size} is smaller than the tokenizer's ({tokenizer.vocab_size})")
    sp = SamplingParams(
        c.max_new_tokens,
        temperature=c.temperature,
        top_p=c.top_p,
        top_k=c.top_k,
        stop_tokens=(tokenizer.eos_id,),
        pad_id=tokenizer.pad_id,
        confident_run=c.confident_run,
        confident_prob=c.confident_prob,
    )
    return Setup(cfg, tokenizer, init_params, reward_lib.combine(reward_weights(c.reward)), sp)


def make_trainer(c: ml_collections.ConfigDict, cfg: ModelConfig, mesh):
    """(RLTrainer for `c.loss`, its AdamW) with a constant learning rate after warmup."""
    lr_fn = optim.schedule("constant", c.learning_rate, c.steps * c.updates_per_rollout, c.warmup_steps)
    tx = optim.adamw(lr_fn, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, grad_clip=c.grad_clip)
    trainer = RLTrainer(
        cfg,
        tx,
        mesh,
        loss=c.loss,
        loss_kw=loss_kwargs(c),
        temperature=c.temperature,
        kl_coef=c.kl_coef,
        aux=c.aux_loss,
        micro_batches=c.micro_batches,
        lr_fn=lr_fn,
    )
    return trainer, tx


def initial_state(trainer: RLTrainer, tx, seed: int, init_params=None) -> dict:
    """The state a run starts from: random parameters from `seed`, or `init_params` with a fresh AdamW."""
    state = trainer.init(jax.random.PRNGKey(seed))
    if init_params is not None:
        params = jax.device_put(init_params, trainer.state_sharding["params"])
        opt_state = jax.jit(tx.init, out_shardings=trainer.state_sharding["opt_state"])(params)
        state = {**state, "params": params, "opt_state": opt_state}
    return state


def train(c: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, stop_at: int | None = None) -> dict:
    """Run (or resume) RL per config `c` in `workdir`. Returns a summary dict.

    A run that already reached `c.steps` is not trained again (nothing is built, restored or
    written): the summary stored when it finished comes back with `complete=True` (no "state");
    a larger `c.steps` extends it.
    """
    validate(c)
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.keep_checkpoints)
    if (done := finished(workdir, ckpt.steps(), c.steps)) is not None:  # nothing built, restored or written
        ckpt.close()
        return dict(done, workdir=workdir, start_step=done["end_step"], stopped_by=None, complete=True)
    primary = jax.process_index() == 0
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as fh:
            fh.write(c.to_json_best_effort(indent=2))
    mesh = shd.mesh_from_config(dict(c.mesh))
    run = setup(c, mesh)
    cfg, tokenizer, reward_fn, sp = run.cfg, run.tokenizer, run.reward_fn, run.sampling
    dp = int(np.prod([mesh.shape[a] for a in ("data", "fsdp", "expert")]))
    rows = c.prompts_per_step * c.samples_per_prompt // (c.updates_per_rollout * c.micro_batches)
    if rows % dp:
        raise ValueError(
            f"config.prompts_per_step x samples_per_prompt / (updates_per_rollout x micro_batches) = {rows} rows "
            f"per micro-batch is not divisible by the {dp} batch-parallel devices of mesh {dict(mesh.shape)}"
        )
    trainer, tx = make_trainer(c, cfg, mesh)
    fresh = initial_state(trainer, tx, c.seed, run.init_params)
    ref_params = jax.tree.map(lambda x: x.copy(), fresh["params"])  # the frozen reference policy
    restored = ckpt.restore_latest(trainer.abstract_state)
    state, start = (fresh, 0) if restored is None else (restored[1], restored[0])
    if restored is None and primary:
        clear_summary(workdir)  # of an earlier run in this workdir
    writer = MetricWriter(workdir, resume_step=start if restored else None)
    summary = {"workdir": workdir, "start_step": start, "stopped_by": None}
    first_pp, last_pp = {}, {}
    if start == 0:
        first = evaluate(cfg, state["params"], tokenizer, c, reward_fn, per_prompt=first_pp)
        writer.write(0, first)
        summary["initial"] = first

    bar = None
    if progress and start < c.steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=c.steps, initial=start, desc=f"rl:{c.loss}", unit="step", dynamic_ncols=True)
    step, last_eval = start, None
    with _stop_on_signals() as flag:
        while step < min(c.steps, stop_at or c.steps) and stop_requested(flag) is None:
            row = rl_step(c, cfg, trainer, tokenizer, reward_fn, sp, state, ref_params, step)
            state = row.pop("state")
            step += 1
            if step % c.log_every == 0 or step == c.steps:
                writer.write(step, row)
            if step % c.eval_every == 0 or step == c.steps:
                last_eval = (step, evaluate(cfg, state["params"], tokenizer, c, reward_fn, per_prompt=last_pp))
                writer.write(step, last_eval[1])
            if step % c.checkpoint_every == 0 and step < c.steps:
                ckpt.save(step, state, {"step": step})
            if bar is not None:
                bar.set_postfix(reward=f"{row['reward']:.3f}", len=f"{row['response_length']:.0f}", refresh=False)
                bar.update(1)
    if bar is not None:
        bar.close()
    ckpt.save(step, state, {"step": step}, force=True, wait=True)
    ckpt.close()
    summary.update(end_step=step, checkpoints=ckpt.steps(), state=state)
    if step < c.steps:
        writer.close()
        summary["stopped_by"] = flag["signal"] or "stop_at"
        log.warning(f"{summary['stopped_by']}: saved a checkpoint at step {step}; rerun the same command to resume")
        return summary
    done = last_eval is not None and last_eval[0] == step
    if not done:  # (each evaluation overwrites the same per-prompt keys)
        last_eval = (step, evaluate(cfg, state["params"], tokenizer, c, reward_fn, per_prompt=last_pp))
    writer.close()
    summary["final"] = last_eval[1]
    if not first_pp:  # resumed: the initial policy is the reference, so evaluate that
        summary["initial"] = evaluate(cfg, ref_params, tokenizer, c, reward_fn, per_prompt=first_pp)
    summary["change"] = paired_change(first_pp, last_pp)
    keep = ("end_step", "checkpoints", "initial", "final", "change")
    if primary:  # last: marks the run complete
        write_summary(workdir, {k: summary[k] for k in keep} | {"steps": c.steps})
    return summary


def rl_step(c, cfg, trainer: RLTrainer, tokenizer, reward_fn, sp, state, ref_params, step: int) -> dict:
    """Roll out, score, and update; returns the metrics row with the new state under "state"."""
    t0 = time.perf_counter()
    g = c.samples_per_prompt
    pairs = prompt_lib.batch(
        c.data.source, c.data.seed, step, c.prompts_per_step, tasks=c.data.tasks, toy_length=c.data.toy_length
    )
    prompts = [tokenizer.encode(p, bos=True) for p, _ in pairs for _ in range(g)]
    refs = [ref for _, ref in pairs for _ in range(g)]
    key = jax.random.fold_in(jax.random.PRNGKey(c.seed), step)
    rollout = sample(cfg, state["params"], prompts, sp, key)
    t_gen = time.perf_counter()
    texts = _texts(tokenizer, rollout, tokenizer.eos_id)
    rewards = np.asarray(reward_fn(texts, refs), np.float64).reshape(-1, g)
    adv = adv_lib.compute(rewards, c.advantage, c.zero_variance)

    arrays = {k: np.asarray(getattr(rollout, k)) for k in ("prompt", "prompt_lengths", "tokens", "mask")}
    dev = trainer.shard_rows(arrays)
    trainer_logp = np.asarray(trainer.logprobs(state["params"], dev))
    sampler_logp = np.asarray(rollout.logprobs)
    on = arrays["mask"] > 0
    arrays["old_logp"] = trainer_logp if c.old_logp == "trainer" else sampler_logp
    arrays["ref_logp"] = np.asarray(trainer.logprobs(ref_params, dev))
    arrays["advantages"] = adv.advantages.reshape(-1)
    weight = adv.weight.reshape(-1)
    if c.mask_truncated:  # DAPO overlong filtering: truncated responses carry no gradient
        weight = weight * (np.asarray(rollout.finish) != FINISH_LENGTH)
    arrays["mask"] = arrays["mask"] * weight[:, None]

    lr = float(trainer.lr_fn(int(jax.device_get(state["step"]))))  # of this step's first update
    rows = arrays["mask"].shape[0]
    order = np.random.default_rng([c.seed, step]).permutation(rows)
    per = rows // c.updates_per_rollout
    update_metrics = []
    for u in range(c.updates_per_rollout):
        idx = order[u * per : (u + 1) * per]
        state, m = trainer.update(state, trainer.shard_rows({k: v[idx] for k, v in arrays.items()}))
        update_metrics.append(m)
    fetched = jax.device_get(update_metrics)
    ms = [m for m in fetched if m["tokens"] > 0] or fetched[:1]
    w = np.asarray([m["tokens"] for m in ms], np.float64)
    mean = lambda k: float(np.sum([m[k] * wi for m, wi in zip(ms, w, strict=True)]) / max(w.sum(), 1.0))
    finish = np.asarray(rollout.finish)
    lengths = np.asarray(rollout.lengths)
    row = {
        "reward": float(np.nanmean(rewards)) if np.isfinite(rewards).any() else float("nan"),
        "reward_std": float(np.nanstd(rewards)) if np.isfinite(rewards).any() else float("nan"),
        "pass_rate": float(np.mean(exact(c, texts, refs))),
        "response_length": float(lengths.mean()),
        "response_length_max": float(lengths.max()),
        "truncated_fraction": float(np.mean(finish == FINISH_LENGTH)),
        "confident_stop_fraction": float(np.mean(finish == FINISH_CONFIDENT)),
        "zero_variance_fraction": float(adv.zero_variance.mean()),
        "invalid_rewards": int(adv.invalid.sum()),
        "logp_gap": float(np.abs(trainer_logp - sampler_logp)[on].mean()) if on.any() else 0.0,
        "logp_gap_max": float(np.abs(trainer_logp - sampler_logp)[on].max()) if on.any() else 0.0,
        "lr": lr,
        "skipped_updates": int(jax.device_get(state["skipped"])),
        "gen_time_s": t_gen - t0,
        "step_time_s": time.perf_counter() - t0,
        "gen_tokens_per_s": float(lengths.sum()) / max(t_gen - t0, 1e-9),
    }
    for k in ("loss", "pg_loss", "kl", "clip_fraction", "ratio_mean", "entropy", "grad_norm", "aux_loss"):
        if k in ms[0]:
            row[k] = mean(k)  # token-weighted over this step's updates
    row["empty_updates"] = c.updates_per_rollout - int(np.sum(w > 0))
    row["ratio_max"] = float(max(m["ratio_max"] for m in ms))
    row["ratio_min"] = float(min(m["ratio_min"] for m in ms))
    row["state"] = state
    return row
