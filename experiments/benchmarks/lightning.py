"""Lightning attention speed vs sequence length, beside softmax attention and the roofline.

Usage: python -m experiments.benchmarks.lightning [--quick] [--lengths 1024,2048,...] [--heads 8]
       [--head-dim 128] [--batch 1] [--m1-shape] [--dtype bfloat16] [--impls auto] [--compare-fla]
       [--softmax-max-len N] [--reps 5] [--out lightning_benchmark.json]

For every length and implementation (the kernels of this platform and the jnp reference; `softmax`
is `jax.nn.dot_product_attention(is_causal=True)` on the same q, k, v) it times the forward and the
forward+backward (grad of a weighted sum w.r.t. q, k, v) of the jitted op, median of `reps` calls
after a warm-up. FLOPs follow SPEC 3: lightning forward B*H*N*(2C(Dk+Dv) + 4*Dk*Dv), softmax causal
2*B*H*N^2*D, backward 2.5x the forward. Bytes: the forward moves q, k, v and o once; forward+backward
counts four such passes (the backward is three forward-shaped calls). The roofline time is
max(FLOPs / peak, bytes / bandwidth) with vendor peaks on TPU/GPU and, on CPU, the measured best fp32
GEMM rate and copy bandwidth; `roofline_frac` = roofline time / measured time.

Summary: `linear_ratio` = time(32K) / time(2K) of the lightning layer (linear would be 16; the CPU
goal is <= 20), and the crossover length where lightning becomes faster than softmax (log-log
interpolation between measured lengths). With --compare-fla (GPU, `pip install flash-linear-attention`)
fla's `chunk_simple_gla(q, k, v, g_gamma=-slopes, scale=1.0)` is timed in the same run and checked
against ours.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.forward import write_report
from experiments.benchmarks.train_step import measured_peak_flops
from m1jax.kernels import gpu_kernel, lightning_attention, registry, resolve_lightning_impl
from m1jax.layers import layer_slopes

# Vendor dense bf16 peaks (SPEC 3) and HBM bandwidths, by device kind prefix.
PEAKS = {  # kind prefix: (FLOP/s, bytes/s)
    "NVIDIA H100": (989e12, 3.35e12),
    "NVIDIA H200": (989e12, 4.8e12),
    "NVIDIA A100": (312e12, 2.0e12),
    "TPU v5p": (459e12, 2.76e12),
    "TPU v5 lite": (197e12, 0.82e12),
    "TPU v5e": (197e12, 0.82e12),
    "TPU v6": (918e12, 1.64e12),
    "TPU v4": (275e12, 1.2e12),
}
DEFAULT_LENGTHS = {"cpu": [256, 512, 1024, 2048, 4096, 8192, 16384, 32768], "accel": [1024 * 2**i for i in range(8)]}


def timed(fn, reps: int) -> float:
    fn()  # warm-up (compiles)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_peaks() -> tuple[float, float, str]:
    kind = jax.devices()[0].device_kind
    for prefix, (f, bw) in PEAKS.items():
        if kind.startswith(prefix):
            return f, bw, f"vendor peak for {kind}"
    flops = measured_peak_flops()
    big = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MiB
    cp = jax.jit(lambda x: x + 1.0)
    bw = 2 * big.nbytes / timed(lambda: cp(big).block_until_ready(), 5)
    return flops, bw, f"measured on {kind}: fp32 2048^3 GEMM, 256 MiB read+write"


def lightning_flops(b, h, n, dk, dv, c):
    return b * h * n * (2 * c * (dk + dv) + 4 * dk * dv)


def make_inputs(b, n, h, d, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v = (jax.random.normal(x, (b, n, h, d), jnp.float32).astype(dtype) * 0.3 for x in ks[:3])
    w = jax.random.normal(ks[3], (b, n, h, d), jnp.float32).astype(dtype)
    return q, k, v, w


def op(impl, slopes, block_size):
    if impl == "softmax":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return lambda q, k, v: lightning_attention(q, k, v, slopes, impl=impl, block_size=block_size)[0]


def bench_one(impl, q, k, v, w, slopes, block_size, reps, backward=True):
    f = op(impl, slopes, block_size)
    fwd = jax.jit(f)
    out = {"fwd_s": timed(lambda: fwd(q, k, v).block_until_ready(), reps)}
    if backward:
        loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * w)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        out["fwd_bwd_s"] = timed(lambda: jax.block_until_ready(grad(q, k, v)), reps)
    return out


def vs_reference(impl, q, k, v, slopes, block_size, want) -> float:
    """Forward output's relative RMS against `want`, the jnp reference's output on the same inputs
    (kernels that were never run on this hardware get checked here first)."""
    got = np.asarray(op(impl, slopes, block_size)(q, k, v), np.float32)
    return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2)))


def chunk_of(impl, n, block_size):
    """The chunk length `impl` runs at (its registry row: default block and cap)."""
    return registry.LIGHTNING[impl].chunk(block_size, n)


def annotate(row, peak_flops, bw, b, h, n, d, itemsize, block_size):
    if row["impl"] == "softmax":
        f_fwd = 2 * b * h * n * n * d
    else:
        f_fwd = lightning_flops(b, h, n, d, d, chunk_of(row["impl"], n, block_size))
    bytes_fwd = 4 * b * n * h * d * itemsize
    for key, flops, nbytes in (("fwd", f_fwd, bytes_fwd), ("fwd_bwd", 3.5 * f_fwd, 4 * bytes_fwd)):
        t = row.get(f"{key}_s")
        if t is None:
            continue
        roof = max(flops / peak_flops, nbytes / bw)
        row[f"{key}_tflops"] = flops / t / 1e12
        row[f"{key}_gbps"] = nbytes / t / 1e9
        row[f"{key}_roofline_s"] = roof
        row[f"{key}_roofline_frac"] = roof / t


def crossover(rows, lin_impl, key):
    """Smallest length where lightning beats softmax, log-log interpolated between measured lengths."""
    lin = {r["n"]: r[key] for r in rows if r["impl"] == lin_impl and key in r}
    soft = {r["n"]: r[key] for r in rows if r["impl"] == "softmax" and key in r}
    ns = sorted(set(lin) & set(soft))
    prev = None
    for n in ns:
        gap = math.log(lin[n] / soft[n])
        if gap <= 0:
            if prev is None:
                return {"length": n, "note": "lightning already faster at the shortest length measured"}
            n0, g0 = prev
            frac = g0 / (g0 - gap)
            est = math.exp(math.log(n0) + frac * (math.log(n) - math.log(n0)))
            return {"length": round(est), "between": [n0, n]}
        prev = (n, gap)
    return {"length": None, "note": f"softmax faster at every length measured up to {ns[-1] if ns else None}"}


def compare_fla(q, k, v, w, slopes, reps):
    """fla's chunk_simple_gla on the same inputs (torch, CUDA): times and rel. RMS vs ours."""
    import torch
    from fla.ops.simple_gla import chunk_simple_gla

    to_torch = lambda x: torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda().to(torch.bfloat16)
    tq, tk, tv, tw = (to_torch(x) for x in (q, k, v, w))
    g = -torch.from_numpy(np.asarray(slopes, np.float32)).cuda()

    def fwd():
        return chunk_simple_gla(tq, tk, tv, g_gamma=g, scale=1.0)[0]

    def fwd_bwd():
        xs = [x.detach().requires_grad_() for x in (tq, tk, tv)]
        o = chunk_simple_gla(*xs, g_gamma=g, scale=1.0)[0]
        (o.float() * tw.float()).sum().backward()

    def ttime(fn):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    ours = np.asarray(lightning_attention(q, k, v, slopes, impl="auto")[0], np.float32)
    theirs = fwd().float().cpu().numpy()
    rel = float(np.sqrt(np.mean((ours - theirs) ** 2) / np.mean(theirs**2)))
    return {"fwd_s": ttime(fwd), "fwd_bwd_s": ttime(fwd_bwd), "rel_rms_vs_ours": rel}


