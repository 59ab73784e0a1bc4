"""The RL run: `train(config, workdir)`, callable from the CLI or a notebook.

Each step: prompts (a pure function of seed and step) -> G responses each (`rl.sampler`) ->
rewards (`rl.rewards`) -> advantages (`rl.advantages`) -> old / reference log-probs (dispatched
before the rewards, which they do not need, so the device computes them while the host scores) ->
the rollout batch, kept on the device, shuffled into `updates_per_rollout` minibatch updates. With
kl_coef = 0 the logged `kl` is measured at the step's start on sample 0 of each group (`rl_step`).
Checkpoints hold the policy and optimizer; the reference policy is the initial one, rebuilt on
resume. Re-running the same command on the same workdir resumes; SIGTERM / SIGINT save and return.

Length control: each step samples with its stage's budget (`rl.sampling.max_new_tokens_schedule`,
`rl.config.max_new_tokens_at`); a longer stage only means arrays [B, N_stage], which the jitted
sampler, log-prob and update functions compile once per budget. Nothing in a checkpoint depends on
the budget, so a run resumes into a longer stage (or with another schedule). Evaluations use the
budget of the step last trained (the initial one, stage 0's). With `rl.overlong.enabled` DAPO's
soft overlong penalty (`rl.rewards.soft_overlong_penalty`) is added to every reward.
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
from rl import episodes, partial, rollouts
from rl import prompts as prompt_lib
from rl import rewards as reward_lib
from rl.config import loss_kwargs, max_new_tokens_at, reward_weights, rollout_axes, validate
from rl.evaluate import evaluate, paired_change
from rl.mismatch import behaviour_weights
from rl.rollouts import ROLLOUT_KEYS, Producer
from rl.sampler import FINISH_CONFIDENT, FINISH_LENGTH, SamplingParams, sample
from rl.step import RLTrainer
from rl.transfer import copy_to, shard_rows, to_host
from rl.worker import RolloutWorker

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
    if c.rl.env.name:  # tool episodes need the call tokens (a pretraining run's tokenizer, with init_from)
        episodes.tool_ids(tokenizer)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"model vocab_size={cfg.vocab_size} is smaller than the tokenizer's ({tokenizer.vocab_size})")
    s = c.rl.sampling
    sp = SamplingParams(
        max_new_tokens_at(c, 0),  # `rl_step` replaces it with each step's stage
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        stop_tokens=(tokenizer.eos_id,),
        pad_id=tokenizer.pad_id,
        confident_run=s.confident_run,
        confident_prob=s.confident_prob,
        slots=s.slots,
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


def make_meshes(c):
    """(learner mesh, rollout mesh). Without `rl.rollout_mesh` both are the mesh of `mesh` (rollouts
    and learner time-slice its devices). With it, each process gives the learner its first local
    devices and the rollouts the next ones, so with several hosts both meshes span all of them (one
    process: the learner's mesh is the first devices, the rollouts' the next)."""
    axes = rollout_axes(c)
    if axes is None:
        mesh = shd.mesh_from_config(dict(c.mesh))
        return mesh, mesh
    hosts = jax.process_count()
    learner, rollout = int(np.prod(list(c.mesh.values()))), int(np.prod(list(axes.values())))
    local = [jax.local_devices(process_index=p) for p in range(hosts)]
    if learner % hosts or rollout % hosts or any(len(d) < (learner + rollout) // hosts for d in local):
        raise ValueError(
            f"config.rl.rollout_mesh={axes} needs {rollout} devices beside the {learner} of mesh {dict(c.mesh)}, "
            f"split evenly over {hosts} process(es) of {min(map(len, local))} devices each"
        )
    a, b = learner // hosts, rollout // hosts
    mesh = shd.mesh_from_config(dict(c.mesh), [d for devs in local for d in devs[:a]])
    return mesh, shd.mesh_from_config(axes, [d for devs in local for d in devs[a : a + b]])


def start_worker(c, cfg, producer: Producer, rollout_mesh, *, step: int, data, params, workdir: str, stop_at=None):
    """The running `RolloutWorker` of a run at `step`: the batches its checkpoint saved are restored
    and version `step` (`params`) is published. `rollout_mesh` None = the learner's devices. With
    `stop_at` it samples no further than the batches that run's last checkpoint saves."""

    def place(params):  # a copy on the rollout devices: the learner donates its own to the next update
        if rollout_mesh is None:
            return jax.block_until_ready(jax.tree.map(lambda x: x.copy(), params))
        return jax.block_until_ready(copy_to(params, shd.param_shardings(cfg, rollout_mesh)))

    saved = (data or {}).get("rollouts", 0)
    batches = rollouts.load(workdir, step, saved) if saved else []
    if step and len(batches) < min(c.rl.max_staleness, c.steps - step):
        log.warning(
            f"resuming at step {step} with {len(batches)} saved rollout batch(es) for max_staleness="
            f"{c.rl.max_staleness}: the versions before step {step} are gone, so the next batches are "
            f"sampled by version {step} (less stale than in an uninterrupted run)"
        )
    k = c.rl.max_staleness
    if len(batches) > k:  # K shrank since the save: those batches exist, so they are used (none is lost)
        worst = max(int(b["step"]) - int(b["version"]) for b in batches)
        log.warning(
            f"resuming at step {step} with {len(batches)} saved rollout batch(es) for max_staleness={k}: they are "
            f"trained on as saved (staleness up to {worst}); max_staleness={k} holds from step {step + len(batches)}"
        )
    stop = c.steps if stop_at is None else min(c.steps, stop_at + k)
    worker = RolloutWorker(producer, start=step, stop=stop, staleness=k, floor=step, place=place, saved=batches)
    worker.publish(step, params)
    return worker


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
    mesh, rollout_mesh = make_meshes(c)
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
    state, start, data = run.begin(trainer.abstract_state, lambda: fresh)
    summary = {"workdir": workdir, "start_step": start, "stopped_by": None}
    first_pp, last_pp, last_eval = {}, {}, {}
    budget = lambda step: max_new_tokens_at(c, max(step - 1, 0))  # of the policy after `step` steps: its last stage
    if start == 0:
        first = evaluate(cfg, state["params"], tokenizer, c, reward_fn, per_prompt=first_pp, max_new_tokens=budget(0))
        run.writer.write(0, first)
        summary["initial"] = first

    worker = None
    if (data or {}).get("carry") and not r.sampling.partial:
        log.warning(f"the checkpoint at step {start} carries partial rollouts; rl.sampling.partial is off: dropped")
    if (data or {}).get("rollouts") and not r.max_staleness and rollout_mesh is mesh:
        if r.sampling.partial and data.get("carry"):  # the carry after those batches would skip their responses
            raise ValueError(
                f"config.rl.max_staleness=0: the checkpoint at step {start} saved {data['rollouts']} batch(es) of a "
                f"partial-rollout run sampled ahead; resume it with max_staleness >= {data['rollouts']}"
            )
        log.warning(
            f"the checkpoint at step {start} saved {data['rollouts']} rollout batch(es) sampled by older policies; "
            "with max_staleness=0 they are not used: those steps are sampled again by the current policy "
            "(same prompts and keys)"
        )
    producer = Producer(c, cfg, tokenizer, reward_fn, sp, sampler=sample, stream=_stream(c, workdir, start, data))
    consumed = {start: producer.stream.snapshot()} if producer.stream is not None else {}  # step -> carry before it
    if r.max_staleness or rollout_mesh is not mesh:  # rollouts in a thread, `max_staleness` versions behind
        own = None if rollout_mesh is mesh else rollout_mesh
        worker = start_worker(
            c, cfg, producer, own, step=start, data=data, params=state["params"], workdir=workdir, stop_at=stop_at
        )

    written = {}

    def data_state(step):
        if step in written:  # a periodic save, then the final one at the same step: the save is skipped
            return written[step]
        if step == start and data is not None:  # the checkpoint resumed from: kept as it is, with its batches
            return data
        d = {"step": step}
        batches = []
        if worker is not None:  # the batches sampled by versions this checkpoint cannot recreate
            batches = worker.pending(step, min(step + r.max_staleness, c.steps))
            d["rollouts"] = len(batches)
        carry = None
        if producer.stream is not None:  # the responses carried past the last of them
            if batches:
                carry = {k: v for k, v in batches[-1].items() if k.startswith("carry_")}
            elif worker is not None:  # the thread may be generating ahead: the stream before batch `step`
                carry = consumed[step]
            else:  # synchronous: the stream as it is now
                carry = producer.stream.snapshot()
            d["carry"] = 1
        if (worker is not None or carry is not None) and run.primary:
            rollouts.save(workdir, step, batches, keep=run.ckpt.steps(), carry=carry)
        written[step] = d
        return d

    def body(state, step):
        if worker is None:
            row = rl_step(c, cfg, trainer, tokenizer, reward_fn, sp, state, ref_params, step, producer=producer)
        else:
            t0 = time.perf_counter()
            batch, _ = worker.get(step)
            if producer.stream is not None:  # the stream after batch `step`, i.e. before batch step + 1
                consumed.clear()
                consumed[step + 1] = {k: v for k, v in batch.items() if k.startswith("carry_")}
            row = learn(c, trainer, state, ref_params, batch, t0=t0)
            worker.publish(step + 1, row["state"]["params"])
        state = row.pop("state")
        step += 1
        if step % c.log.every == 0 or step == c.steps:
            run.writer.write(step, row)
        if step % c.eval.every == 0 or step == c.steps:
            last_eval[step] = evaluate(
                cfg, state["params"], tokenizer, c, reward_fn, per_prompt=last_pp, max_new_tokens=budget(step)
            )
            run.writer.write(step, last_eval[step])
        if run.bar is not None:
            run.bar.set_postfix(reward=f"{row['reward']:.3f}", len=f"{row['response_length']:.0f}", refresh=False)
        return state

    try:
        state, step = run.loop(state, start, body, data_state, stop_at=stop_at)
    finally:
        if worker is not None:
            worker.close()
    summary.update(end_step=step, checkpoints=run.ckpt.steps(), state=state, stopped_by=run.stopped_by)
    if run.stopped_by:
        run.close()
        return summary
    if step not in last_eval:  # (each evaluation overwrites the same per-prompt keys)
        last_eval[step] = evaluate(
            cfg, state["params"], tokenizer, c, reward_fn, per_prompt=last_pp, max_new_tokens=budget(step)
        )
    summary["final"] = last_eval[step]
    if not first_pp:  # resumed: the initial policy is the reference, so evaluate that
        summary["initial"] = evaluate(
            cfg, ref_params, tokenizer, c, reward_fn, per_prompt=first_pp, max_new_tokens=budget(0)
        )
    summary["change"] = paired_change(first_pp, last_pp)
    run.close({k: summary[k] for k in ("end_step", "checkpoints", "initial", "final", "change")})
    return summary


