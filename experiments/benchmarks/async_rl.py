"""RL step time with asynchronous rollouts (`rl.max_staleness`) against the synchronous loop, side by side.

Usage: python -m experiments.benchmarks.async_rl [--quick] [--steps 24] [--reps 2] [--max-new 4]
       [--out async_rl.json]

Runs `configs/cispo_toy.py` (32 prompts x 8 samples, 2 updates per rollout, old log-probs from the
sampler so that K > 0 is valid) three ways on 8 host CPU devices: K = 0 (synchronous), K = 1 with
the rollouts time-slicing the learner's device, and K = 1 with the rollouts on their own devices
(`rl.rollout_mesh.data=1`, the next host device). The variants alternate over `--reps` rounds so
machine drift hits all alike. Per variant: the median learner step time (`step_time_s`, the first
steps left out: they compile), the phase times, and the projection for separate accelerators,
median over steps of max(generation + reward, log-probs + update) against their sum; on a CPU
all "devices" share the same cores, so the measured gain of K = 1 here is the overlap of host work
(sampling loop, rewards, Python) with device work, not of two device sets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from experiments.benchmarks.forward import write_report  # noqa: E402 (after XLA_FLAGS)

VARIANTS = {
    "sync_k0": {},
    "async_k1_shared": {"rl.max_staleness": 1},
    "async_k1_own_device": {"rl.max_staleness": 1, "rl.rollout_mesh.data": 1},
}


def config(steps: int, overrides: dict, max_new: int = 4):
    from configs.cispo_toy import get_config

    c = get_config()
    c.steps = steps
    c.rl.old_logp = "sampler"
    c.rl.sampling.max_new_tokens = max_new
    c.eval.update(every=10**6, prompts=8, samples=0)
    c.checkpoint.every = 10**6
    c.update_from_flattened_dict(overrides)
    return c


def run_once(steps: int, overrides: dict, skip: int, max_new: int = 4) -> dict:
    import json

    from rl.loop import train

    with tempfile.TemporaryDirectory() as wd:
        t0 = time.perf_counter()
        train(config(steps, overrides, max_new), wd, progress=False)
        wall = time.perf_counter() - t0
        with open(os.path.join(wd, "metrics.jsonl")) as fh:
            rows = [r for r in map(json.loads, fh) if "loss" in r][skip:]
    med = lambda k: statistics.median(r.get(k, 0.0) for r in rows)
    produce = [r["gen_time_s"] + r["reward_time_s"] for r in rows]
    learn = [r["logprob_time_s"] + r["update_time_s"] for r in rows]
    return {
        "wall_s": wall,
        "step_time_s": med("step_time_s"),
        "gen_time_s": med("gen_time_s"),
        "reward_time_s": med("reward_time_s"),
        "logprob_time_s": med("logprob_time_s"),
        "update_time_s": med("update_time_s"),
        "rollout_wait_s": med("rollout_wait_s"),
        "staleness_max": max(r["staleness_max"] for r in rows),
        "reward_last": rows[-1]["reward"],
        "serial_s": statistics.median(p + q for p, q in zip(produce, learn, strict=True)),
        "overlapped_s": statistics.median(max(p, q) for p, q in zip(produce, learn, strict=True)),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps, one round (a smoke test)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=4, help="response budget (the toy's 4: generation is cheap)")
    ap.add_argument("--out", default="async_rl_benchmark.json")
    a = ap.parse_args(argv)
    steps, reps, skip = (4, 1, 1) if a.quick else (a.steps, a.reps, 4)
    runs = {name: [] for name in VARIANTS}
    for _ in range(reps):
        for name, ov in VARIANTS.items():
            runs[name].append(run_once(steps, ov, skip, a.max_new))
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    sync = summary["sync_k0"]["step_time_s"]
    for s in summary.values():
        s["speedup_vs_sync"] = sync / s["step_time_s"]
        s["projected_speedup_separate_devices"] = s["serial_s"] / s["overlapped_s"]
    report = {
        "config": f"configs/cispo_toy.py, old_logp=sampler, 32 prompts x 8 samples, {a.max_new} new tokens, 2 updates",
        "steps": steps,
        "reps": reps,
        "skipped_first_steps": skip,
        "variants": summary,
        "runs": runs,
    }
    write_report(report, a.out)
    return report


if __name__ == "__main__":
    main()
