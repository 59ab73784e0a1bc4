"""The RL run: `train(config, workdir)`, callable from the CLI or a notebook.

Each step: prompts (a pure function of seed and step) -> G responses each (`rl.sampler`) ->
rewards (`rl.rewards`) -> advantages (`rl.advantages`) -> old / reference log-probs -> the
rollout batch shuffled into `updates_per_rollout` minibatch updates. Checkpoints hold the policy
and optimizer; the reference policy is the initial one, rebuilt on resume. Re-running the same
command on the same workdir resumes; SIGTERM / SIGINT save and return.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from m1jax import sharding as shd
from m1jax.config import ModelConfig
from m1jax.data.tokenizer import load_tokenizer
from m1jax.mesh import batch_parallel
from m1jax.model import abstract_params
from m1jax.train import optim
from m1jax.train.checkpoint import Checkpointer
from m1jax.train.config import load_stored, model_config
from m1jax.train.run import Run
from rl import advantages as adv_lib
from rl import prompts as prompt_lib
from rl import rewards as reward_lib
from rl.config import loss_kwargs, reward_weights, validate
from rl.evaluate import decode_responses, evaluate, exact, paired_change
from rl.sampler import FINISH_CONFIDENT, FINISH_LENGTH, SamplingParams, sample
from rl.step import RLTrainer

log = logging.getLogger("m1jax")


def load_pretrained(workdir: str, mesh):
    """(pretraining config, model config, params) from a pretraining workdir: its config.json and
    the parameters of its newest readable checkpoint (nothing else is read), placed on `mesh`."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"config.rl.init_from={workdir!r}: no config.json there (not a pretraining workdir?)")
    try:
        pc = load_stored(path)  # a config.json of the flat layout (older workdirs) is upgraded
    except ValueError as e:
        raise ValueError(f"config.rl.init_from: {e}") from None
    cfg = model_config(pc.model)
    shapes = nn.unbox(abstract_params(cfg))
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shd.param_shardings(cfg, mesh)
    )
    found = Checkpointer(os.path.join(workdir, "checkpoints")).restore_params(target)
    if found is None:
        raise ValueError(f"config.rl.init_from={workdir!r}: no checkpoint in {workdir}/checkpoints")
    log.info(f"initialised from {workdir} step {found[0]}")
    return pc, cfg, found[1]


def _tokenizer(c):
    if c.data.source.startswith("toy_"):
        return prompt_lib.DigitTokenizer()
    return load_tokenizer(c.data.tokenizer)


class Setup(NamedTuple):
    """What every RL run of a config starts from (`train`, and `rl.sweep.compare` for many runs)."""

    cfg: ModelConfig  # the policy's model, with the fp32 LM head (M1's RL recipe)
    tokenizer: object
    init_params: object | None  # pretrained parameters (config.rl.init_from), or None: random init
    reward_fn: object
    sampling: SamplingParams


def setup(c: ml_collections.ConfigDict, mesh) -> Setup:
    tokenizer = _tokenizer(c)
    if c.rl.init_from:
        pc, cfg, init_params = load_pretrained(c.rl.init_from, mesh)
        if not c.data.source.startswith("toy_"):
            tokenizer = load_tokenizer(pc.data.tokenizer)
    else:
        cfg, init_params = model_config(c.model), None
    cfg = dataclasses.replace(cfg, lm_head_fp32=True)  # M1: fp32 LM head for RL log-probs
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"model vocab_size={cfg.vocab_size} is smaller than the tokenizer's ({tokenizer.vocab_size})")
    s = c.rl.sampling
    sp = SamplingParams(
        s.max_new_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        stop_tokens=(tokenizer.eos_id,),
        pad_id=tokenizer.pad_id,
        confident_run=s.confident_run,
        confident_prob=s.confident_prob,
    )
    return Setup(cfg, tokenizer, init_params, reward_lib.combine(reward_weights(c.rl.reward)), sp)