# The row keys measured by the clock: what differs between two runs of the same config and seed.
TIMINGS = ("gen_time_s", "reward_time_s", "logprob_time_s", "update_time_s", "step_time_s")
TIMINGS += ("rollout_wait_s", "worker_wait_s", "gen_tokens_per_s")
_REPLAY = ("router_flip_fraction",)  # with router replay (rl.mismatch.router_replay)


def _k3_mean(logp, ref_logp, mask) -> float:
    """Token mean of the k3 KL estimator (`rl.losses.k3_kl`: exp(d) - d - 1, d = ref - logp) over mask > 0."""
    on = mask > 0
    d = ref_logp[on].astype(np.float64) - logp[on]
    return float(np.mean(np.exp(d) - d - 1.0)) if on.any() else 0.0


def _group_subset(trainer: RLTrainer, params, dev: dict, g: int):
    """Log-probs [P, N] of sample 0 of each group (rows 0, G, 2G, ...), dispatched on the device. The
    rows are gathered before the forward when the P of them split over the batch-parallel devices (a
    1/G-size forward); otherwise every row is run and the subset taken."""
    rows = np.arange(0, dev["mask"].shape[0], g)
    if len(rows) % batch_parallel(trainer.mesh.shape) == 0:
        return trainer.logprobs(params, trainer.take_rows(dev, rows))
    return trainer.logprobs(params, dev)[rows]


