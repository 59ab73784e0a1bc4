"""Rollout throughput: the engine (continuous batching) against the fixed-batch sampler, side by side.

Usage: python -m experiments.benchmarks.rollout [--quick] [--preset mini] [--samples 64] [--max-new 128]
       [--slots 16] [--reps 3] [--out rollout_benchmark.json]

The length mix is long-tailed, as RL rollouts are: most responses short, a tenth at the limit. To get
it from a randomly initialised model with both samplers emitting the *same* tokens, decoding is greedy
and the mix is chosen, not hoped for: a pool of random prompts is decoded once without a stop token,
the stop token is the one that ends the most pool rows within `max_new / 8` tokens while leaving at
least a tenth of them running to the limit, and the batch takes 90% short rows and 10% that never emit
it, in a fixed shuffled order. The two samplers then produce identical tokens (`tokens_identical`),
so the ratio of generated tokens per second is the ratio of their speeds on one workload. After one
warm-up call each (compilation), the two alternate `--reps` rounds so machine drift hits both alike.

The fixed-batch sampler (`rl.sampler.sample_fixed`) decodes every row until the longest has finished;
the engine (`rl.sampler.sample`) keeps `--slots` rows in flight and refills a slot as soon as its row
ends. `decode_row_steps` counts the rows each one pushes through the model (finished rows included:
shapes are fixed), the work the ratio comes from.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import jax
import numpy as np

from experiments.benchmarks.forward import timed, write_report
from m1jax import config
from m1jax.generate import generate
from m1jax.model import init_params
from rl import engine
from rl.sampler import SamplingParams, sample, sample_fixed


def long_tailed_mix(cfg, params, samples: int, max_new: int, seed: int = 0):
    """(prompts, stop token, lengths) with 90% of rows ending within max_new / 8 and 10% at the limit."""
    rng = np.random.default_rng(seed)
    pool = [rng.integers(1, cfg.vocab_size, size=int(rng.integers(16, 48))).tolist() for _ in range(4 * samples)]
    toks = np.asarray(generate(cfg, params, pool, max_new, greedy=True).tokens)  # [P, N], no stop token
    short_at, n_long = max(max_new // 8, 2), max(samples // 10, 1)
    best = None
    for t in np.unique(toks):
        hit = toks == t
        first = np.where(hit.any(1), hit.argmax(1), max_new)
        short, never = np.flatnonzero(first < short_at), np.flatnonzero(first == max_new)
        if len(never) >= n_long and (best is None or len(short) > len(best[1])):
            best = (int(t), short, never)
    if best is None or len(best[1]) < samples - n_long:
        raise SystemExit(f"no stop token gives {samples - n_long} short and {n_long} long rows; try another --seed")
    t, short, never = best
    rows = np.concatenate(
        [rng.choice(short, samples - n_long, replace=False), rng.choice(never, n_long, replace=False)]
    )
    rng.shuffle(rows)
    return [pool[i] for i in rows], t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny model, 20 samples of up to 32 tokens, 1 rep")
    ap.add_argument("--out", default="rollout_benchmark.json")
    a = ap.parse_args()
    if a.quick:
        a.preset, a.samples, a.max_new, a.slots, a.reps = "tiny", 20, 32, 6, 1
    cfg = config.PRESETS[a.preset](dtype="float32")
    params = init_params(cfg, jax.random.PRNGKey(a.seed))
    prompts, stop = long_tailed_mix(cfg, params, a.samples, a.max_new, a.seed)
    sp = SamplingParams(a.max_new, greedy=True, stop_tokens=(stop,))
    key = jax.random.PRNGKey(0)
    slotted = dataclasses.replace(sp, slots=a.slots)
    stats = engine.Stats()  # the warm-up call's counts (every call does the same work)
    runs = {
        "fixed": lambda: jax.block_until_ready(sample_fixed(cfg, params, prompts, sp, key)),
        "engine": lambda stats=None: sample(cfg, params, prompts, slotted, key, stats=stats),
    }
    out = {"fixed": runs["fixed"](), "engine": runs["engine"](stats)}  # warm-up: compiles
    times = {name: [] for name in runs}
    for _ in range(a.reps):
        for name, fn in runs.items():
            times[name].append(timed(fn)[0])
    lengths = np.asarray(out["engine"].lengths)
    tokens = int(lengths.sum())
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "model": f"config.{a.preset}(dtype=float32), random init",
        "backend": jax.default_backend(),
        "samples": a.samples,
        "max_new_tokens": a.max_new,
        "slots": a.slots,
        "stop_token": stop,
        "response_lengths": {
            "mean": float(lengths.mean()),
            "median": float(np.median(lengths)),
            "at_limit_fraction": float(np.mean(lengths == a.max_new)),
        },
        "tokens_identical": bool(np.array_equal(np.asarray(out["fixed"].tokens), np.asarray(out["engine"].tokens))),
        "generated_tokens": tokens,
        "decode_row_steps": {"fixed": a.samples * int(lengths.max()), "engine": a.slots * int(stats.steps)},
        "engine_calls": {k: int(v) for k, v in vars(stats).items()},
        "times_s": times,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "ratio": med["fixed"] / med["engine"],
    }
    print(f"engine {report['tokens_per_s']['engine']:.0f} tok/s, fixed {report['tokens_per_s']['fixed']:.0f} tok/s")
    write_report(report, a.out)


if __name__ == "__main__":
    main()
