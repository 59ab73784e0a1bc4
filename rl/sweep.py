"""Compare RL objectives under one harness: several losses x several seeds, and what to read off.

`compare(c, losses, seeds)` runs `rl.loop.rl_step` (the very step `rl.loop.train` runs) for
`c.steps` steps per (loss, seed), every run from the same initial policy for a given seed (the
pretrained `c.rl.init_from`, or `c.model` initialised from `PRNGKey(seed)`) on the same prompt stream
(`c.data.seed`). Unlike one `train()` per run it compiles each loss's update once and reuses it for
every seed, and it neither evaluates nor checkpoints: a sweep of small runs spends its time
training, not compiling. With `c.seed = seed` a run's metric rows equal those `train(c, workdir)`
writes to metrics.jsonl (tested).

`steps_to_reach`, `band` and `summarize` turn the runs into the numbers of an ablation: steps to a
target reward, mean / std / min / max across seeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from m1jax import sharding as shd
from rl import loop as rl_loop
from rl.config import validate
from rl.step import RLTrainer

Runs = dict[str, dict[int, list[dict]]]  # loss -> seed -> one metrics row per step (with "step")


def compare(
    c: ml_collections.ConfigDict,
    losses: Sequence[str] = ("cispo", "dapo", "grpo", "gspo"),
    seeds: Sequence[int] = (0, 1),
    *,
    progress: bool = False,
    on_step: Callable[[str, int, dict], None] | None = None,
) -> Runs:
    """Train `c` with each loss in `losses` and each seed in `seeds` for `c.steps` steps.

    Returns runs[loss][seed] = [row of step 1, row of step 2, ...], each row the metrics
    `rl.loop.rl_step` reports (reward, pass_rate, clip_fraction, kl, ...) plus "step", "loss_name",
    "seed" and "wall_s" (seconds since the run's first step). `on_step(loss, seed, row)` is called
    after every step.
    """
    validate(c)
    mesh = shd.mesh_from_config(dict(c.mesh))
    run = rl_loop.setup(c, mesh)
    cfg, tokenizer, reward_fn, sp = run.cfg, run.tokenizer, run.reward_fn, run.sampling
    pretrained = None if run.init_params is None else jax.device_get(run.init_params)  # every run starts from it
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(losses) * len(seeds) * c.steps, desc="sweep", unit="step", dynamic_ncols=True)
    runs: Runs = {}
    first: RLTrainer | None = None
    init_states: dict[int, dict] = {}  # seed -> host copy of the initial state (the same for every loss)
    for loss in losses:
        cl = c.copy_and_resolve_references()
        cl.rl.loss = loss
        validate(cl)
        trainer, tx = rl_loop.make_trainer(cl, cfg, mesh)
        if first is None:
            first = trainer
        else:  # log-probs depend on (cfg, temperature) only: one compiled function for every loss
            trainer.logprobs = first.logprobs
        runs[loss] = {}
        for seed in seeds:
            cs = cl.copy_and_resolve_references()
            cs.seed = int(seed)
            if cs.seed not in init_states:  # the state train() starts from (the optimizer is the same for every loss)
                init_states[cs.seed] = jax.device_get(rl_loop.initial_state(first, tx, cs.seed, pretrained))
            state = jax.device_put(init_states[cs.seed], trainer.state_sharding)  # donated by every update
            ref_params = jax.tree.map(lambda x: x.copy(), state["params"])
            rows = []
            t0 = time.perf_counter()
            for step in range(cs.steps):
                row = rl_loop.rl_step(cs, cfg, trainer, tokenizer, reward_fn, sp, state, ref_params, step)
                state = row.pop("state")
                row = {"step": step + 1, "loss_name": loss, "seed": cs.seed, **row}
                row["wall_s"] = time.perf_counter() - t0
                rows.append(row)
                if on_step is not None:
                    on_step(loss, cs.seed, row)
                if bar is not None:
                    bar.set_postfix(loss=loss, seed=cs.seed, reward=f"{row['reward']:.3f}", refresh=False)
                    bar.update(1)
            runs[loss][cs.seed] = rows
            del state, ref_params
    if bar is not None:
        bar.close()
    return runs


def moving_average(x: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start); window 1 = x."""
    x = np.asarray(x, np.float64)
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def steps_to_reach(steps: Sequence[int], values: Sequence[float], target: float, window: int = 1) -> int | None:
    """The first step whose trailing `window`-step mean of `values` is >= `target`; None if none.

    The trailing mean only counts steps already taken, so the answer never looks ahead.
    """
    steps = np.asarray(steps)
    if len(steps) != len(values):
        raise ValueError(f"{len(steps)} steps but {len(values)} values")
    hit = np.nonzero(moving_average(values, window) >= target)[0]
    return int(steps[hit[0]]) if len(hit) else None


def band(curves: Sequence[Sequence[float]]) -> dict[str, np.ndarray]:
    """Per-step statistics across seeds of equal-length curves: mean, std (population), min, max."""
    a = np.asarray(curves, np.float64)
    if a.ndim != 2:
        raise ValueError(f"curves must be [seeds, steps], got shape {a.shape}")
    return {"mean": a.mean(0), "std": a.std(0), "min": a.min(0), "max": a.max(0)}


def curve(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of metric `key` over a run's rows (rows without it are skipped)."""
    rs = [r for r in rows if key in r]
    return np.asarray([r["step"] for r in rs]), np.asarray([float(r[key]) for r in rs], np.float64)


def summarize(runs: Runs, target: float, *, key: str = "reward", window: int = 1, last: int = 5) -> dict:
    """Per loss: steps to reach `target` (per seed and their mean over the seeds that reached it),
    the final `key` (mean over the last `last` steps, then mean / std / min / max over seeds), and
    the mean clip fraction, KL and ratio extremes over all steps."""
    out = {}
    for loss, by_seed in runs.items():
        reach, finals, clip, kl, rmax, rmin = {}, [], [], [], [], []
        for seed, rows in by_seed.items():
            steps, vals = curve(rows, key)
            reach[seed] = steps_to_reach(steps, vals, target, window)
            finals.append(float(np.mean(vals[-last:])))
            clip.append(float(np.mean(curve(rows, "clip_fraction")[1])))
            kl.append(float(np.mean(curve(rows, "kl")[1])) if any("kl" in r for r in rows) else float("nan"))
            rmax.append(float(np.max(curve(rows, "ratio_max")[1])))
            rmin.append(float(np.min(curve(rows, "ratio_min")[1])))
        reached = [s for s in reach.values() if s is not None]
        f = np.asarray(finals)
        out[loss] = {
            "steps_to_target": reach,
            "reached": len(reached),
            "seeds": len(reach),
            "mean_steps_to_target": float(np.mean(reached)) if reached else None,
            f"final_{key}_mean": float(f.mean()),
            f"final_{key}_std": float(f.std()),
            f"final_{key}_min": float(f.min()),
            f"final_{key}_max": float(f.max()),
            "clip_fraction_mean": float(np.mean(clip)),
            "kl_mean": float(np.nanmean(kl)) if np.isfinite(kl).any() else None,
            "ratio_max": float(np.max(rmax)),
            "ratio_min": float(np.min(rmin)),
        }
    return out
