"""Training-step throughput and MFU of m1jax, optionally side by side with transformers + torch AdamW.

Usage: python -m experiments.benchmarks.train_step [--compare-hf] [--quick] [--config small|pretrain_small]
       [--batch B] [--seq-len T] [--reps N] [--block K] [--out train_step_benchmark.json]

Default model: the ~118M-parameter (29M active) 7:1 hybrid `config.small(rotary_dim=64)` in fp32, no remat,
batch 1 x T=2048 (--quick: T=512). m1jax runs the real pretraining step (`m1jax.train.step.Trainer`: jit with
named shardings on a one-device mesh, donated state, AdamW(0.9, 0.95) with global-norm clipping 1.0, MoE aux
loss). With --compare-hf, transformers' MiniMaxForCausalLM is loaded from the *same* initial weights
(`m1jax.hf.save_pretrained`; rotary_dim == head_dim because transformers rotates the whole head) and trained
with torch.optim.AdamW (same betas / eps / weight decay, fused=False), clip_grad_norm_ 1.0 and its router aux
loss, in fp32 and train mode. Both start from the same weights and batch, so their first-step cross entropies
are compared (`first_loss_rel_diff`). After one warm-up step each, the two alternate in rounds so machine drift
hits both alike: each round runs `--block` consecutive steps of m1jax, then as many of torch. The first step
of each block is a switch step and is not timed: the first step after the other framework ran is slower
(measured on the 2-core machine: m1jax 4.1-4.5 s then 2.3 s; the memory the other one used is returned
and faulted in again), which is a cost of sharing one process, not of a training run, where a step follows
a step of its own kind. Switch-step times are recorded too (`*_switch_times_s`). `ratio` is the median over
rounds of torch / m1jax median step time in the round (> 1: m1jax faster).

Run as a script, the process re-executes itself with glibc's huge-page malloc (`m1jax.host`, as the
training CLIs do; M1JAX_HUGEPAGES=0 turns it off), and torch shares that process and setting. The m1jax
step is compiled with `m1jax.host.compiler_options` (YNNPACK for single dots only). Both are in `env`.

MFU = model FLOPs/s (SPEC section 3 counting, `m1jax.train.flops`) / peak. On an accelerator the peak comes from
the vendor table (bf16 dense); on CPU there is no such number, so the script measures the best fp32 GEMM rate
of this machine (a 2048^3 `jnp.dot`, median of 5) and reports MFU against that (`peak_source` says which).
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import m1jax
from experiments.benchmarks.forward import env, rescale, timed, torch_twin, write_report
from m1jax import config
from m1jax import sharding as shd
from m1jax.summary import param_counts
from m1jax.train import flops as flops_lib
from m1jax.train import optim
from m1jax.train.step import Trainer

B1, B2, EPS, WD, CLIP, LR = 0.9, 0.95, 1e-8, 0.1, 1.0, 3e-4


def model_config(name: str):
    if name == "small":
        return config.small(rotary_dim=64, dtype="float32", remat="none"), "config.small(rotary_dim=64, fp32)"
    if name == "pretrain_small":  # the single-GPU pretraining model, bf16 compute as it is trained
        from m1jax.summary import load_config_file

        return load_config_file("configs/pretrain_small.py"), "configs/pretrain_small.py"
    raise SystemExit(f"unknown --config {name!r} (small | pretrain_small)")


def measured_peak_flops(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 GEMM FLOP/s of this device: the CPU's practical peak."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    return 2 * n**3 / statistics.median(timed(lambda: mm(a).block_until_ready())[0] for _ in range(reps))


def jax_trainer(cfg, params, batch_rows: int, seq_len: int):
    mesh = shd.mesh_from_config({"data": 1}, jax.devices()[:1])
    tx = optim.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD, grad_clip=CLIP)
    trainer = Trainer(cfg, tx, lambda _: LR, mesh)
    state = trainer.init(jax.random.PRNGKey(0))
    state = {**state, "params": params, "opt_state": tx.init(params)}
    state = jax.device_put(state, trainer.state_sharding)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch_rows, seq_len), dtype=np.int32)
    batch = trainer.put_batch({"tokens": tokens, "segment_ids": np.ones_like(tokens)})
    return trainer, state, batch, tokens


def torch_trainer(cfg, params, tokens):
    import torch

    model = torch_twin(cfg, params)
    model.train()
    model.config.output_router_logits = True  # its load-balancing loss, as m1jax adds its aux loss
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(B1, B2),
        eps=EPS,
        foreach=True,
    )
    ids = torch.from_numpy(tokens.astype(np.int64))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        aux = float(out.aux_loss) if getattr(out, "aux_loss", None) is not None else 0.0
        return float(out.loss) - model.config.router_aux_loss_coef * aux  # cross entropy alone

    return model, step


def run(args) -> dict:
    cfg, cfg_name = model_config(args.config)
    seq_len = args.seq_len or (512 if args.quick else 2048)
    reps = args.reps or (1 if args.quick else 5)
    raw = m1jax.init_params(cfg, jax.random.PRNGKey(0))
    params = rescale(cfg, raw) if args.compare_hf else raw
    trainer, state, batch, tokens = jax_trainer(cfg, params, args.batch, seq_len)
    host_params = jax.device_get(params) if args.compare_hf else None

    def jax_step():
        nonlocal state
        state, metrics = trainer.step(state, batch)
        return float(metrics["loss"])  # blocks until the step is done

    j_first, j_loss0 = timed(jax_step)
    torch_step = None
    if args.compare_hf:
        _, torch_step = torch_trainer(cfg, host_params, tokens)
        t_first, t_loss0 = timed(torch_step)
    block = max(args.block, 1) if torch_step is not None else 1
    timed_part = lambda r: r[1:] if block > 1 else r  # a block's first step is the switch
    j_times, t_times, j_switch, t_switch, round_ratios = [], [], [], [], []
    for _ in range(reps):
        j_round = [timed(jax_step)[0] for _ in range(block)]
        j_switch.append(j_round[0])
        j_times += timed_part(j_round)
        if torch_step is not None:
            t_round = [timed(torch_step)[0] for _ in range(block)]
            t_switch.append(t_round[0])
            t_times += timed_part(t_round)
            round_ratios.append(statistics.median(timed_part(t_round)) / statistics.median(timed_part(j_round)))

    tokens_per_step = args.batch * seq_len
    fpt = flops_lib.train_flops_per_token(cfg, seq_len)
    platform = jax.devices()[0].platform
    peak = flops_lib.peak_flops_per_device() if platform != "cpu" else None
    peak_source = "vendor bf16 dense peak" if peak else "measured fp32 GEMM (2048^3 jnp.dot) on this CPU"
    peak = peak or measured_peak_flops()
    j_med = statistics.median(j_times)
    out = {
        "config": cfg_name,
        **{f"params_{k}": v for k, v in param_counts(cfg).items() if k in ("total", "active")},
        "batch": args.batch,
        "seq_len": seq_len,
        "reps": reps,
        "train_flops_per_token": fpt,
        "peak_flops": peak,
        "peak_source": peak_source,
        "m1jax_step_s": j_med,
        "m1jax_tokens_per_s": tokens_per_step / j_med,
        "m1jax_mfu": fpt * tokens_per_step / j_med / peak,
        "m1jax_times_s": j_times,
        "block": block,
        "m1jax_first_step_s": j_first,
        "m1jax_compile_s": j_first - j_med,
        "m1jax_first_loss": j_loss0,
    }
    if torch_step is not None:
        t_med = statistics.median(t_times)
        out |= {
            "transformers_step_s": t_med,
            "transformers_tokens_per_s": tokens_per_step / t_med,
            "transformers_mfu": fpt * tokens_per_step / t_med / peak,
            "transformers_times_s": t_times,
            "m1jax_switch_times_s": j_switch,
            "transformers_switch_times_s": t_switch,
            "round_ratios": round_ratios,
            "transformers_first_step_s": t_first,
            "transformers_first_loss": t_loss0,
            "first_loss_rel_diff": abs(j_loss0 - t_loss0) / abs(t_loss0),
            "ratio": statistics.median(round_ratios),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare-hf", action="store_true", help="also train transformers' MiniMaxForCausalLM")
    ap.add_argument("--quick", action="store_true", help="T=512, 1 timed repetition (a smoke test)")
    ap.add_argument("--config", default="small", help="small (default, ~100M) | pretrain_small")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=0, help="default 2048 (--quick: 512)")
    ap.add_argument("--reps", type=int, default=0, help="rounds (default 5; --quick: 1)")
    ap.add_argument("--block", type=int, default=3, help="steps of each per round (--compare-hf); the first is untimed")
    ap.add_argument("--out", default="train_step_benchmark.json", help="where to write the JSON report")
    args = ap.parse_args()
    write_report({"quick": args.quick, "train_step": run(args), "env": env()}, args.out)


if __name__ == "__main__":
    from m1jax import host

    host.reexec_with_hugepages()  # first: glibc reads its tunables at start-up
    main()
