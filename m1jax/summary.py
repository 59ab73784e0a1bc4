"""Print a config's parameter count, layer plan and decode-state size; optionally run a forward.

    python -m m1jax.summary                                # the embedded default's model (preset mini)
    python -m m1jax.summary --preset minimax_m1 --no-forward
    python -m m1jax.summary --config configs/pretrain_small.py   # a run config's model section

Counts come from `jax.eval_shape` of `init`: nothing is allocated, so the 456B model is fine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from m1jax import config as presets
from m1jax.config import LIGHTNING, ModelConfig, layer_plan
from m1jax.layers import layer_slopes
from m1jax.model import M1Model, abstract_params, init_params, pattern_runs

_EXPERT = ("'w1'", "'w2'", "'w3'")


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by component; `active` excludes embedding and LM head (M1's convention)."""
    leaves = jax.tree_util.tree_leaves_with_path(abstract_params(cfg), is_leaf=lambda x: hasattr(x, "names"))
    out = dict(embedding=0, lm_head=0, lightning_attention=0, softmax_attention=0, experts=0, router=0, norms=0)
    kinds = {}
    pattern, _, tail = layer_plan(cfg)
    for stack, kinds_ in (("groups", pattern), ("tail", tail)):
        for j, (k, _, _) in enumerate(pattern_runs(kinds_)):
            kinds[(stack, f"run_{j}")] = k
    for path, leaf in leaves:
        n = math.prod(leaf.value.shape)
        keys = [getattr(p, "key", None) for p in path]
        name = jax.tree_util.keystr(path)
        if keys[0] == "embed":
            out["embedding"] += n
        elif keys[0] == "lm_head":
            out["lm_head"] += n
        elif "attn" in keys:
            kind = kinds[(keys[0], keys[1])]
            out["lightning_attention" if kind == LIGHTNING else "softmax_attention"] += n
        elif any(w in name for w in _EXPERT):
            out["experts"] += n
        elif keys[-1] == "router":
            out["router"] += n
        else:
            out["norms"] += n
    out["total"] = sum(out.values())
    frac = cfg.num_experts_per_tok / cfg.num_local_experts
    out["active"] = out["total"] - out["embedding"] - out["lm_head"] - round(out["experts"] * (1 - frac))
    return out


def decode_state_bytes(cfg: ModelConfig) -> dict[str, int]:
    """Per sequence: fixed lightning state (fp32) and softmax KV cache growth per token."""
    n_light = sum(t == LIGHTNING for t in cfg.attn_type_list)
    n_soft = cfg.num_hidden_layers - n_light
    state = n_light * cfg.num_attention_heads * cfg.head_dim * cfg.head_dim * 4
    kv = n_soft * 2 * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize
    return {"lightning_state_bytes": state, "kv_cache_bytes_per_token": kv}


def describe(cfg: ModelConfig) -> dict[str, Any]:
    pattern, n_groups, tail = layer_plan(cfg)
    sym = lambda kinds: "".join("L" if k == LIGHTNING else "S" for k in kinds)
    lam = lambda layer: jnp.exp(-layer_slopes(cfg.num_attention_heads, layer, cfg.num_hidden_layers))
    first_l = cfg.attn_type_list.index(LIGHTNING) if LIGHTNING in cfg.attn_type_list else None
    last_l = max((i for i, t in enumerate(cfg.attn_type_list) if t == LIGHTNING), default=None)
    return {
        "params": param_counts(cfg),
        "layer_plan": {"pattern": sym(pattern), "groups": n_groups, "tail": sym(tail), "layers": cfg.num_hidden_layers},
        "lightning_decay": None
        if first_l is None
        else {
            f"layer_{first_l}_lambda_range": [float(lam(first_l).min()), float(lam(first_l).max())],
            f"layer_{last_l}_lambda_range": [float(lam(last_l).min()), float(lam(last_l).max())],
        },
        "decode": decode_state_bytes(cfg),
    }


def load_config_file(path: str) -> ModelConfig:
    """A config file defines `get_config()` returning a ModelConfig or a run config (its `model`)."""
    spec = importlib.util.spec_from_file_location("m1jax_user_config", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--config {path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ValueError(f"--config {path}: defines no get_config()")
    cfg = mod.get_config()
    cfg = getattr(cfg, "model", cfg)
    if not isinstance(cfg, ModelConfig) and "preset" in cfg:  # a run config's model section
        from m1jax.train.config import model_config

        cfg = model_config(cfg)
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"--config {path}: get_config() returned {type(cfg).__name__}, not a ModelConfig")
    return cfg


def smoke_forward(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, seq_len), 0, cfg.vocab_size)
    fwd = jax.jit(lambda p, t: M1Model(cfg).apply({"params": p}, t))
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(params, tokens))
    t1 = time.perf_counter()
    logits, aux = jax.block_until_ready(fwd(params, tokens))
    t2 = time.perf_counter()
    return {
        "seq_len": seq_len,
        "compile_s": round(t1 - t0 - (t2 - t1), 3),
        "tokens_per_s": round(seq_len / (t2 - t1), 1),
        "router_aux_loss": round(float(aux["router_aux_loss"]), 4),
        "logits_finite": bool(jnp.isfinite(logits).all()),
    }


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="config file with get_config(); default: the `mini` preset")
    ap.add_argument("--preset", choices=sorted(presets.PRESETS), help="a named preset instead of a file")
    ap.add_argument("--no-forward", action="store_true", help="skip the random-weight forward pass")
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args(argv)
    if args.config:
        cfg = load_config_file(args.config)
    else:
        cfg = presets.PRESETS[args.preset or "mini"]()
    report = describe(cfg)
    report["config"] = {k: v for k, v in cfg.to_dict().items() if k != "attn_type_list"}
    # A forward of a 456B model needs a pod; only run it where it fits in a laptop's memory.
    if not args.no_forward and report["params"]["total"] < 2e9:
        report["forward"] = smoke_forward(cfg, args.seq_len)
    p = report["params"]
    print(json.dumps(report, indent=2))
    print(
        f"\n{p['total'] / 1e9:.2f}B parameters ({p['active'] / 1e9:.2f}B active, excl. embedding and head); "
        f"layers: {report['layer_plan']['groups']} x [{report['layer_plan']['pattern']}]"
        + (f" + [{report['layer_plan']['tail']}]" if report["layer_plan"]["tail"] else "")
    )
    return report


if __name__ == "__main__":
    main()
