"""Rollout batches: the producer half of an RL step (prompts -> responses -> rewards -> advantages).

A batch is a flat dict of host NumPy arrays, so it crosses threads (`rl.worker`) and goes into a
checkpoint (`save` / `load`) as it is:
  rows [R, ...] (R = P x G, group-major): prompt [R, T], prompt_lengths, tokens [R, N],
    response_mask [R, N], logprobs [R, N] (the behaviour policy's, fp32), lengths, finish,
    routes [R, T + N, L, k] (with router replay: the sampler's experts), context [R, N] and
    episode_<counter> [R] (multi-turn episodes, `rl.episodes`),
    passed (exact match), penalty (soft overlong, 0 when off), advantages, weight (the sample's
    loss weight: zero-variance groups dropped, truncated responses masked if configured);
  groups [P, G]: rewards (task + penalty), task;  zero_variance [P], invalid [P, G];
  scalars (0-d): step (the learner step that consumes it), version (of the policy that sampled it),
    budget (max_new_tokens), gen_time_s, reward_time_s.
Everything in it is a function of (config, seed, step, the params of `version`): prompts come from
(data seed, step), the sampling key from (seed, step), so a batch can be regenerated exactly.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import jax
import ml_collections
import numpy as np

from m1jax.config import ModelConfig
from rl import advantages as adv_lib
from rl import episodes, partial
from rl import prompts as prompt_lib
from rl import rewards as reward_lib
from rl.config import max_new_tokens_at, overlong_limits
from rl.evaluate import decode_responses, exact
from rl.sampler import FINISH_LENGTH, Rollout, SamplingParams, sample

# With response_mask: what the log-prob forwards need (routes only with router replay).
ROLLOUT_KEYS = ("prompt", "prompt_lengths", "tokens", "routes", "context")


@dataclasses.dataclass(frozen=True)
class Producer:
    """Makes the batch of a learner step from a policy's params: `generate` (device work, blocked
    on) then `score` (host work); `__call__` does both."""

    c: ml_collections.ConfigDict
    cfg: ModelConfig
    tokenizer: object
    reward_fn: object
    sp: SamplingParams
    sampler: object = sample  # (cfg, params, prompts, sp, key) -> Rollout; replaceable in tests
    stream: partial.Stream | None = None  # with rl.sampling.partial: the responses carried between steps

    def _pairs(self, step: int):
        return prompt_lib.for_config(self.c, step, self.c.rl.prompts_per_step)

    def generate(self, params, step: int, version: int | None = None):
        """(rollout on the device, finished; the references of its rows; its token budget)."""
        c, r = self.c, self.c.rl
        if self.stream is not None:
            return self._generate_partial(params, step, step if version is None else version)
        g = r.samples_per_prompt
        pairs = self._pairs(step)
        prompts = [self.tokenizer.encode(p, bos=True) for p, _ in pairs for _ in range(g)]
        refs = [ref for _, ref in pairs for _ in range(g)]
        key = jax.random.fold_in(jax.random.PRNGKey(c.seed), step)
        budget = max_new_tokens_at(c, step)
        # Equal params reuse the compiled sampler; router replay needs the experts it chose.
        sp = dataclasses.replace(self.sp, max_new_tokens=budget, record_routes=bool(r.mismatch.router_replay))
        pad = self.c.rl.sampling.pad_multiple
        if r.env.name:  # multi-turn episodes: the budget is the episode's
            texts = [p for p, _ in pairs for _ in range(g)]
            return (
                episodes.play(c, self.cfg, params, self.tokenizer, texts, refs, sp, key, sampler=self.sampler),
                refs,
                budget,
            )
        rollout = self.sampler(self.cfg, params, prompts, sp, key, pad_multiple=pad)
        rollout = jax.block_until_ready(rollout)  # dispatch is asynchronous
        return rollout, refs, budget

    def _generate_partial(self, params, step: int, version: int):
        """The step's batch from the group stream (`rl.partial`): a host Rollout with token versions."""
        c, p = self.c, self.c.rl.prompts_per_step
        pairs = {}

        def pair(gid):  # group gid = prompt gid % P of the step-batch gid // P
            if gid // p not in pairs:
                pairs[gid // p] = self._pairs(gid // p)
            return pairs[gid // p][gid % p]

        budget = max_new_tokens_at(c, step)
        sp = dataclasses.replace(self.sp, max_new_tokens=budget)
        slots = sp.slots or p * self.stream.size
        key = jax.random.split(jax.random.PRNGKey(c.seed))[1]  # one key for the whole run (not a step's)
        prompt_of = lambda gid: self.tokenizer.encode(pair(gid)[0], bos=True)
        kw = dict(want=p, version=version, rng=key, slots=slots, pad_multiple=c.rl.sampling.pad_multiple)
        groups = partial.generate(self.cfg, sp, params, self.stream, prompt_of, **kw)
        rollout, versions = partial.to_rollout(groups, budget, sp.pad_id, c.rl.sampling.pad_multiple)
        refs = [pair(s.gid)[1] for grp in groups for s in grp]
        return rollout._replace(versions=versions), refs, budget

    def score(self, host: Rollout, refs, budget: int, *, step: int, version: int, gen_time_s: float) -> dict:
        """The batch dict (module docstring) of a host rollout: rewards, advantages, weights."""
        t0 = time.perf_counter()
        r = self.c.rl
        g = r.samples_per_prompt
        texts = decode_responses(self.tokenizer, host, self.tokenizer.eos_id)
        task = np.asarray(self.reward_fn(texts, refs), np.float64).reshape(-1, g)
        penalty = np.zeros(len(texts), np.float64)
        if r.overlong.enabled:  # reward functions see texts only: the length penalty is added here
            penalty = reward_lib.soft_overlong_penalty(host.lengths, *overlong_limits(self.c, budget))
        rewards = task + penalty.reshape(-1, g) if r.overlong.enabled else task
        if host.episode is not None:  # per-turn rewards (NaN where the environment failed: invalid)
            rewards = rewards + np.asarray(host.episode["turn_reward"]).reshape(-1, g)
        # Groups without signal are judged on the task reward (DAPO filters on accuracy, not on length).
        adv = adv_lib.compute(rewards, r.advantage, r.zero_variance, signal=task)
        weight = adv.weight.reshape(-1)
        if r.mask_truncated:  # DAPO overlong filtering: truncated responses carry no gradient
            weight = weight * (host.finish != FINISH_LENGTH)
        keys = ("prompt", "prompt_lengths", "tokens", "logprobs", "lengths", "finish")
        batch = {k: np.asarray(getattr(host, k)) for k in keys}
        batch.update(
            response_mask=np.asarray(host.mask),
            passed=np.asarray(exact(self.c, texts, refs), bool),
            penalty=penalty,
            advantages=adv.advantages.reshape(-1),
            weight=np.asarray(weight, np.float32),
            rewards=rewards,
            task=task,
            zero_variance=adv.zero_variance,
            invalid=adv.invalid,
        )
        if host.routes is not None:
            batch["routes"] = np.asarray(host.routes)  # [R, T + N, L, k], replayed by the trainer
        if host.versions is not None:
            batch["versions"] = np.asarray(host.versions)
        if host.context is not None:  # multi-turn: tool tokens are in the context, not in the loss
            batch["context"] = np.asarray(host.context)
            batch.update({f"episode_{k}": np.asarray(v) for k, v in host.episode.items()})
        if self.stream is not None:  # the responses carried past this batch (restored with a checkpoint)
            batch.update(self.stream.snapshot())
        scalars = {"step": step, "version": version, "budget": budget, "gen_time_s": gen_time_s}
        batch.update({k: np.asarray(v) for k, v in scalars.items()})
        batch["reward_time_s"] = np.asarray(time.perf_counter() - t0)
        return batch

    def __call__(self, params, step: int, version: int) -> dict:
        t0 = time.perf_counter()
        rollout, refs, budget = self.generate(params, step, version)
        t_gen = time.perf_counter() - t0
        return self.score(jax.device_get(rollout), refs, budget, step=step, version=version, gen_time_s=t_gen)


# --- checkpointed batches: the unconsumed batches [s, s + K) of an asynchronous run at step s ---


def path(workdir: str, step: int) -> str:
    return os.path.join(workdir, "rollouts", f"step_{step}.npz")


def save(workdir: str, step: int, batches: list[dict], keep: list[int], carry: dict | None = None) -> None:
    """Write `batches` (consecutive steps) and the partial-rollout `carry` (`partial.Stream.snapshot`)
    for the checkpoint at `step`, atomically (a kill mid-write leaves the previous file set), and
    delete the files of steps not in `keep` (pruned checkpoints). Written before the checkpoint
    itself, so a checkpoint never lacks its batches."""
    d = os.path.dirname(path(workdir, step))
    os.makedirs(d, exist_ok=True)
    if batches or carry:
        flat = {f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()}
        flat.update({f"carry/{k}": v for k, v in (carry or {}).items()})
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **flat)
        os.replace(tmp, path(workdir, step))
    for name in os.listdir(d):
        if name.startswith("step_") and name.endswith(".npz") and int(name[5:-4]) not in {*keep, step}:
            os.remove(os.path.join(d, name))


def load(workdir: str, step: int, count: int) -> list[dict]:
    """The `count` batches saved with the checkpoint at `step` (steps step .. step + count - 1)."""
    p = path(workdir, step)
    if not os.path.exists(p):
        raise ValueError(
            f"the checkpoint at step {step} lists {count} saved rollout batch(es) but {p} is missing; "
            "restore that file, or resume with config.rl.max_staleness=0"
        )
    with np.load(p) as z:
        out = [{} for _ in range(count)]
        for name in z.files:
            i, _, k = name.partition("/")
            if i != "carry" and int(i) < count:
                out[int(i)][k] = z[name]
    if any(not b for b in out):
        raise ValueError(f"{p} holds fewer than the {count} rollout batches its checkpoint lists")
    for i, b in enumerate(out):
        if int(b["step"]) != step + i:
            raise ValueError(f"{p}: batch {i} is of step {int(b['step'])}, expected {step + i}")
    return out


def load_carry(workdir: str, step: int) -> dict:
    """The partial-rollout carry saved with the checkpoint at `step`."""
    p = path(workdir, step)
    if not os.path.exists(p):
        raise ValueError(f"the checkpoint at step {step} lists carried partial rollouts but {p} is missing")
    with np.load(p) as z:
        return {name[6:]: z[name] for name in z.files if name.startswith("carry/")}
