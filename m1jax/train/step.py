"""The pretraining steps on the training engine (`m1jax.train.engine`): update and evaluation.

state = {"step", "params", "opt_state", "skipped", "bad_streak"}. The loss is a global token mean
of next-token cross entropy inside documents (exactly, under gradient accumulation: every
micro-batch divides by the whole batch's token count) plus the MoE aux loss. A step whose loss or
gradient norm is not finite leaves params and optimizer state unchanged and counts itself in
`skipped` and `bad_streak`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from m1jax import sharding as shd
from m1jax.config import ModelConfig
from m1jax.model import M1Model
from m1jax.objective import chunked_nll_sum, targets_and_mask, token_nll
from m1jax.train.engine import Engine, accumulate, apply_if, global_norm

_F32 = jnp.float32
COUNTERS = ("skipped", "bad_streak")  # the pretraining state's counters (checkpoint layout)


def batch_loss(cfg: ModelConfig, params, batch, num_tokens, aux_weight=1.0, loss_chunk: int = 0):
    """Sum of masked NLL / num_tokens + aux_weight * coef * router loss. Returns (loss, stats).
    loss_chunk > 0 (dividing T) computes the head and cross entropy that many tokens at a time."""
    tokens, segs = batch["tokens"], batch["segment_ids"]
    chunked = 0 < loss_chunk < tokens.shape[1]
    out, aux, _ = M1Model(cfg).apply({"params": params}, tokens, segs, hidden=chunked, method=M1Model.run)
    targets, mask = targets_and_mask(tokens, segs)
    if chunked:
        nll_sum = chunked_nll_sum(cfg, params, out, targets, mask, loss_chunk)
    else:
        nll_sum = jnp.sum(token_nll(out, targets) * mask)
    loss = nll_sum / num_tokens + aux_weight * cfg.router_aux_loss_coef * aux["router_aux_loss"]
    stats = {"nll_sum": nll_sum, "aux_loss": aux["router_aux_loss"] * aux_weight, "expert_load": aux["expert_load"]}
    return loss, stats


def train_step(
    cfg: ModelConfig, tx: optax.GradientTransformation, lr_fn, micro_batches: int, state, batch, loss_chunk: int = 0
):
    """One optimizer update from a [B, T] batch (accumulated over `micro_batches`)."""
    params = state["params"]
    num_tokens = jnp.maximum(jnp.sum(targets_and_mask(batch["tokens"], batch["segment_ids"])[1]), 1.0)
    weight = 1.0 / micro_batches  # of the aux loss, a per-micro-batch mean
    grad_fn = jax.value_and_grad(lambda p, b: batch_loss(cfg, p, b, num_tokens, weight, loss_chunk), has_aux=True)
    grads, stats = accumulate(grad_fn, params, batch, micro_batches)
    stats["expert_load"] = stats["expert_load"] / micro_batches

    loss = stats["nll_sum"] / num_tokens
    grad_norm = global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(stats["aux_loss"])
    new_params, new_opt = apply_if(ok, tx, grads, params, state["opt_state"])
    applied = state["step"] - state["skipped"]  # optimizer updates so far: the schedule's clock
    new_state = {
        "step": state["step"] + 1,
        "params": new_params,
        "opt_state": new_opt,
        "skipped": state["skipped"] + (~ok).astype(jnp.int32),
        "bad_streak": jnp.where(ok, 0, state["bad_streak"] + 1).astype(jnp.int32),
    }
    metrics = {
        "loss": loss,
        "aux_loss": stats["aux_loss"],
        "grad_norm": grad_norm,
        "lr": lr_fn(applied),
        "tokens": num_tokens,
        "finite": ok,
        "expert_load": stats["expert_load"],
        "skipped": new_state["skipped"],
        "bad_streak": new_state["bad_streak"],
    }
    return new_state, metrics


def eval_step(cfg: ModelConfig, params, batch):
    """(sum of NLL, token count) over a [B, T] batch."""
    logits, _ = M1Model(cfg).apply({"params": params}, batch["tokens"], batch["segment_ids"])
    targets, mask = targets_and_mask(batch["tokens"], batch["segment_ids"])
    return jnp.sum(token_nll(logits, targets) * mask), jnp.sum(mask)


class Trainer(Engine):
    """The compiled pieces of a pretraining run on `mesh`: state init, train step, eval step,
    shardings (the state is donated to the step)."""

    def __init__(
        self,
        cfg: ModelConfig,
        tx,
        lr_fn,
        mesh: Mesh,
        micro_batches: int = 1,
        rules=shd.DEFAULT_RULES,
        loss_chunk: int = 0,
    ):
        super().__init__(cfg, tx, mesh, counters=COUNTERS, rules=rules)
        self.micro_batches = micro_batches
        self.batch_sharding = shd.batch_sharding(mesh, rules)
        step = functools.partial(train_step, cfg, tx, lr_fn, micro_batches, loss_chunk=loss_chunk)
        self.step = self.jit(
            step, (self.state_sharding, self.batch_sharding), (self.state_sharding, self.replicated), donate_state=True
        )
        params = self.state_sharding["params"]
        self.eval = self.jit(functools.partial(eval_step, cfg), (params, self.batch_sharding), self.replicated)

    def put_batch(self, batch):
        """Host numpy batch (this process's rows) -> global sharded arrays."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}
