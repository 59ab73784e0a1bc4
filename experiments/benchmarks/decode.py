"""Greedy decode tokens/s of m1jax against transformers' `generate` on the same weights, side by side.

Usage: python -m experiments.benchmarks.decode [--quick] [--batch 8] [--prompt 128] [--new 256]
       [--reps 2] [--moe-impl auto|dense|tiled|ragged] [--out decode_benchmark.json]

Model: `config.small(rotary_dim=64)` (118M parameters, 29M active, 32K vocabulary) in fp32 with random
weights; transformers' MiniMaxForCausalLM loads the same weights (`m1jax.hf.save_pretrained`;
rotary_dim == head_dim because transformers rotates the whole head). Both decode greedily, with no
stop token, `--batch` prompts of `--prompt` random tokens for `--new` tokens: m1jax through the RL
rollout engine (`rl.sampler.sample`, one slot per row) and through `m1jax.generate.generate`;
transformers through `model.generate(do_sample=False)` under `torch.inference_mode()`. After a
warm-up call each, they alternate `--reps` rounds. `token_agreement` is the fraction of positions
where m1jax's and transformers' tokens agree (fp32 on both sides; a near-tie can diverge a row).

Memory roofline: a decode step must read the parameters it touches (every expert of a layer once
batch x top-k assignments cover them; the count is the expected number of distinct experts under
uniform routing) and the decode cache (lightning states read and written, softmax K/V read over the
positions the step attends to). `roofline_fraction` = those bytes / step time / the machine's read
bandwidth, measured here as the rate of summing a 1 GiB fp32 array. XLA:CPU's matmuls with a few
rows do not stream weights at that rate: `matmul_bandwidth_GBps` is the rate at which a
[batch, hidden] x [hidden, N] fp32 matmul reads a 256 MiB weight (a decode step's matmuls have
that shape), and `matmul_roofline_fraction` is the step time against the same bytes at that rate.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.forward import env, timed, torch_twin, write_report
from experiments.benchmarks.lightning import timed as median_seconds
from m1jax import config, host
from m1jax.config import layer_plan
from m1jax.generate import generate
from m1jax.model import init_params
from rl.sampler import SamplingParams, sample


def read_bandwidth() -> float:
    """Bytes/s of reading a 1 GiB fp32 array once (median of 5 sums)."""
    x = jnp.ones((1 << 28,), jnp.float32)
    f = jax.jit(jnp.sum)
    return x.nbytes / median_seconds(lambda: f(x).block_until_ready(), 5)


def matmul_bandwidth(rows: int, hidden: int) -> float:
    """Bytes/s at which a [rows, hidden] x [hidden, N] fp32 matmul reads its 256 MiB weight (median of 5)."""
    w = jnp.ones((hidden, (1 << 26) // hidden), jnp.float32)
    x = jnp.ones((rows, hidden), jnp.float32)
    f = jax.jit(jnp.matmul, compiler_options=host.cpu_compiler_options())
    return w.nbytes / median_seconds(lambda: f(x, w).block_until_ready(), 5)


def step_bytes(cfg, params, batch: int, context: int) -> dict:
    """Bytes a decode step must move at `context` tokens of history (see the module docstring)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)
    expert = sum(v.nbytes for p, v in flat if any(w in name(p) for w in ("/w1", "/w2", "/w3")))
    embed = sum(v.nbytes for p, v in flat if name(p).endswith("embed"))
    other = sum(v.nbytes for _, v in flat) - expert - embed
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    touched = e * (1 - (1 - 1 / e) ** (batch * k))  # expected distinct experts per layer
    head = embed if cfg.tie_word_embeddings else 0  # an untied head is in `other`; embedding rows are few
    pattern, groups, tail = layer_plan(cfg)
    kinds = list(pattern) * groups + list(tail)
    n_soft = sum(1 for t in kinds if t == 1)
    n_light = len(kinds) - n_soft
    state = n_light * batch * cfg.num_attention_heads * cfg.head_dim * cfg.head_dim * 4 * 2  # read + write
    kv = n_soft * batch * context * cfg.num_key_value_heads * cfg.head_dim * 2 * 4
    params_b = other + head + expert * touched / e
    return {"params": params_b, "lightning_state": state, "softmax_kv": kv, "total": params_b + state + kv}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--moe-impl", default="auto")
    ap.add_argument("--quick", action="store_true", help="2 layers, batch 2, 16 + 8 tokens, 1 rep")
    ap.add_argument("--out", default="decode_benchmark.json")
    a = ap.parse_args()
    import torch

    over = dict(rotary_dim=64, dtype="float32", moe_impl=a.moe_impl)
    if a.quick:
        a.batch, a.prompt, a.new, a.reps = 2, 16, 8, 1
        over.update(num_hidden_layers=2, attn_type_list=(0, 1), vocab_size=512)
    cfg = config.small(**over)
    params = init_params(cfg, jax.random.PRNGKey(0))
    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, size=(a.batch, a.prompt))
    model = torch_twin(cfg, params)
    tt = torch.from_numpy(prompts.astype(np.int64))
    sp = SamplingParams(a.new, greedy=True)
    key = jax.random.PRNGKey(0)

    def hf():
        with torch.inference_mode():
            out = model.generate(
                tt,
                attention_mask=torch.ones_like(tt),
                max_new_tokens=a.new,
                min_new_tokens=a.new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        return out[:, a.prompt :].numpy()

    runs = {
        "engine": lambda: sample(cfg, params, prompts.tolist(), sp, key).tokens,
        "generate": lambda: np.asarray(generate(cfg, params, prompts.tolist(), a.new, greedy=True).tokens),
        "transformers": hf,
    }
    out = {k: timed(fn)[1] for k, fn in runs.items()}  # warm-up (compiles)
    times = {k: [] for k in runs}
    for _ in range(a.reps):
        for k, fn in runs.items():
            times[k].append(timed(fn)[0])
    tokens = a.batch * a.new
    med = {k: statistics.median(v) for k, v in times.items()}
    bw = read_bandwidth()
    mm_bw = matmul_bandwidth(a.batch, cfg.hidden_size)
    bytes_ = step_bytes(cfg, params, a.batch, a.prompt + a.new // 2)  # at the mean context
    step_s = {k: v / a.new for k, v in med.items()}
    report = {
        "model": f"config.small({', '.join(f'{k}={v!r}' for k, v in over.items())}), random init",
        "batch": a.batch,
        "prompt": a.prompt,
        "new_tokens": a.new,
        "env": env(),
        "times_s": times,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "step_ms": {k: 1e3 * v for k, v in step_s.items()},
        "ratio_vs_transformers": {k: med["transformers"] / med[k] for k in ("engine", "generate")},
        "token_agreement": {k: float(np.mean(out[k] == out["transformers"])) for k in ("engine", "generate")},
        "engine_equals_generate": bool(np.array_equal(out["engine"], out["generate"])),
        "read_bandwidth_GBps": bw / 1e9,
        "step_bytes": bytes_,
        "roofline_step_ms": 1e3 * bytes_["total"] / bw,
        "roofline_fraction": {k: bytes_["total"] / bw / v for k, v in step_s.items()},
        "matmul_bandwidth_GBps": mm_bw / 1e9,
        "matmul_roofline_step_ms": 1e3 * bytes_["total"] / mm_bw,
        "matmul_roofline_fraction": {k: bytes_["total"] / mm_bw / v for k, v in step_s.items()},
    }
    print(
        "tokens/s: "
        + ", ".join(f"{k} {v:.0f}" for k, v in report["tokens_per_s"].items())
        + f"; roofline step {report['roofline_step_ms']:.1f} ms (read), "
        + f"{report['matmul_roofline_step_ms']:.1f} ms (matmul rate {report['matmul_bandwidth_GBps']:.0f} GB/s)"
    )
    write_report(report, a.out)


if __name__ == "__main__":
    main()
