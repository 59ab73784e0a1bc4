"""Peak host memory of a pretraining run on prepared corpora of >= 1 GB against one of ~1 MB.

Usage: python -m experiments.benchmarks.loader_memory [--gb 1.05] [--steps 30] [--reps 3]
       [--workdir DIR] [--out loader_memory.json]

Corpora: synthetic text (`loader.synthetic_texts`: log-normal document lengths) prepared with
`m1jax.data.prepare` (byte tokenizer, int32 shards): `small` (~1 MiB of tokens, ~520-token
documents), `large` (>= --gb GiB, ~520-token documents) and `large_short` (>= --gb GiB of ~40-token
documents: 7x as many documents, the case where per-document memory would show). The same run of
the README's embedded default model (`python -m experiments.pretrain`: `--steps` steps, held-out
loss every 10 steps, a checkpoint at the end) reads each one (`--config.data.source=DIR`) under
`/usr/bin/time -v`, whose "Maximum resident set size" is the peak; the runs alternate over the
corpora `--reps` times (a run's peak varies by tens of MB from one run to the next) and the
medians are compared. The goal: each large corpus's median peak is no more than 100 MB above the
small one's. What may grow with the corpus is 4 bytes a document (its offset, `PreparedCorpus`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from experiments.benchmarks.forward import write_report
from experiments.benchmarks.loader import _write_jsonl, synthetic_texts
from m1jax.data import prepared
from m1jax.data.prepare import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# mean_bytes -> tokens a document (byte tokenizer, <bos>/<eos> included), measured
DOC_TOKENS = {600.0: 520, 45.0: 40}


def corpus(workdir: str, name: str, target_bytes: float, mean_bytes: float) -> dict:
    """Prepare (or reuse) a synthetic corpus of at least `target_bytes` bytes of int32 tokens
    (`small`: about that many)."""
    directory = os.path.join(workdir, name)
    docs = max(int(target_bytes / 4 / DOC_TOKENS[mean_bytes] * 1.06), 100)
    if not os.path.isfile(os.path.join(directory, prepared.MANIFEST)):
        _write_jsonl(os.path.join(workdir, f"{name}.jsonl"), synthetic_texts(docs, len(name), mean_bytes))
    t0 = time.perf_counter()
    manifest = prepare(os.path.join(workdir, f"{name}.jsonl"), directory, shard_rows=20_000, num_proc=2, progress=False)
    token_bytes = sum(r["bytes"]["tokens"] for r in manifest["shards"])
    return {"dir": directory, "docs": manifest["docs"], "tokens": manifest["tokens"], "token_bytes": token_bytes,
            "prepare_s": time.perf_counter() - t0}  # fmt: skip


def peak_rss(workdir: str, source: str, steps: int) -> dict:
    """Run the embedded default on `source` under /usr/bin/time -v: peak RSS (MiB), wall s, last loss."""
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resumed one
    cmd = [
        "/usr/bin/time", "-v", sys.executable, "-m", "experiments.pretrain", f"--workdir={workdir}", "--noprogress",
        f"--config.data.source={source}", f"--config.steps={steps}", "--config.eval.every=10",
        f"--config.checkpoint.every={steps}", "--config.eval.num_samples=0",
    ]  # fmt: skip
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    loss = re.search(r"trained to step \d+: loss ([0-9.]+)", out.stdout + out.stderr)
    return {"peak_rss_mib": kb / 1024, "wall_s": wall, "last_loss": float(loss.group(1)) if loss else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.05, help="size of the large corpora's token shards (GiB)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default="runs/loader_memory", help="corpora and run workdirs (reused)")
    ap.add_argument("--out", default="loader_memory.json")
    args = ap.parse_args()
    args.workdir = os.path.abspath(args.workdir)
    os.makedirs(args.workdir, exist_ok=True)
    corpora = {
        "small": corpus(args.workdir, "small", 1 << 20, 600.0),
        "large": corpus(args.workdir, "large", args.gb * (1 << 30), 600.0),
        "large_short": corpus(args.workdir, "large_short", args.gb * (1 << 30), 45.0),
    }
    for name in ("large", "large_short"):
        if corpora[name]["token_bytes"] < args.gb * (1 << 30):
            raise SystemExit(f"{corpora[name]['dir']}: under {args.gb} GiB of tokens; remove it and rerun")
    peaks = {name: [] for name in corpora}
    for rep in range(args.reps):
        for name, c in corpora.items():
            r = peak_rss(os.path.join(args.workdir, f"run_{name}"), c["dir"], args.steps)
            peaks[name].append(r["peak_rss_mib"])
            print(f"rep {rep}: {name:11s} {c['token_bytes'] / 2**20:9,.1f} MiB of tokens, {c['docs']:>9,} documents: "
                  f"peak RSS {r['peak_rss_mib']:,.1f} MiB ({r['wall_s']:.0f} s, loss {r['last_loss']})")  # fmt: skip
    median = {name: statistics.median(v) for name, v in peaks.items()}
    diffs = {name: median[name] - median["small"] for name in ("large", "large_short")}
    for name, d in diffs.items():
        print(f"{name}: median peak RSS {d:+.1f} MiB against small (goal <= 100 MB)")
    report = {"steps": args.steps, "reps": args.reps, "corpora": corpora, "peak_rss_mib": peaks}
    report.update(median_peak_rss_mib=median, median_diff_mib=diffs, goal_mb=100)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