def run(args) -> dict:
    platform_name = jax.default_backend()
    accel = platform_name in ("tpu", "gpu")
    dtype = jnp.dtype(args.dtype or ("bfloat16" if accel else "float32"))
    h, d = (64, 128) if args.m1_shape else (args.heads, args.head_dim)
    lengths = DEFAULT_LENGTHS["accel" if accel else "cpu"]
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else lengths
    if args.quick:
        lengths = [n for n in lengths if n >= 1024][:3] if not args.lengths else lengths
    kernel = resolve_lightning_impl("auto", 1 << 20)
    if kernel == "pallas_gpu":  # both GPU kernels side by side where Mosaic GPU applies (Hopper)
        kernel = gpu_kernel(dtype, d, d)
        default = {kernel, "pallas_triton", "reference"}
    else:
        default = {kernel, "reference"}
    impls = args.impls.split(",") if args.impls else sorted(default)
    if not args.no_softmax:
        impls.append("softmax")
    soft_max = args.softmax_max_len or (8192 if not accel else 1 << 17)
    args.block_size = args.block_size or (256 if accel else 64)
    slopes = layer_slopes(h, 40, 80)  # a middle layer of M1
    peak_flops, bw, peak_source = device_peaks()
    rows = []
    for n in lengths:
        q, k, v, w = make_inputs(args.batch, n, h, d, dtype)
        want = None  # the reference output, once per length for every kernel's check
        for impl in impls:
            row = {"impl": impl, "n": n}
            if impl == "softmax" and n > soft_max:
                row["skipped"] = f"n > softmax_max_len={soft_max} (quadratic memory)"
            else:
                try:
                    row.update(bench_one(impl, q, k, v, w, slopes, args.block_size, args.reps, not args.no_backward))
                    if impl not in ("softmax", "reference"):
                        if want is None:
                            want = np.asarray(op("reference", slopes, args.block_size)(q, k, v), np.float32)
                        row["rel_rms_vs_reference"] = vs_reference(impl, q, k, v, slopes, args.block_size, want)
                except Exception as e:  # e.g. out of memory: record it and go on
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                annotate(row, peak_flops, bw, args.batch, h, n, d, dtype.itemsize, args.block_size)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.compare_fla and n <= args.fla_max_len:
            try:
                row = {"impl": "fla_chunk_simple_gla", "n": n, **compare_fla(q, k, v, w, slopes, args.reps)}
                annotate(row, peak_flops, bw, args.batch, h, n, d, dtype.itemsize, 64)
            except Exception as e:
                row = {"impl": "fla_chunk_simple_gla", "n": n, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    main = kernel if kernel in impls else impls[0]
    by = {(r["impl"], r["n"]): r for r in rows}
    summary = {"impl": main}
    for key in ("fwd_s", "fwd_bwd_s"):
        a, b = by.get((main, 2048), {}).get(key), by.get((main, 32768), {}).get(key)
        summary[f"linear_ratio_32k_over_2k_{key[:-2]}"] = (b / a) if a and b else None
        summary[f"crossover_vs_softmax_{key[:-2]}"] = crossover(rows, main, key)
    return {
        "env": {
            "platform": platform_name,
            "device_kind": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "setup": {"batch": args.batch, "heads": h, "head_dim": d, "dtype": str(dtype), "block_size": args.block_size},
        "peak": {"flops": peak_flops, "bytes_per_s": bw, "source": peak_source},
        "rows": rows,
        "summary": summary,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--m1-shape", action="store_true", help="H=64, D=128 (M1 without tensor parallelism)")
    p.add_argument("--dtype", help="default: bfloat16 on TPU/GPU, float32 on CPU")
    p.add_argument("--impls", help="comma-separated lightning impls (default: this platform's kernel + reference)")
    p.add_argument("--block-size", type=int, help="chunk length (default: 64 on CPU, the fastest jnp block; 256 else)")
    p.add_argument("--no-softmax", action="store_true")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--softmax-max-len", type=int, help="skip softmax above this length (default 8192 on CPU)")
    p.add_argument("--compare-fla", action="store_true")
    p.add_argument("--fla-max-len", type=int, default=1 << 17)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="three short lengths")
    p.add_argument("--out", default="lightning_benchmark.json")
    args = p.parse_args()
    result = run(args)
    write_report(result, args.out)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    from m1jax import host

    host.reexec_with_hugepages()  # first: glibc reads its tunables at start-up
    main()
