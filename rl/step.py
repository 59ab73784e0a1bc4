"""The jitted RL pieces: log-probs of a rollout, and one policy update on a minibatch.

A minibatch is a dict of row-aligned arrays (rows sharded over the data-parallel mesh axes):
  prompt [B, T] (left-padded), prompt_lengths [B], tokens [B, N], mask [B, N] (response tokens
  that enter the loss: the response mask times the sample's weight), old_logp [B, N],
  advantages [B], optionally context [B, N] (a multi-turn episode's tokens, tool output included:
  attended to, not trained on), is_weight [B, N] (the behaviour weights of `rl.mismatch`, which scale
  each token's advantage), routes [B, T + N, L, k] (the sampler's experts, replayed), and
  ref_logp [B, N] where kl_coef > 0 (without it the update reports no "kl":
  with kl_coef = 0 the term adds nothing, so the reference forward is not needed for the update).
The loss is normalised by the minibatch's *global* token (or sequence) count, computed before
it is split into micro-batches, so accumulation and data parallelism leave it unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from m1jax import sharding as shd
from m1jax.config import ModelConfig
from m1jax.train.engine import Engine, accumulate, apply_if, global_norm, split_micro
from rl import losses
from rl.sampler import entropy, sequence_logprobs

_F32 = jnp.float32
_SUMMED = ("loss", "pg_loss", "kl", "tokens", "aux_loss")  # already divided by the global count


def _combine_metrics(ms: dict, weights) -> dict:
    """Stacked per-micro-batch metrics [m] -> one value each (sums, token-weighted means, max, min)."""
    out = {}
    for k, v in ms.items():
        if k in _SUMMED:
            out[k] = jnp.sum(v)
        elif k.endswith("_max"):
            out[k] = jnp.max(v)
        elif k.endswith("_min"):
            out[k] = jnp.min(v)
        else:
            out[k] = jnp.sum(v * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    return out


def _advantages(b: dict):
    """[B] advantages, or [B, N] scaled per token by the mismatch weights (>= 0; every objective is
    linear in a non-negative advantage scale, so this weights each token's loss)."""
    if "is_weight" not in b:
        return b["advantages"]
    return b["advantages"][:, None] * b["is_weight"]


def update_step(cfg: ModelConfig, tx, loss_name: str, loss_kw: dict, temperature, kl_coef, aux, micro, state, mb):
    """One optimizer update on minibatch `mb` (accumulated over `micro` micro-batches)."""
    if kl_coef and "ref_logp" not in mb:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp in the minibatch")
    loss_fn = losses.get(loss_name)
    agg = losses.knobs(loss_name, **loss_kw).aggregation
    mask = mb["mask"]
    denom = jnp.sum(mask) if agg == "token_mean" else jnp.sum(jnp.sum(mask, -1) > 0).astype(_F32)

    def loss(params, b):
        logp, logits, a = sequence_logprobs(
            cfg, params, b["prompt"], b["prompt_lengths"], b["tokens"], b["mask"], temperature, b.get("routes"),
            b.get("context"),
        )  # fmt: skip
        value, m = loss_fn(
            logp,
            b["old_logp"],
            _advantages(b),
            b["mask"],
            ref_logp=b.get("ref_logp"),
            kl_coef=kl_coef,
            denom=denom,
            **loss_kw,
        )
        m["entropy"] = entropy(jax.lax.stop_gradient(logits), b["mask"])
        m["aux_loss"] = a["router_aux_loss"] / micro
        if "router_flip_fraction" in a:  # router replay: how often the policy's own top-k disagrees
            m["router_flip_fraction"] = a["router_flip_fraction"]
        if aux:
            value = value + cfg.router_aux_loss_coef * m["aux_loss"]
        return value, m

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    params = state["params"]
    grads, ms = accumulate(grad_fn, params, mb, micro, sum_stats=False)
    if micro == 1:
        metrics = jax.tree.map(lambda m: m[0], ms)
    else:
        metrics = _combine_metrics(ms, jnp.sum(split_micro(mask, micro), axis=(1, 2)))
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
    ok = finite & (denom > 0)  # an all-masked minibatch (every group dropped) must not move AdamW
    new_params, new_opt = apply_if(ok, tx, grads, params, state["opt_state"])
    new_state = {
        "step": state["step"] + ok.astype(jnp.int32),  # applied optimizer updates: the schedule's clock
        "params": new_params,
        "opt_state": new_opt,
        "skipped": state["skipped"] + (~finite).astype(jnp.int32),
    }
    return new_state, dict(metrics, grad_norm=grad_norm, finite=finite, applied=ok)


def rollout_logprobs(cfg: ModelConfig, temperature, params, rollout: dict):
    """Trainer-side log pi of each response token [B, N] fp32 (old or reference policy); with
    rollout["routes"] the sampler's experts are replayed (router replay)."""
    r = rollout
    return sequence_logprobs(
        cfg, params, r["prompt"], r["prompt_lengths"], r["tokens"], r["mask"], temperature, r.get("routes"),
        r.get("context"),
    )[0]  # fmt: skip


class RLTrainer(Engine):
    """Compiled RL pieces on `mesh` with explicit shardings (the same logical rules as pretraining)."""

    def __init__(
        self,
        cfg: ModelConfig,
        tx,
        mesh: Mesh,
        *,
        loss: str,
        loss_kw: dict,
        temperature: float,
        kl_coef: float,
        aux: bool,
        micro_batches: int = 1,
        lr_fn=None,
        rules=shd.DEFAULT_RULES,
    ):
        super().__init__(cfg, tx, mesh, counters=("skipped",), rules=rules)
        self.lr_fn = lr_fn  # for logging: the learning rate at a given update count
        step = functools.partial(update_step, cfg, tx, loss, loss_kw, temperature, kl_coef, aux, micro_batches)
        self.update = self.jit(
            step, (self.state_sharding, None), (self.state_sharding, self.replicated), donate_state=True
        )
        self.logprobs = jax.jit(
            functools.partial(rollout_logprobs, cfg, temperature),
            out_shardings=None,
            compiler_options=self.compiler_options,
        )
        # Rows `idx` of every array, gathered on the device into the row sharding (the minibatches of a
        # rollout batch that lives on the device; one sharding serves every rank: trailing dims replicate).
        self.take_rows = self.jit(
            lambda arrays, idx: jax.tree.map(lambda v: v[idx], arrays), None, self.row_sharding(1)
        )

    def shard_rows(self, arrays: dict) -> dict:
        """Host arrays [B, ...] (the global batch, same on every process) -> row-sharded global arrays."""
        return {k: jax.device_put(v, self.row_sharding(v.ndim)) for k, v in arrays.items()}
