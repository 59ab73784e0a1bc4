"""The training state and the jitted training / evaluation steps.

state = {"step", "params", "opt_state", "skipped", "bad_streak"}: a plain pytree, donated to the
step and sharded by the model's logical axis names (optimizer moments inherit their parameter's
axes). The loss is a global token mean of next-token cross entropy inside documents (exactly,
under gradient accumulation: every micro-batch divides by the whole batch's token count) plus
the MoE aux loss. A step whose loss or gradient norm is not finite leaves params and optimizer
state unchanged and counts itself in `skipped` and `bad_streak`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m1jax import host, parallel
from m1jax import sharding as shd
from m1jax.config import ModelConfig
from m1jax.data.pipeline import loss_mask
from m1jax.model import M1Model, head_weight, lm_head

_F32 = jnp.float32


def targets_and_mask(tokens, segment_ids):
    """[B, T] -> (targets [B, T], mask [B, T] fp32): position t predicts token t+1 of its own document."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    mask = jnp.concatenate([loss_mask(segment_ids), jnp.zeros_like(segment_ids[:, :1], bool)], axis=1)
    return targets, mask.astype(_F32)


def token_nll(logits, targets):
    """[B, T, V] fp32, [B, T] -> [B, T] negative log-likelihood (logsumexp - target logit)."""
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - tgt


def chunked_nll_sum(cfg: ModelConfig, params, hidden, targets, mask, chunk: int):
    """Sum of masked NLL with the LM head applied `chunk` tokens at a time, [B, chunk, V] logits
    recomputed in the backward: the full [B, T, V] fp32 logits (26 GB for one 32K-token row of M1's
    200K vocabulary) never exist. hidden [B, T, D], targets / mask [B, T]."""
    b, t, d = hidden.shape
    head = head_weight(cfg, params)
    split = lambda x: jnp.swapaxes(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def body(total, xs):
        h, tgt, m = xs
        return total + jnp.sum(token_nll(lm_head(cfg, h, head), tgt) * m), None

    total, _ = jax.lax.scan(body, jnp.zeros((), _F32), (split(hidden), split(targets), split(mask)))
    return total


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


def _split_micro(x, m: int):
    """[B, ...] -> [m, B/m, ...] with micro-batch i = rows i, i+m, ...: a row-sharded batch stays
    evenly spread over devices in every micro-batch."""
    return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


def train_step(
    cfg: ModelConfig, tx: optax.GradientTransformation, lr_fn, micro_batches: int, state, batch, loss_chunk: int = 0
):
    """One optimizer update from a [B, T] batch (accumulated over `micro_batches`)."""
    params = state["params"]
    num_tokens = jnp.maximum(jnp.sum(targets_and_mask(batch["tokens"], batch["segment_ids"])[1]), 1.0)
    grad_fn = jax.value_and_grad(lambda p, b, w: batch_loss(cfg, p, b, num_tokens, w, loss_chunk), has_aux=True)
    if micro_batches == 1:
        (_, stats), grads = grad_fn(params, batch, 1.0)
    else:
        micro = jax.tree.map(lambda x: _split_micro(x, micro_batches), batch)

        def body(acc, mb):
            (_, st), g = grad_fn(params, mb, 1.0 / micro_batches)
            return jax.tree.map(jnp.add, acc, (g, st)), None

        st0 = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), 1.0)[0][1])
        init = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), st0))
        (grads, stats), _ = jax.lax.scan(body, init, micro)
        stats["expert_load"] = stats["expert_load"] / micro_batches

    loss = stats["nll_sum"] / num_tokens
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(stats["aux_loss"])

    def update(p, o):
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    # A cond, not a where over the new and old trees: the skipped branch costs nothing, and the
    # update writes the donated buffers in place (one pass over params and moments, not two).
    new_params, new_opt = jax.lax.cond(ok, update, lambda p, o: (p, o), params, state["opt_state"])
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


def _boxed_state(cfg: ModelConfig, tx, rng):
    params = M1Model(cfg).init(rng, jnp.zeros((1, min(cfg.block_size, 8)), jnp.int32))["params"]
    zero = jnp.zeros((), jnp.int32)
    return {"step": zero, "params": params, "opt_state": tx.init(params), "skipped": zero, "bad_streak": zero}


class Trainer:
    """The compiled pieces of a run on `mesh`: state init, train step, eval step, shardings.

    Everything is `jax.jit` with explicit in / out shardings; the state is donated.
    """

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
        self.cfg, self.tx, self.mesh, self.micro_batches = cfg, tx, mesh, micro_batches
        boxed = jax.eval_shape(functools.partial(_boxed_state, cfg, tx), jax.random.PRNGKey(0))
        self.state_sharding = shd.tree_shardings(boxed, mesh, rules)
        self.abstract_state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), nn.unbox(boxed), self.state_sharding
        )
        self.batch_sharding = shd.batch_sharding(mesh, rules)
        replicated = NamedSharding(mesh, PartitionSpec())
        opts = host.compiler_options(mesh.devices.flat)
        self._init = jax.jit(lambda rng: nn.unbox(_boxed_state(cfg, tx, rng)), out_shardings=self.state_sharding)
        self.step = jax.jit(
            parallel.traced_under(
                mesh, functools.partial(train_step, cfg, tx, lr_fn, micro_batches, loss_chunk=loss_chunk)
            ),
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, replicated),
            donate_argnums=0,
            compiler_options=opts,
        )
        self.eval = jax.jit(
            parallel.traced_under(mesh, functools.partial(eval_step, cfg)),
            in_shardings=(self.state_sharding["params"], self.batch_sharding),
            out_shardings=replicated,
            compiler_options=opts,
        )

    def init(self, rng):
        return self._init(rng)

    def put_batch(self, batch):
        """Host numpy batch (this process's rows) -> global sharded arrays."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}