def diagnostic_logprobs(c) -> bool:
    """Whether the trainer's log-probs of a rollout feed only metrics (logp_gap, the kl_coef = 0 KL):
    the ratio's old log-probs are the sampler's and no mismatch correction reads them. They are then
    computed for sample 0 of each group only, a 1/G-size forward (on the learner's critical path when
    rollouts run beside it)."""
    return c.rl.old_logp == "sampler" and c.rl.mismatch.mode == "none"


def _dispatch_logprobs(c, trainer: RLTrainer, params, ref_params, dev: dict):
    """(trainer log-probs [R, N], or [P, N] when `diagnostic_logprobs`; reference log-probs [R, N],
    or [P, N] with kl_coef = 0) of the rollout rows `dev`, dispatched (not waited for). [P, N]: sample
    0 of each group."""
    g = c.rl.samples_per_prompt
    trainer_logp = _group_subset(trainer, params, dev, g) if diagnostic_logprobs(c) else trainer.logprobs(params, dev)
    free = {k: v for k, v in dev.items() if k != "routes"}  # the reference policy routes freely
    ref_logp = trainer.logprobs(ref_params, free) if c.rl.kl_coef else _group_subset(trainer, ref_params, free, g)
    return trainer_logp, ref_logp


def _stream(c, workdir: str, start: int, data) -> partial.Stream | None:
    """The partial-rollout stream of a run at `start`: restored from its checkpoint, or new (a run
    that did not carry: group ids continue after the prompts of its `start` steps)."""
    if not c.rl.sampling.partial:
        return None
    g = c.rl.samples_per_prompt
    if (data or {}).get("carry"):
        return partial.Stream.restore(g, rollouts.load_carry(workdir, start))
    # after the batches saved ahead, which the worker hands out first
    return partial.Stream(g, next_gid=(start + (data or {}).get("rollouts", 0)) * c.rl.prompts_per_step)


