"""The training engine under pretraining (`m1jax.train.step.Trainer`) and RL (`rl.step.RLTrainer`).

The state is a plain pytree, {"step", "params", "opt_state", "skipped", ...counters}, sharded by
the model's logical axis names (optimizer moments inherit their parameter's axes) and donated to
every update. Each user supplies its loss and its batch; the engine supplies the rest:

- `accumulate`: the gradient of a loss summed over micro-batches (a scan; micro-batch i is rows
  i, i+m, ..., so a row-sharded batch stays evenly spread over devices in every micro-batch);
- `apply_if`: the optimizer update under `lax.cond`, so a skipped (non-finite) update costs
  nothing and the update writes the donated buffers in place;
- `Engine`: state init and shardings on a mesh, and `jit` with in / out shardings, donation, the
  mesh context (the model's expert / sequence collectives see the mesh) and the CPU compiler options.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m1jax import host
from m1jax import sharding as shd
from m1jax.config import ModelConfig
from m1jax.mesh import traced_under
from m1jax.model import M1Model


def split_micro(x, m: int):
    """[B, ...] -> [m, B/m, ...] with micro-batch i = rows i, i+m, ...: a row-sharded batch stays
    evenly spread over devices in every micro-batch."""
    return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


def accumulate(grad_fn, params, batch, micro: int, *, sum_stats: bool = True):
    """Gradients of `grad_fn(params, mb) -> ((loss, stats), grads)` summed over `micro` micro-batches.

    Returns (grads, stats): stats summed over micro-batches (`sum_stats`), or stacked [micro, ...]
    for the caller to combine. With micro = 1 the batch is one micro-batch (stacked: a leading 1).
    """
    if micro == 1:
        (_, stats), grads = grad_fn(params, batch)
        return grads, stats if sum_stats else jax.tree.map(lambda s: s[None], stats)
    parts = jax.tree.map(lambda x: split_micro(x, micro), batch)
    zeros = jax.tree.map(jnp.zeros_like, params)
    if sum_stats:
        first = jax.tree.map(lambda x: x[0], parts)
        st0 = jax.eval_shape(lambda: grad_fn(params, first)[0][1])

        def body(acc, mb):
            (_, st), g = grad_fn(params, mb)
            return jax.tree.map(jnp.add, acc, (g, st)), None

        init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), st0))
        (grads, stats), _ = jax.lax.scan(body, init, parts)
        return grads, stats

    def body(acc, mb):
        (_, st), g = grad_fn(params, mb)
        return jax.tree.map(jnp.add, acc, g), st

    return jax.lax.scan(body, zeros, parts)


def global_norm(tree):
    """sqrt of the summed squares of every leaf (as optax.global_norm, which optax deprecates)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def apply_if(ok, tx: optax.GradientTransformation, grads, params, opt_state):
    """(params, opt_state) after the update where `ok`, unchanged where not.

    A cond, not a where over the new and old trees: the skipped branch costs nothing, and the
    update writes the donated buffers in place (one pass over params and moments, not two)."""

    def update(p, o):
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    return jax.lax.cond(ok, update, lambda p, o: (p, o), params, opt_state)


def _boxed_state(cfg: ModelConfig, tx, counters: tuple[str, ...], rng):
    params = M1Model(cfg).init(rng, jnp.zeros((1, min(cfg.block_size, 8)), jnp.int32))["params"]
    zero = jnp.zeros((), jnp.int32)
    return {"step": zero, "params": params, "opt_state": tx.init(params), **dict.fromkeys(counters, zero)}


class Engine:
    """A model's training state on `mesh`: shardings, abstract shapes, init, and jitted updates.

    counters: int32 scalars kept in the state besides "step" (e.g. "skipped" updates); they are
    part of the checkpoint layout, so each kind of run keeps its own.
    """

    def __init__(
        self, cfg: ModelConfig, tx, mesh: Mesh, *, counters: tuple[str, ...] = ("skipped",), rules=shd.DEFAULT_RULES
    ):
        self.cfg, self.tx, self.mesh, self.rules = cfg, tx, mesh, rules
        boxed = jax.eval_shape(functools.partial(_boxed_state, cfg, tx, counters), jax.random.PRNGKey(0))
        self.state_sharding = shd.tree_shardings(boxed, mesh, rules)
        self.abstract_state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), nn.unbox(boxed), self.state_sharding
        )
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.compiler_options = host.compiler_options(mesh.devices.flat)
        self._init = jax.jit(
            lambda rng: nn.unbox(_boxed_state(cfg, tx, counters, rng)), out_shardings=self.state_sharding
        )

    def init(self, rng):
        """A fresh state: random parameters from `rng`, fresh optimizer moments, zero counters."""
        return self._init(rng)

    def jit(self, fn, in_shardings, out_shardings, *, donate_state: bool = False):
        """`fn` jitted on this mesh: traced under the mesh context, with the CPU compiler options;
        `donate_state` donates the first argument (the state)."""
        return jax.jit(
            traced_under(self.mesh, fn),
            in_shardings=in_shardings,
            out_shardings=out_shardings,
            donate_argnums=0 if donate_state else (),
            compiler_options=self.compiler_options,
        )

    def row_sharding(self, ndim: int) -> NamedSharding:
        """Sharding of a row-aligned [B, ...] array: rows over the batch-parallel axes."""
        return NamedSharding(self.mesh, nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), self.rules))
