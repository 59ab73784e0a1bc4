"""Compile the training step (and the CISPO step) ahead of time for a TPU slice, on any machine.

    python -m experiments.aot --config configs/pretrain_m1_full.py --topology v5p:8x8x8 [--step both]
        [--config.seq_len=32768 --config.mesh.expert=8 ...] [--rl_prompt_len 2048] [--out aot.json]
    python -m experiments.aot --config configs/pretrain_m1_full.py --topology v5p:4x4x4 --step decode \
        --rl_prompt_len 2048 --decode_len 81920 --slots 64 [--config.mesh.* for the rollout slice]

Needs libtpu (`pip install "jax[tpu]"`, the `tpu` extra) but no TPU: `jax.experimental.topologies`
describes the slice, the step is lowered with abstract inputs (nothing is allocated) and compiled
by the real TPU compiler. Prints JSON per step: the mesh, per-chip memory from XLA's memory
analysis (arguments, outputs, temporaries, aliased donations, the peak estimate and the chip's HBM),
`fits`, and FLOPs per step: XLA's cost analysis per chip (it counts a loop body once, so with
scanned layers and micro-batches it undercounts) and the analytic model count of `m1jax.train.flops`.
A step that does not fit is reported as such, with its numbers, and the exit status is 1; a compile
error (for example an out-of-memory from the compiler) is reported in the JSON with its message.

`--step decode` compiles the rollout engine's decode program (`rl.engine.decode`: the whole sampling
loop over `--slots` slots, each with a cache of prompt + `--decode_len` positions) with weights in the
compute dtype (bf16), the engine state laid out by `rl.engine.state_shardings` (slots over the batch
axes, heads over "tensor") and donated, as a rollout slice would run it.

`--step prefill` compiles the prefill of one prompt of `seq_len` tokens (e.g. 1M:
`--config.seq_len=1048576`) into a rollout cache, under the mesh's sequence parallelism (LASP-2 for the
lightning layers, all-gathered keys and values for the softmax layers): bf16 weights, the softmax
cache's positions over "sequence", and only the last position's logits (the first sampled token).

`dtype` / `moe_impl` / `lightning_impl` "auto" resolve for the *target* with the model's own resolvers
(ragged_dot experts; the Mosaic lightning kernel, run per shard since the steps trace under the
mesh).
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags

from experiments import cli

_CONFIG = cli.config_flag(None, "pretraining config file")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology, e.g. v5p:8x8x8, v5e:4x4, v4:2x2x2")
_STEP = flags.DEFINE_enum(
    "step", "both", ["pretrain", "cispo", "both", "decode", "prefill"], "step(s) to compile (both: pretrain, cispo)"
)
_RL_PROMPT = flags.DEFINE_integer("rl_prompt_len", 0, "CISPO / rollout prompt length (0: seq_len / 4)")
_SLOTS = flags.DEFINE_integer("slots", 0, "decode: rollout-engine slots (0: one per batch-parallel chip)")
_DECODE_LEN = flags.DEFINE_integer("decode_len", 0, "decode: new tokens per sample (0: seq_len - prompt)")
_OUT = flags.DEFINE_string("out", "", "also write the JSON report here")

GIB = 2**30
STEPS = ("pretrain", "cispo", "decode", "prefill")
# HBM per chip by device kind (public TPU specs); unknown kinds report fits=None.
# Matched in order: a v5p reports its kind as "TPU v5", a v5e as "TPU v5 lite".
HBM_GIB = (("v5 lite", 16.0), ("v5e", 16.0), ("v5", 95.0), ("v6", 32.0), ("v4", 32.0), ("v3", 32.0), ("v2", 16.0))


def hbm_bytes(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((gib * GIB for key, gib in HBM_GIB if key in kind), None)


def topology_devices(name: str):
    """The devices of a TPU topology description ("v5p:2x2x1", ...), for compiling only."""
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
    except Exception as e:  # noqa: BLE001 - libtpu missing, unknown topology name
        raise SystemExit(f"error: cannot describe TPU topology {name!r} ({type(e).__name__}: {e})") from None


def for_target(cfg, seq_len: int, mesh, platform: str = "tpu"):
    """Resolve the "auto" implementations for the target rather than for this (CPU) machine, as
    the steps trace: under the mesh (so the lightning kernel runs per shard)."""
    from m1jax import parallel
    from m1jax.kernels import resolve_lightning_impl
    from m1jax.moe import resolve_impl

    with parallel.mesh_context(mesh):
        lightning = resolve_lightning_impl(cfg.lightning_impl, seq_len, platform, devices=mesh.size)
    dtype = "bfloat16" if cfg.dtype == "auto" else cfg.dtype  # "auto" is bf16 on accelerators (fp32 here)
    return cfg.replace(moe_impl=resolve_impl(cfg.moe_impl, platform), lightning_impl=lightning, dtype=dtype)


def memory_report(compiled, device_kind: str) -> dict:
    m = compiled.memory_analysis()
    out = {
        k: int(getattr(m, f"{k}_size_in_bytes"))
        for k in ("argument", "output", "temp", "alias", "generated_code")
        if m is not None and hasattr(m, f"{k}_size_in_bytes")
    }
    # Donated state is aliased into the outputs: live bytes are arguments + outputs - aliases + temporaries.
    peak = out.get("argument", 0) + out.get("output", 0) - out.get("alias", 0) + out.get("temp", 0)
    out = {f"{k}_bytes": v for k, v in out.items()}
    hbm = hbm_bytes(device_kind)
    out.update(peak_bytes=peak, peak_gib=peak / GIB, hbm_gib=None if hbm is None else hbm / GIB)
    out["fits"] = None if hbm is None else bool(peak <= hbm)
    return out


def xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def bytes_per_chip(tree) -> int:
    """Bytes of one chip's shards of a pytree of sharded shapes (before the TPU's tile padding)."""
    import jax
    import numpy as np

    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _compile(lowered_fn, device_kind: str) -> dict:
    t0 = time.perf_counter()
    try:
        compiled = lowered_fn().compile()
    except Exception as e:  # noqa: BLE001 - e.g. RESOURCE_EXHAUSTED from the TPU compiler: report it
        return {"compiled": False, "error": f"{type(e).__name__}: {str(e)[:2000]}", "fits": False}
    rep = {"compiled": True, "compile_s": time.perf_counter() - t0, **memory_report(compiled, device_kind)}
    rep["xla_flops_per_chip"] = xla_flops(compiled)
    return rep


def pretrain_step(c, cfg, mesh, device_kind: str) -> dict:
    import jax
    import jax.numpy as jnp

    from m1jax.train import flops as flops_lib
    from m1jax.train.loop import make_optimizer
    from m1jax.train.step import Trainer

    lr, tx = make_optimizer(c)
    tr = Trainer(cfg, tx, lr, mesh, c.micro_batches, loss_chunk=c.loss_chunk)
    batch = {
        k: jax.ShapeDtypeStruct((c.batch_size, c.seq_len), jnp.int32, sharding=tr.batch_sharding)
        for k in ("tokens", "segment_ids")
    }
    rep = _compile(lambda: tr.step.lower(tr.abstract_state, batch), device_kind)
    tokens = c.batch_size * c.seq_len
    rep.update(
        batch_size=c.batch_size,
        seq_len=c.seq_len,
        micro_batches=c.micro_batches,
        loss_chunk=c.loss_chunk,
        model_flops_per_step=flops_lib.train_flops_per_token(cfg, c.seq_len) * tokens,
    )
    return rep


def cispo_step(c, cfg, mesh, device_kind: str, prompt_len: int) -> dict:
    import jax
    import jax.numpy as jnp

    from m1jax.train import flops as flops_lib
    from m1jax.train import optim
    from rl import config as rl_config
    from rl.step import RLTrainer

    r = rl_config.base_config()
    _, tx = optim.from_config(r.optim, r.steps)
    tr = RLTrainer(
        cfg,
        tx,
        mesh,
        loss="cispo",
        loss_kw=rl_config.loss_kwargs(r),
        temperature=r.rl.sampling.temperature,
        kl_coef=r.rl.kl_coef,
        aux=r.rl.aux_loss,
        micro_batches=c.micro_batches,
    )
    b, n = c.batch_size, c.seq_len - prompt_len
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=tr.row_sharding(len(shape)))
    mb = {
        "prompt": sds((b, prompt_len), jnp.int32),
        "prompt_lengths": sds((b,), jnp.int32),
        "tokens": sds((b, n), jnp.int32),
        "mask": sds((b, n), jnp.float32),
        "old_logp": sds((b, n), jnp.float32),
        "ref_logp": sds((b, n), jnp.float32),
        "advantages": sds((b,), jnp.float32),
    }
    rep = _compile(lambda: tr.update.lower(tr.abstract_state, mb), device_kind)
    rep.update(
        batch_size=b,
        prompt_len=prompt_len,
        response_len=n,
        model_flops_per_step=flops_lib.train_flops_per_token(cfg, c.seq_len) * b * c.seq_len,
    )
    return rep


def decode_program(c, cfg, mesh, device_kind: str, prompt_len: int, new_tokens: int, slots: int) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from m1jax import parallel
    from m1jax import sharding as shd
    from m1jax.model import abstract_params
    from rl import config as rl_config
    from rl import engine
    from rl.sampler import SamplingParams

    rcfg = cfg.replace(param_dtype=cfg.dtype, lm_head_fp32=True)  # serving weights; fp32 log-probs
    sds = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
    params = jax.tree.map(sds, nn.unbox(abstract_params(rcfg)), shd.param_shardings(rcfg, mesh))
    max_len = prompt_len + new_tokens
    init = lambda p: engine.init_state(rcfg, p, slots, max_len, slots, new_tokens, 0)
    st = jax.eval_shape(init, params)
    layout = engine.state_shardings(st, mesh)
    st = jax.tree.map(sds, st, layout)
    whole = NamedSharding(mesh, PartitionSpec())
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=whole)
    need = jax.ShapeDtypeStruct((), jnp.int32, sharding=whole)
    s = rl_config.base_config().rl.sampling
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    fn = jax.jit(engine.decode, static_argnums=(0, 1), donate_argnums=(3,), out_shardings=layout)

    def lower():
        with parallel.mesh_context(mesh):
            return fn.lower(rcfg, sp, params, st, rng, need)

    rep = _compile(lower, device_kind)
    state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(st))
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    rep.update(
        slots=slots,
        prompt_len=prompt_len,
        decode_len=new_tokens,
        max_len=max_len,
        weights_bytes=weights,
        engine_state_bytes=state,
        engine_state_bytes_per_slot=state / slots,
        engine_state_bytes_per_chip=bytes_per_chip(st),
        weights_bytes_per_chip=bytes_per_chip(params),
        note="xla_flops_per_chip counts the while-loop body (one decode step of every slot) once",
    )
    return rep


def prefill_program(c, cfg, mesh, device_kind: str) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from m1jax import parallel
    from m1jax import sharding as shd
    from m1jax.model import M1Model, abstract_params, head_weight, lm_head
    from rl import engine

    rcfg = cfg.replace(param_dtype=cfg.dtype, lm_head_fp32=True)
    sds = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
    params = jax.tree.map(sds, nn.unbox(abstract_params(rcfg)), shd.param_shardings(rcfg, mesh))
    t = c.seq_len
    tokens = jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=shd.batch_sharding(mesh))

    def prefill_last(params, tokens):  # [1, T] -> (last logits fp32 [1, V], cache of T positions)
        x, _, cache = M1Model(rcfg).apply(
            {"params": params}, tokens, mode="prefill", max_len=t, hidden=True, method=M1Model.run
        )
        return lm_head(rcfg, x[:, -1], head_weight(rcfg, params)), cache

    cache = jax.eval_shape(prefill_last, params, tokens)[1]
    layout = engine.state_shardings({"cache": cache}, mesh, length="sequence")["cache"]
    cache = jax.tree.map(sds, cache, layout)
    fn = jax.jit(prefill_last, out_shardings=(NamedSharding(mesh, PartitionSpec()), layout))

    def lower():
        with parallel.mesh_context(mesh):
            return fn.lower(params, tokens)

    rep = _compile(lower, device_kind)
    rep.update(
        prompt_len=t,
        weights_bytes=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)),
        cache_bytes=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)),
        cache_bytes_per_chip=bytes_per_chip(cache),
        weights_bytes_per_chip=bytes_per_chip(params),
    )
    return rep


def run(c, topology: str, step: str = "both", rl_prompt_len: int = 0, *, slots: int = 0, decode_len: int = 0) -> dict:
    """Compile the chosen steps for `topology`; returns the report (see the module docstring)."""
    from m1jax import sharding as shd
    from m1jax.summary import param_counts
    from m1jax.train import config as tc

    devices = topology_devices(topology)
    mesh = shd.mesh_from_config(dict(c.mesh), list(devices))
    if mesh.size != len(devices):
        raise SystemExit(f"error: mesh {dict(mesh.shape)} uses {mesh.size} of the {len(devices)} chips of {topology}")
    cfg = for_target(tc.validate(c), c.seq_len, mesh)
    tc.check_batch_layout(c, dict(mesh.shape))
    prompt = rl_prompt_len or c.seq_len // 4
    if step in ("cispo", "both") and not 0 < prompt < c.seq_len:  # checked before anything compiles
        raise SystemExit(f"error: --rl_prompt_len={prompt} must lie in (0, seq_len={c.seq_len})")
    from m1jax.mesh import batch_parallel

    dp = batch_parallel(mesh.shape)
    slots = slots or dp
    new_tokens = decode_len or c.seq_len - prompt
    if step == "decode" and (slots % dp or new_tokens < 1 or prompt < 1):
        raise SystemExit(
            f"error: --slots={slots} must be a multiple of the {dp} batch-parallel chips of mesh "
            f"{dict(mesh.shape)}, --decode_len={new_tokens} and --rl_prompt_len={prompt} positive"
        )
    kind = devices[0].device_kind
    counts = param_counts(cfg)
    report = {
        "topology": topology,
        "chips": len(devices),
        "device_kind": kind,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "remat": cfg.remat,
        "dtype": cfg.dtype,
        "moe_capacity_factor": cfg.moe_capacity_factor,
        "moe_impl": cfg.moe_impl,
        "lightning_impl": cfg.lightning_impl,
        "params_total": counts["total"],
        "params_active": counts["active"],
    }
    if step in ("pretrain", "both"):
        report["pretrain"] = pretrain_step(c, cfg, mesh, kind)
    if step in ("cispo", "both"):
        report["cispo"] = cispo_step(c, cfg, mesh, kind, prompt)
    if step == "decode":
        report["decode"] = decode_program(c, cfg, mesh, kind, prompt, new_tokens, slots)
    if step == "prefill":
        report["prefill"] = prefill_program(c, cfg, mesh, kind)
    steps = [report[s] for s in STEPS if s in report]
    report["fits"] = None if any(s["fits"] is None for s in steps) else all(s["fits"] for s in steps)
    return report


def _decode_flags() -> dict:
    return {"slots": _SLOTS.value, "decode_len": _DECODE_LEN.value}


def main(argv) -> None:
    del argv
    from m1jax import host

    host.for_tpu_compiles()  # before JAX starts: beside a running job, and without opening local TPU chips
    if _CONFIG.value is None:
        raise SystemExit("error: --config is required (e.g. configs/pretrain_m1_full.py)")
    with cli.main_errors():  # config errors: one line
        report = run(_CONFIG.value, _TOPOLOGY.value, _STEP.value, _RL_PROMPT.value, **_decode_flags())
    text = json.dumps(report, indent=2)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as fh:
            fh.write(text + "\n")
    for s in STEPS:
        if s in report and report[s]["fits"] is False:
            peak = report[s].get("peak_gib")
            what = report[s].get("error") or f"needs {peak:.1f} GiB per chip, the chip has {report[s]['hbm_gib']:.0f}"
            print(f"DOES NOT FIT: the {s} step on {_TOPOLOGY.value}: {what}", file=sys.stderr)
    sys.exit(0 if report["fits"] is not False else 1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