def make_trainer(c: ml_collections.ConfigDict, cfg: ModelConfig, mesh):
    """(RLTrainer for `c.rl.loss`, its AdamW); the schedule counts optimizer updates."""
    lr_fn, tx = optim.from_config(c.optim, c.steps * c.rl.updates_per_rollout)
    trainer = RLTrainer(
        cfg,
        tx,
        mesh,
        loss=c.rl.loss,
        loss_kw=loss_kwargs(c),
        temperature=c.rl.sampling.temperature,
        kl_coef=c.rl.kl_coef,
        aux=c.rl.aux_loss,
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
    run = Run(c, workdir, desc=f"rl:{c.rl.loss}", progress=progress)
    if (done := run.finished()) is not None:  # nothing built, restored or written
        return dict(done, workdir=workdir, start_step=done["end_step"], stopped_by=None, complete=True)
    mesh = shd.mesh_from_config(dict(c.mesh))
    parts = setup(c, mesh)
    cfg, tokenizer, reward_fn, sp = parts.cfg, parts.tokenizer, parts.reward_fn, parts.sampling
    dp = batch_parallel(mesh.shape)
    r = c.rl
    rows = r.prompts_per_step * r.samples_per_prompt // (r.updates_per_rollout * c.micro_batches)
    if rows % dp:
        raise ValueError(
            f"config.rl.prompts_per_step x samples_per_prompt / (updates_per_rollout x micro_batches) = {rows} rows "
            f"per micro-batch is not divisible by the {dp} batch-parallel devices of mesh {dict(mesh.shape)}"
        )
    trainer, tx = make_trainer(c, cfg, mesh)
    fresh = initial_state(trainer, tx, c.seed, parts.init_params)
    ref_params = jax.tree.map(lambda x: x.copy(), fresh["params"])  # the frozen reference policy
    state, start, _ = run.begin(trainer.abstract_state, lambda: fresh)
    summary = {"workdir": workdir, "start_step": start, "stopped_by": None}
    first_pp, last_pp, last_eval = {}, {}, {}
    if start == 0:
        first = evaluate(cfg, state["params"], tokenizer, c, reward_fn, per_prompt=first_pp)
        run.writer.write(0, first)
        summary["initial"] = first

    def body(state, step):
        row = rl_step(c, cfg, trainer, tokenizer, reward_fn, sp, state, ref_params, step)
        state = row.pop("state")
        step += 1
        if step % c.log.every == 0 or step == c.steps:
            run.writer.write(step, row)
        if step % c.eval.every == 0 or step == c.steps:
            last_eval[step] = evaluate(cfg, state["params"], tokenizer, c, reward_fn, per_prompt=last_pp)
            run.writer.write(step, last_eval[step])
        if run.bar is not None:
            run.bar.set_postfix(reward=f"{row['reward']:.3f}", len=f"{row['response_length']:.0f}", refresh=False)
        return state

    state, step = run.loop(state, start, body, lambda step: {"step": step}, stop_at=stop_at)
    summary.update(end_step=step, checkpoints=run.ckpt.steps(), state=state, stopped_by=run.stopped_by)
    if run.stopped_by:
        run.close()
        return summary
    if step not in last_eval:  # (each evaluation overwrites the same per-prompt keys)
        last_eval[step] = evaluate(cfg, state["params"], tokenizer, c, reward_fn, per_prompt=last_pp)
    summary["final"] = last_eval[step]
    if not first_pp:  # resumed: the initial policy is the reference, so evaluate that
        summary["initial"] = evaluate(cfg, ref_params, tokenizer, c, reward_fn, per_prompt=first_pp)
    summary["change"] = paired_change(first_pp, last_pp)
    run.close({k: summary[k] for k in ("end_step", "checkpoints", "initial", "final", "change")})
    return summary


def rl_step(c, cfg, trainer: RLTrainer, tokenizer, reward_fn, sp, state, ref_params, step: int) -> dict:
    """Roll out, score, and update; returns the metrics row with the new state under "state"."""
    t0 = time.perf_counter()
    r = c.rl
    g = r.samples_per_prompt
    pairs = prompt_lib.batch(
        c.data.source, c.data.seed, step, r.prompts_per_step, tasks=c.data.tasks, toy_length=c.data.toy_length
    )
    prompts = [tokenizer.encode(p, bos=True) for p, _ in pairs for _ in range(g)]
    refs = [ref for _, ref in pairs for _ in range(g)]
    key = jax.random.fold_in(jax.random.PRNGKey(c.seed), step)
    rollout = sample(cfg, state["params"], prompts, sp, key)
    t_gen = time.perf_counter()
    texts = decode_responses(tokenizer, rollout, tokenizer.eos_id)
    rewards = np.asarray(reward_fn(texts, refs), np.float64).reshape(-1, g)
    adv = adv_lib.compute(rewards, r.advantage, r.zero_variance)

    arrays = {k: np.asarray(getattr(rollout, k)) for k in ("prompt", "prompt_lengths", "tokens", "mask")}
    dev = trainer.shard_rows(arrays)
    trainer_logp = np.asarray(trainer.logprobs(state["params"], dev))
    sampler_logp = np.asarray(rollout.logprobs)
    on = arrays["mask"] > 0
    arrays["old_logp"] = trainer_logp if r.old_logp == "trainer" else sampler_logp
    arrays["ref_logp"] = np.asarray(trainer.logprobs(ref_params, dev))
    arrays["advantages"] = adv.advantages.reshape(-1)
    weight = adv.weight.reshape(-1)
    if r.mask_truncated:  # DAPO overlong filtering: truncated responses carry no gradient
        weight = weight * (np.asarray(rollout.finish) != FINISH_LENGTH)
    arrays["mask"] = arrays["mask"] * weight[:, None]

    lr = float(trainer.lr_fn(int(jax.device_get(state["step"]))))  # of this step's first update
    rows = arrays["mask"].shape[0]
    order = np.random.default_rng([c.seed, step]).permutation(rows)
    per = rows // r.updates_per_rollout
    update_metrics = []
    for u in range(r.updates_per_rollout):
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
    row["empty_updates"] = r.updates_per_rollout - int(np.sum(w > 0))
    row["ratio_max"] = float(max(m["ratio_max"] for m in ms))
    row["ratio_min"] = float(min(m["ratio_min"] for m in ms))
    row["state"] = state
    return row