def rl_step(c, cfg, trainer: RLTrainer, tokenizer, reward_fn, sp, state, ref_params, step: int, producer=None) -> dict:
    """One synchronous step (max_staleness = 0): roll out with the current policy, score, and update;
    returns the metrics row with the new state under "state".

    The phase timings are sequential, each ended by waiting for its device work, so they add up to at
    most step_time_s: gen_time_s (prompts and sampling), reward_time_s (decoding, rewards,
    advantages), logprob_time_s (the wait for the old / reference log-prob forwards: they are
    dispatched before the reward phase and run under it, so this is only the part it did not hide)
    and update_time_s (the updates, until their metrics are back on the host).

    `kl`: with kl_coef > 0, the updates' KL term (token-weighted over the updates). With kl_coef = 0
    the term adds nothing to the loss, so the reference forward runs only on sample 0 of each group
    and `kl` is their token-mean k3 KL to the reference at the step's start (before its updates).
    """
    t0 = time.perf_counter()
    producer = producer or Producer(c, cfg, tokenizer, reward_fn, sp, sampler=sample)
    rollout, refs, budget = producer.generate(state["params"], step)
    t_gen = time.perf_counter()
    # The log-prob forwards need only the rollout: dispatched now, they run while the host scores it.
    # (routes: with router replay the trainer's forwards take the sampler's experts; else None)
    rows = {k: v for k in (*ROLLOUT_KEYS, "mask") if (v := getattr(rollout, k)) is not None}
    dev = shard_rows(trainer, rows)
    logps = _dispatch_logprobs(c, trainer, state["params"], ref_params, dev)
    batch = producer.score(jax.device_get(rollout), refs, budget, step=step, version=step, gen_time_s=t_gen - t0)
    return learn(c, trainer, state, ref_params, batch, t0=t0, t_gen=t_gen, dev=dev, logps=logps)


