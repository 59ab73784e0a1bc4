"""RL step time with asynchronous rollouts (`rl.max_staleness`) against the synchronous loop, side by side.

Usage: python -m experiments.benchmarks.async_rl [--quick] [--config toy|tiny] [--init-from runs/pretrain]
       [--steps 24] [--reps 2] [--max-new N] [--out async_rl.json]

`--config toy` runs `configs/cispo_toy.py` (32 prompts x 8 samples, 4 tokens, 2 updates, from scratch);
`--config tiny` runs `configs/cispo_tiny.py` (16 x 8, 64 tokens, 4 updates) from the pretraining workdir
`--init-from`. Old log-probs come from the sampler so that K > 0 is valid. Variants, on 8 host CPU
devices: K = 0 (synchronous), K = 1 with the rollouts time-slicing the learner's device, and K = 1
and K = 2 with the rollouts on their own device (`rl.rollout_mesh.data=1`, the next host device).
The variants alternate over `--reps` rounds so machine drift hits all alike. Per variant: the median
learner step time (`step_time_s`, the first steps left out: they compile), each side's busy and
waiting time per step (rollouts: generation + reward, waiting for a version; learner: log-probs +
updates, waiting for a batch), and the projection for separate accelerators, median over steps of
max(rollout busy, learner busy) against their sum. On a CPU all "devices" share the same cores, so
the measured gain of K > 0 here is only the overlap of host work with device work.
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
    "async_k2_own_device": {"rl.max_staleness": 2, "rl.rollout_mesh.data": 1},
}


def config(name: str, steps: int, overrides: dict, max_new: int | None = None, init_from: str = ""):
    if name == "tiny":
        from configs.cispo_tiny import get_config

        c = get_config()
        c.rl.init_from = init_from
    else:
        from configs.cispo_toy import get_config

        c = get_config()
    c.steps = steps
    c.rl.old_logp = "sampler"
    if max_new:
        c.rl.sampling.max_new_tokens = max_new
    c.eval.update(every=10**6, prompts=8, samples=0)
    c.checkpoint.every = 10**6
    c.update_from_flattened_dict(overrides)
    return c


def run_once(c, skip: int) -> dict:
    import json

    from rl.loop import train

    with tempfile.TemporaryDirectory() as wd:
        t0 = time.perf_counter()
        train(c, wd, progress=False)
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
        "rollout_busy_s": statistics.median(produce),
        "rollout_wait_s": med("worker_wait_s"),  # the rollout thread waiting for a version
        "learner_busy_s": statistics.median(learn),
        "learner_wait_s": med("rollout_wait_s"),  # the learner waiting for a batch
        "staleness_max": max(r["staleness_max"] for r in rows),
        "reward_mean": statistics.mean(r["reward"] for r in rows),
        "serial_s": statistics.median(p + q for p, q in zip(produce, learn, strict=True)),
        "overlapped_s": statistics.median(max(p, q) for p, q in zip(produce, learn, strict=True)),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps, one round (a smoke test)")
    ap.add_argument("--config", choices=("toy", "tiny"), default="toy")
    ap.add_argument("--init-from", default="runs/pretrain", help="pretraining workdir (--config tiny)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=0, help="response budget (0: the config's)")
    ap.add_argument("--out", default="async_rl_benchmark.json")
    a = ap.parse_args(argv)
    steps, reps, skip = (4, 1, 1) if a.quick else (a.steps, a.reps, 4)
    runs = {name: [] for name in VARIANTS}
    for _ in range(reps):
        for name, ov in VARIANTS.items():
            runs[name].append(run_once(config(a.config, steps, ov, a.max_new, a.init_from), skip))
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    sync = summary["sync_k0"]["step_time_s"]
    for s in summary.values():
        s["speedup_vs_sync"] = sync / s["step_time_s"]
        s["projected_speedup_separate_devices"] = s["serial_s"] / s["overlapped_s"]
    report = {
        "config": f"configs/cispo_{a.config}.py, old_logp=sampler, max_new_tokens={a.max_new or 'as configured'}",
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
