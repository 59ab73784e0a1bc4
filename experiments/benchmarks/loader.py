"""Loader throughput: tokens/s of reading + packing alone, against what the train step consumes.

Usage: python -m experiments.benchmarks.loader [--config configs/pretrain_small.py] [--docs N] [--batches N]
       [--peak-tflops 989] [--mfu 0.5] [--workdir DIR] [--out loader_benchmark.json]

Corpora, each prepared with `m1jax.data.prepare` (the same shards, memory maps and checks as
training) into --workdir:
  - `tasks`: the config's embedded task corpus (`--docs` documents, ~52 tokens each: the short
    documents that cost a packer most per token);
  - `long`: synthetic text with log-normal document lengths, ~520 tokens a document (web-like);
  - `mixture`: both at 0.5 / 0.5 (`data.mixture`).
For each, batches of the config's shape (batch_size x seq_len, one process) are timed two ways:
`packer` (`Packer.next_batch` on the calling thread) and `grain` (the training path: the Grain
iterator with its prefetch thread, drained as fast as it yields).

Consumption: one accelerator running the config's model at `--mfu` of `--peak-tflops` (defaults:
an H100's 989 bf16 dense TFLOP/s at 50% MFU, a generous step rate, so the margin is conservative)
consumes peak * mfu / (train FLOPs per token, `m1jax.train.flops`) tokens/s. `ratio` = loader
tokens/s over that; the goal is >= 20.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from experiments.benchmarks.forward import write_report
from m1jax.data import loader, prepared
from m1jax.data import tasks as task_lib
from m1jax.data.pipeline import Packer, mixed_packer
from m1jax.data.prepare import prepare
from m1jax.train import flops as flops_lib
from m1jax.train.config import model_config


def _write_jsonl(path: str, texts) -> None:
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def synthetic_texts(n: int, seed: int = 0, mean_bytes: float = 600.0):
    """`n` texts of words, log-normal lengths (sigma 1) with mean ~`mean_bytes` bytes."""
    rng = np.random.default_rng(seed)
    words = np.asarray(["the", "model", "attention", "of", "state", "decay", "lightning", "expert", "a", "token"])
    for length in np.maximum(8, rng.lognormal(np.log(mean_bytes) - 0.5, 1.0, n)).astype(int):
        yield " ".join(words[rng.integers(0, len(words), max(length // 6, 1))])


def build_corpora(workdir: str, docs: int, tasks: tuple[str, ...]) -> dict[str, str]:
    """{name: prepared directory}; a directory already prepared is reused (prepare is a no-op)."""
    out = {}
    for name, texts in (
        ("tasks", (ex.text for _, ex in zip(range(docs), task_lib.examples(0, "train", tasks), strict=False))),
        ("long", synthetic_texts(max(docs // 10, 1000))),
    ):
        src, directory = os.path.join(workdir, f"{name}.jsonl"), os.path.join(workdir, name)
        if not os.path.isfile(os.path.join(directory, prepared.MANIFEST)):
            _write_jsonl(src, texts)
        prepare(src, directory, text_field="text", progress=False)
        out[name] = directory
    return out


def tokens_per_s(make_batches, batches: int, rows: int, seq_len: int) -> float:
    """Median over 3 repetitions of tokens/s over `batches` batches (after one warm-up batch)."""
    rates = []
    for _ in range(3):
        next_batch, close = make_batches()
        next_batch()
        t0 = time.perf_counter()
        for _ in range(batches):
            next_batch()
        rates.append(batches * rows * seq_len / (time.perf_counter() - t0))
        close()
    return float(np.median(rates))


def run(args) -> dict:
    c = _load_py(args.config)
    cfg = model_config(c.model)
    rows, seq_len = c.batch_size, c.seq_len
    fpt = flops_lib.train_flops_per_token(cfg, seq_len)
    consumed = args.peak_tflops * 1e12 * args.mfu / fpt
    dirs = build_corpora(args.workdir, args.docs, tuple(c.data.tasks))
    corpora = {name: prepared.open_prepared(d) for name, d in dirs.items()}
    makers = {
        "tasks": lambda: Packer(corpora["tasks"], seq_len, rows, seed=0),
        "long": lambda: Packer(corpora["long"], seq_len, rows, seed=0),
        "mixture": lambda: mixed_packer([corpora["tasks"], corpora["long"]], [0.5, 0.5], seq_len, rows, seed=0),
    }
    results = {}
    for name, make in makers.items():
        sizes = [len(corpora[n]) for n in (("tasks", "long") if name == "mixture" else (name,))]
        tokens = [int(corpora[n].manifest["tokens"]) for n in (("tasks", "long") if name == "mixture" else (name,))]

        def packer_only(make=make):
            p = make()
            return p.next_batch, lambda: None

        def grain_iter(make=make):
            it = loader.make_iterator(make(), prefetch=2)
            return (lambda: next(it)), it.close

        r = {
            "docs": sum(sizes),
            "mean_doc_tokens": sum(tokens) / sum(sizes),
            "packer_tokens_per_s": tokens_per_s(packer_only, args.batches, rows, seq_len),
            "grain_tokens_per_s": tokens_per_s(grain_iter, args.batches, rows, seq_len),
        }
        r["ratio"] = min(r["packer_tokens_per_s"], r["grain_tokens_per_s"]) / consumed
        results[name] = r
        print(
            f"{name:8s} {r['mean_doc_tokens']:6.1f} tok/doc  packer {r['packer_tokens_per_s'] / 1e6:7.2f} M tok/s  "
            f"grain {r['grain_tokens_per_s'] / 1e6:7.2f} M tok/s  = {r['ratio']:.0f}x the step's consumption"
        )
    return {
        "config": args.config,
        "batch_rows": rows,
        "seq_len": seq_len,
        "train_flops_per_token": fpt,
        "consumption_estimate": {
            "peak_tflops": args.peak_tflops,
            "mfu": args.mfu,
            "tokens_per_s": consumed,
            "how": "one accelerator at mfu x peak_tflops / train_flops_per_token (m1jax.train.flops)",
        },
        "corpora": results,
        "goal_ratio": 20.0,
        "min_ratio": min(r["ratio"] for r in results.values()),
        # the MFU up to which the slowest corpus still loads >= 20x what the step consumes
        "mfu_at_which_min_ratio_is_20": args.mfu * min(r["ratio"] for r in results.values()) / 20.0,
        "env": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }


def _load_py(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("loader_bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/pretrain_small.py")
    ap.add_argument("--docs", type=int, default=200_000, help="task-corpus documents (long: a tenth)")
    ap.add_argument("--batches", type=int, default=20, help="timed batches per repetition")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="one accelerator's peak (H100 bf16 dense)")
    ap.add_argument("--mfu", type=float, default=0.5, help="assumed model FLOPs utilisation of the train step")
    ap.add_argument("--workdir", default=None, help="where the prepared corpora go (default: a temp dir)")
    ap.add_argument("--out", default="loader_benchmark.json")
    args = ap.parse_args()
    if args.workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            args.workdir = tmp
            write_report(run(args), args.out)
    else:
        os.makedirs(args.workdir, exist_ok=True)
        write_report(run(args), args.out)


if __name__ == "__main__":
    main()