def learn(c, trainer: RLTrainer, state, ref_params, batch: dict, *, t0: float, t_gen=None, dev=None, logps=None):
    """The learner's half of a step on a rollout `batch` (`rl.rollouts`): old / reference log-probs,
    the minibatch updates, the metrics row (new state under "state").

    Synchronous steps (`rl_step`) pass `t_gen` (when sampling ended) and the rollout rows `dev` with
    their log-prob forwards already dispatched. Batches from the rollout worker come without them:
    their gen / reward times are the worker's, and `rollout_wait_s` is the learner's wait for it."""
    r = c.rl
    g = r.samples_per_prompt
    step = int(batch["step"])
    mask, sampler_logp = batch["response_mask"], batch["logprobs"]
    t_start = time.perf_counter()
    if dev is None:
        dev = shard_rows(trainer, {k: batch[k] for k in ROLLOUT_KEYS if k in batch} | {"mask": mask})
        logps = _dispatch_logprobs(c, trainer, state["params"], ref_params, dev)
    trainer_logp, ref_logp = logps
    pushed = {"mask": mask * batch["weight"][:, None], "advantages": batch["advantages"]}
    if r.old_logp == "sampler":
        pushed["old_logp"] = sampler_logp
    train_batch = dict(dev, **shard_rows(trainer, pushed))
    t_reward = time.perf_counter()

    trainer_logp_host = to_host(trainer, trainer_logp)  # fetched once, for logp_gap (and the kl_coef = 0 KL)
    sub = g if diagnostic_logprobs(c) else 1  # trainer_logp covers rows 0, sub, 2 sub, ...
    if r.old_logp == "trainer":
        train_batch["old_logp"] = trainer_logp  # stays on the device
    mm = r.mismatch
    if mm.mode != "none":  # behaviour weights pi_old / pi_sampler, truncated or masked (rl.mismatch)
        is_weight, mm_metrics = behaviour_weights(
            trainer_logp_host, sampler_logp, mask, mm.mode, mm.level, mm.upper, mm.lower
        )
        train_batch["is_weight"] = shard_rows(trainer, {"w": is_weight})["w"]
    if r.kl_coef:
        train_batch["ref_logp"] = jax.block_until_ready(ref_logp)
    else:
        kl = _k3_mean(trainer_logp_host[:: g // sub], to_host(trainer, ref_logp), mask[::g])
    t_logp = time.perf_counter()

    n = mask.shape[0]
    order = np.random.default_rng([c.seed, step]).permutation(n)
    per = n // r.updates_per_rollout
    update_metrics = []
    for u in range(r.updates_per_rollout):
        state, m = trainer.update(state, trainer.take_rows(train_batch, order[u * per : (u + 1) * per]))
        update_metrics.append(m)
    # One host sync for the whole phase: the metrics and the counters after the last update.
    fetched, applied, skipped = jax.device_get((update_metrics, state["step"], state["skipped"]))
    t_update = time.perf_counter()

    lr = float(trainer.lr_fn(int(applied) - sum(int(m["applied"]) for m in fetched)))  # of this step's first update
    ms = [m for m in fetched if m["tokens"] > 0] or fetched[:1]
    w = np.asarray([m["tokens"] for m in ms], np.float64)
    mean = lambda k: float(np.sum([m[k] * wi for m, wi in zip(ms, w, strict=True)]) / max(w.sum(), 1.0))
    on = mask > 0
    gap = np.abs(trainer_logp_host - sampler_logp[::sub])[on[::sub]]
    rewards, lengths, finish = batch["rewards"], batch["lengths"], batch["finish"]
    finite = np.isfinite(rewards).any()
    if t_gen is None:  # a worker's batch: its own phase times, and the learner's wait for it
        times = {"gen_time_s": float(batch["gen_time_s"]), "reward_time_s": float(batch["reward_time_s"])}
        times["rollout_wait_s"] = t_start - t0  # the learner's wait for this batch
        if "worker_wait_s" in batch:  # the rollout thread's wait for the version that sampled it
            times["worker_wait_s"] = float(batch["worker_wait_s"])
        gen_s = times["gen_time_s"]
    else:
        times = {"gen_time_s": t_gen - t0, "reward_time_s": t_reward - t_gen}
        gen_s = t_gen - t0
    if "versions" in batch:  # partial rollouts: each token's own version
        ages = (step - batch["versions"])[mask > 0]
        staleness = (float(ages.mean()), int(ages.max())) if ages.size else (0.0, 0)
    else:  # one version per batch: every token has this staleness
        staleness = (float(step - int(batch["version"])), step - int(batch["version"]))
    row = {
        "reward": float(np.nanmean(rewards)) if finite else float("nan"),
        "reward_std": float(np.nanstd(rewards)) if finite else float("nan"),
        "pass_rate": float(np.mean(batch["passed"])),
        "response_length": float(lengths.mean()),
        "response_length_max": float(lengths.max()),
        "max_new_tokens": int(batch["budget"]),
        "truncated_fraction": float(np.mean(finish == FINISH_LENGTH)),
        "confident_stop_fraction": float(np.mean(finish == FINISH_CONFIDENT)),
        "zero_variance_fraction": float(batch["zero_variance"].mean()),
        "invalid_rewards": int(batch["invalid"].sum()),
        "logp_gap": float(gap.mean()) if gap.size else 0.0,
        "logp_gap_max": float(gap.max()) if gap.size else 0.0,
        "lr": lr,
        "skipped_updates": int(skipped),
        "staleness_mean": staleness[0],
        "staleness_max": staleness[1],
        **times,
        "logprob_time_s": t_logp - t_reward,
        "update_time_s": t_update - t_logp,
        "gen_tokens_per_s": float(lengths.sum()) / max(gen_s, 1e-9),
    }
    for k in ("loss", "pg_loss", "kl", "clip_fraction", "ratio_mean", "entropy", "grad_norm", "aux_loss", *_REPLAY):
        if k in ms[0]:
            row[k] = mean(k)  # token-weighted over this step's updates
    if not r.kl_coef:
        row["kl"] = kl
    if mm.mode != "none":
        row.update(mm_metrics)  # logp_gap (before) beside logp_gap_corrected (what the update still sees)
    if r.overlong.enabled:
        row["overlong_penalty"] = float(batch["penalty"].mean())  # included in `reward`
    if "context" in batch:  # multi-turn episodes
        counters = {k.removeprefix("episode_"): v for k, v in batch.items() if k.startswith("episode_")}
        row.update(episodes.metrics(counters))
    row["empty_updates"] = r.updates_per_rollout - int(np.sum(w > 0))
    row["ratio_max"] = float(max(m["ratio_max"] for m in ms))
    row["ratio_min"] = float(min(m["ratio_min"] for m in ms))
    row["state"] = state
    row["step_time_s"] = time.perf_counter() - t0
    return row
