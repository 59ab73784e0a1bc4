"""CPU forward throughput of m1jax vs transformers, and compile time vs depth.

Usage: python -m experiments.benchmarks.forward [--quick] [--out forward_benchmark.json]

Section "forward": the ~100M-parameter 7:1 hybrid `config.small(rotary_dim=64)` in fp32 with no remat, batch 1,
T=2048 (--quick: T=512). One set of random weights (rescaled to std 0.5/sqrt(fan_in) so activations are O(1)) is
run by m1jax (a jitted `M1Model.apply`) and by transformers' MiniMaxForCausalLM loaded from the same weights via
`m1jax.hf.save_pretrained` (rotary_dim == head_dim because transformers rotates the whole head). Before timing,
the logits of both on the benchmark input are compared: `max_rel_err` = max|jax - torch| / max|torch| (the script
fails if it exceeds 1e-3). After one warm-up each, m1jax and transformers calls alternate `reps` times (5,
--quick: 1) so machine drift hits both alike; times are medians and `ratio` is the median over the pairs of
transformers time / m1jax time (> 1: m1jax is faster). `m1jax_compile_s` is the first (trace +
compile + run) call minus a steady-state call. `params_total` counts every weight, `params_active`
the per-token count without embedding and LM head (M1's convention; `m1jax.summary.param_counts`).

Section "compile": lower + compile wall time of `jax.jit(forward)` for `config.tiny` at 8 and 80 layers (7:1
pattern, tokens [1, 64], abstract parameters, nothing executed), and the same for `jax.grad` of a mean-logit
loss. Layers are scanned, so the 80-layer times should stay within ~2x of the 8-layer ones (`ratio`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import m1jax
import m1jax.hf
from m1jax import M1Model, config, host
from m1jax.summary import param_counts

MAX_REL_ERR = 1e-3


def _name(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def rescale(cfg, params):
    """Scale every weight matrix to std 0.5/sqrt(fan_in) (embedding: std 1); norm scales stay at 1."""
    hd = cfg.num_attention_heads * cfg.head_dim
    fan_in = {"out": hd, "o": hd, "w2": cfg.intermediate_size}

    def f(path, x):
        name = _name(path)[-1]
        if name == "scale":
            return x
        std = 1.0 if name == "embed" else 0.5 / np.sqrt(fan_in.get(name, cfg.hidden_size))
        return x * (std / jnp.std(x))

    return jax.tree_util.tree_map_with_path(f, params)


def write_report(report: dict, path: str) -> None:
    """Print the JSON report and write it to `path`."""
    text = json.dumps(report, indent=2)
    print(text)
    with open(path, "w") as fh:
        fh.write(text + "\n")


def timed(fn) -> tuple[float, object]:
    """(wall seconds, output) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def torch_twin(cfg, params):
    """transformers' MiniMaxForCausalLM with the same weights (fp32; SDPA attention where it has it)."""
    import torch
    import transformers
    from transformers import MiniMaxForCausalLM

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        m1jax.hf.save_pretrained(cfg, params, tmp)
        try:
            return MiniMaxForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
        except (ValueError, ImportError):
            return MiniMaxForCausalLM.from_pretrained(tmp, dtype=torch.float32)


def bench_forward(seq_len: int, reps: int) -> dict:
    import torch

    cfg = config.small(rotary_dim=64, dtype="float32", remat="none")
    params = rescale(cfg, m1jax.init_params(cfg, jax.random.PRNGKey(0)))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, seq_len), dtype=np.int32)
    model = torch_twin(cfg, params)
    model.eval()

    fwd = jax.jit(lambda p, t: M1Model(cfg).apply({"params": p}, t)[0])
    jt = jnp.asarray(tokens)
    tt = torch.from_numpy(tokens.astype(np.int64))
    jax_call = lambda: fwd(params, jt).block_until_ready()

    def torch_call():
        with torch.inference_mode():
            return model(input_ids=tt, use_cache=False).logits

    j_first, j_out = timed(jax_call)
    t_first, t_out = timed(torch_call)
    # Interleave the two so that machine drift hits both alike; the ratio is the median of pairs.
    j_times, t_times = [], []
    for _ in range(reps):
        j_times.append(timed(jax_call)[0])
        t_times.append(timed(torch_call)[0])
    j_med, t_med = statistics.median(j_times), statistics.median(t_times)
    pair_ratio = statistics.median(t / j for j, t in zip(j_times, t_times, strict=True))

    a, b = np.asarray(j_out, np.float64), t_out.numpy().astype(np.float64)
    abs_err = float(np.max(np.abs(a - b)))
    rel_err = abs_err / float(np.max(np.abs(b)))
    if not rel_err <= MAX_REL_ERR:
        raise SystemExit(f"m1jax and transformers logits disagree: max_rel_err={rel_err:.3e} > {MAX_REL_ERR}")
    return {
        "config": "config.small(rotary_dim=64, dtype='float32', remat='none')",
        **{f"params_{k}": v for k, v in param_counts(cfg).items() if k in ("total", "active")},
        "batch": 1,
        "seq_len": seq_len,
        "reps": reps,
        "transformers_attn_implementation": model.config._attn_implementation,
        "max_rel_err": rel_err,
        "max_abs_err": abs_err,
        "logits_abs_max": float(np.max(np.abs(b))),
        "m1jax_s": j_med,
        "transformers_s": t_med,
        "m1jax_tokens_per_s": seq_len / j_med,
        "transformers_tokens_per_s": seq_len / t_med,
        "ratio": pair_ratio,
        "m1jax_times_s": j_times,
        "transformers_times_s": t_times,
        "m1jax_first_call_s": j_first,
        "m1jax_compile_s": j_first - j_med,
        "transformers_first_call_s": t_first,
    }


def compile_seconds(num_layers: int, grad: bool, seq_len: int = 64) -> float:
    """Wall time of trace + lower + compile of the forward (or its gradient) on abstract inputs."""
    cfg = config.tiny(num_hidden_layers=num_layers, attn_type_list=config.m1_layer_types(num_layers, 8))
    params = nn.unbox(m1jax.abstract_params(cfg))
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)

    def fwd(p, t):  # a fresh function each call, so no jit cache is shared between measurements
        return M1Model(cfg).apply({"params": p}, t)[0]

    fn = jax.grad(lambda p, t: jnp.mean(fwd(p, t))) if grad else fwd
    t0 = time.perf_counter()
    jax.jit(fn).lower(params, tokens).compile()
    return time.perf_counter() - t0


def bench_compile(reps: int) -> dict:
    compile_seconds(8, grad=False, seq_len=32)  # warm-up: one-off tracing/backend costs
    out = {}
    for grad, prefix in ((False, ""), (True, "grad_")):
        for n in (8, 80):
            out[f"{prefix}layers_{n}_s"] = statistics.median(compile_seconds(n, grad) for _ in range(reps))
        out[f"{prefix}ratio"] = out[f"{prefix}layers_80_s"] / out[f"{prefix}layers_8_s"]
    return {"config": "config.tiny(num_hidden_layers=L, attn_type_list=m1_layer_types(L, 8))", "tokens": [1, 64]} | out


def env() -> dict:
    import torch
    import transformers

    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # m1jax.host: huge-page malloc
        "xla_compiler_options": host.compiler_options(jax.devices()) or {},  # what Trainer / RLTrainer jit with here
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="T=512, 1 timed repetition (a smoke test)")
    ap.add_argument("--out", default="forward_benchmark.json", help="where to write the JSON report")
    args = ap.parse_args()
    seq_len, reps = (512, 1) if args.quick else (2048, 5)
    report = {"quick": args.quick, "forward": bench_forward(seq_len, reps), "compile": bench_compile(reps)}
    report["env"] = env()
    write_report(report, args.out)


if __name__ == "__main__":
    host.reexec_with_hugepages()  # first: glibc reads its tunables at start-up
    main()
