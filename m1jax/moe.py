"""Top-k Mixture of Experts (SPEC 1.4): fp32 router, renormalised top-k, SwiGLU experts, dropless.

Three expert implementations compute the same function:
- "dense": every expert on every token, weighted by the (sparse) combine matrix. E/k x the work;
  the simplest oracle, best for tiny models.
- "tiled": assignments sorted by expert, each expert's group padded to whole tiles of `m` rows,
  a loop over each expert's tiles. ~1x the work; the CPU path.
- "ragged": sorted assignments through `jax.lax.ragged_dot` (grouped GEMM on TPU/GPU; on CPU XLA
  lowers it to a masked dense product, E x the work).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax import parallel
from m1jax.config import ModelConfig
from m1jax.layers import param
from m1jax.parallel import expert as expert_parallel

_F32 = jnp.float32


class RouterStats(NamedTuple):
    """Router statistics of one layer: additive ones (summed over valid tokens), and the routes."""

    counts: jax.Array  # [E] top-k assignments per expert (all k choices)
    prob_sum: jax.Array  # [E] sum of router probabilities
    tokens: jax.Array  # [] number of valid tokens
    flips: jax.Array  # [] valid tokens whose replayed experts differ from the router's own top-k (0 unless replaying)
    ids: jax.Array  # [N, k] int32 expert ids of each token (the routes; `M1Model.run(record_routes=True)`)


def switch_aux_loss(stats: RouterStats, num_experts: int) -> jax.Array:
    """E * sum_e f_e * P_e over the pooled (layer, token) rows; equals top-k at perfect balance."""
    n = jnp.maximum(jnp.sum(stats.tokens), 1.0)
    f = jnp.sum(stats.counts.reshape(-1, num_experts), axis=0) / n
    p = jnp.sum(stats.prob_sum.reshape(-1, num_experts), axis=0) / n
    return num_experts * jnp.sum(f * p)


def route(x, w_router, k: int):
    """x [N, D] -> (probs [N, E] fp32, weights [N, k] fp32 renormalised, expert ids [N, k])."""
    logits = jnp.dot(x.astype(_F32), w_router.astype(_F32), precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = jax.lax.top_k(probs, k)
    return probs, weights / jnp.sum(weights, axis=-1, keepdims=True), ids


def route_replay(x, w_router, ids, valid):
    """Routing with given expert ids [N, k] (router replay, R3): the router's probs as in `route`, the
    weights = probs at `ids` renormalised, so the router keeps its gradient through them. Tokens
    not `valid` [N] (padding: no recorded route) take the router's own top-k, so they cannot crowd
    one expert's capacity under expert parallelism. Also returns [N] bool: the token's ids differ
    (as a set) from the router's own top-k."""
    probs, _, own = route(x, w_router, ids.shape[-1])
    ids = jnp.where(valid[..., None], ids.astype(jnp.int32), own)
    w = jnp.take_along_axis(probs, ids, axis=-1)
    flip = jnp.any(jnp.sort(own, axis=-1) != jnp.sort(ids, axis=-1), axis=-1)
    return probs, w / jnp.sum(w, axis=-1, keepdims=True), ids, flip


def _swiglu(x, w1, w3, w2, eq_in: str, eq_out: str):
    h = jax.nn.silu(jnp.einsum(eq_in, x, w1)) * jnp.einsum(eq_in, x, w3)
    return jnp.einsum(eq_out, h, w2)


def experts_dense(x, weights, ids, w1, w3, w2):
    n, e = x.shape[0], w1.shape[0]
    combine = jnp.zeros((n, e), weights.dtype).at[jnp.arange(n)[:, None], ids].add(weights)
    y = _swiglu(x, w1, w3, w2, "nd,edf->enf", "enf,efd->end")  # [E, N, D]
    return jnp.einsum("end,ne->nd", y, combine.astype(y.dtype))


def _sort(ids, num_experts: int):
    """Flatten [N, k] assignments, order them by expert. Returns (order, group sizes)."""
    flat = ids.reshape(-1)
    return jnp.argsort(flat, stable=True), jnp.bincount(flat, length=num_experts)


def _combine(y, weights):
    """[N, k, D] expert outputs -> [N, D] weighted by each token's renormalised router weights."""
    return jnp.einsum("nkd,nk->nd", y, weights.astype(y.dtype))


def experts_ragged(x, weights, ids, w1, w3, w2):
    k = ids.shape[1]
    order, sizes = _sort(ids, w1.shape[0])
    xs = x[order // k]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w1, sizes)) * jax.lax.ragged_dot(xs, w3, sizes)
    y_sorted = jax.lax.ragged_dot(h, w2, sizes)
    return _combine(jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(*ids.shape, -1), weights)


def tile_rows(num_assignments: int, num_experts: int) -> int:
    """Tile height: ~ rows per expert, a power of two in [1, 128] (1 = per-assignment, for decode)."""
    per_expert = max(1, num_assignments // num_experts)
    return min(128, 1 << (per_expert.bit_length() - 1))


def experts_tiled(x, weights, ids, w1, w3, w2, at: tuple = ()):
    """`at`: w1/w3/w2 are stacks over more leading axes and the experts are w*[*at] (see `MoE`);
    forward only."""
    n, k = ids.shape
    e = w1.shape[len(at)]
    nk = n * k
    m = tile_rows(nk, e)
    num_tiles = -(-(nk + e * (m - 1)) // m)  # static bound on sum_e ceil(size_e / m)
    # Buffer row of each assignment: its expert's first tile + its rank within the expert. A
    # running count replaces a sort.
    flat = ids.reshape(-1)
    onehot = (flat[:, None] == jnp.arange(e)).astype(jnp.int32)  # [N*k, E]
    rank = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=1) - 1
    tiles = -(-jnp.sum(onehot, axis=0) // m)  # [E] tiles per expert
    first = jnp.cumsum(tiles) - tiles  # [E] first tile of each expert
    row = first[flat] * m + rank  # [N*k]
    # Rows go in by a gather (faster than a scatter of rows on CPU): each buffer row's source
    # token, with index n (an appended zero row) for padding.
    src = jnp.full((num_tiles * m,), n, jnp.int32).at[row].set(jnp.arange(nk, dtype=jnp.int32) // k)
    buf = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[src]
    if at:
        y = _tiles_forward(buf, w1, w3, w2, first, tiles, m, at=at)
    else:
        y = expert_tiles(buf, w1, w3, w2, first, tiles, m)
    return _combine(y[row].reshape(n, k, -1), weights)


MAX_CHUNK_ROWS = 512  # rows of the largest matmul an expert's tiles are grouped into


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def expert_tiles(buf, w1, w3, w2, first, tiles, m: int):
    """SwiGLU experts on a buffer of tiles sorted by expert: buf [S*m, D], w1/w3 [E, D, F],
    w2 [E, F, D], first/tiles [E] (expert e owns tiles first[e] .. first[e]+tiles[e]-1) -> [S*m, D].

    A scan over experts with loops over each expert's tiles only (dynamic trip counts): weights
    are sliced once per expert, tiles past the last expert's never run (their rows stay zero),
    and the three matmuls of a chunk of tiles sit in one loop body. Tiles are taken in chunks of
    up to MAX_CHUNK_ROWS rows (then halves, quarters, ... for the remainder), since on CPU a
    matmul's efficiency grows with its row count. The custom VJP keeps each expert's weight
    gradient in the loop carry (fp32) and reads the forward's saved pre-activations.
    """
    return _tiles_forward(buf, w1, w3, w2, first, tiles, m)


def _over_chunks(body, carry, t0, count, m: int, num_tiles: int):
    """carry = body(first_row, rows, carry) over tiles t0 .. t0+count-1 of height m: chunks of the
    largest size (a power of two tiles) while they fit, then one chunk per set bit of the rest."""
    top = max(1, min(num_tiles, MAX_CHUNK_ROWS // m))
    sizes = [1 << p for p in reversed(range(top.bit_length()))]  # e.g. [4, 2, 1] tiles
    start = t0
    for level, size in enumerate(sizes):
        n = count // size if level == 0 else (count // size) % 2

        def chunk(i, c, start=start, size=size):
            return body((start + i * size) * m, size * m, c)

        carry = jax.lax.fori_loop(0, n, chunk, carry)
        start = start + n * size
    return carry


def _expert_weight(w, at: tuple, e):
    """w[*at, e] as one dynamic slice of the stacked array w [..., E, a, b]."""
    idx = (*at, e)
    return jax.lax.dynamic_slice(w, (*idx, 0, 0), (1,) * len(idx) + w.shape[-2:]).reshape(w.shape[-2:])


def _tiles_forward(buf, w1, w3, w2, first, tiles, m, keep_hidden: bool = False, at: tuple = ()):
    """-> y [S*m, D], and with keep_hidden the pre-activations (x w1, x w3) [S*m, F] for the VJP.

    at: the experts are w*[*at] of stacks with more leading axes (e.g. [groups, layers, E, D, F]).
    Each expert's matrices are then sliced straight out of the stack: XLA on CPU copies a sliced
    operand before a matmul, and slicing a layer's [E, D, F] first would copy all of its experts
    once more per call (most of a CPU decode step's time)."""
    num_tiles = buf.shape[0] // m
    f = w1.shape[-1]

    def expert(carry, xs):
        e, t0, count = xs
        w1e, w3e, w2e = (_expert_weight(w, at, e).astype(buf.dtype) for w in (w1, w3, w2))

        def body(r, rows, carry):
            out, hidden = carry
            xt = jax.lax.dynamic_slice_in_dim(buf, r, rows)
            a, b = xt @ w1e, xt @ w3e
            out = jax.lax.dynamic_update_slice_in_dim(out, (jax.nn.silu(a) * b) @ w2e, r, 0)
            if keep_hidden:
                put = jax.lax.dynamic_update_slice_in_dim
                hidden = (put(hidden[0], a, r, 0), put(hidden[1], b, r, 0))
            return out, hidden

        return _over_chunks(body, carry, t0, count, m, num_tiles), None

    hidden = (jnp.zeros((buf.shape[0], f), buf.dtype),) * 2 if keep_hidden else ()
    experts = jnp.arange(w1.shape[len(at)])
    out, hidden = jax.lax.scan(expert, (jnp.zeros_like(buf), hidden), (experts, first, tiles))[0]
    return (out, hidden) if keep_hidden else out


def _expert_tiles_fwd(buf, w1, w3, w2, first, tiles, m):
    # Saving the pre-activations costs 2 x [S*m, F] of memory and spares two of the eight matmuls
    # of the backward chunk.
    out, (a, b) = _tiles_forward(buf, w1, w3, w2, first, tiles, m, keep_hidden=True)
    return out, (buf, a, b, w1, w3, w2, first, tiles)


def _expert_tiles_bwd(m, res, dy):
    buf, a_all, b_all, w1, w3, w2, first, tiles = res
    num_tiles = buf.shape[0] // m
    outer = partial(jax.lax.dot_general, dimension_numbers=(((0,), (0,)), ((), ())), preferred_element_type=_F32)

    def expert(dx, xs):
        w1e, w3e, w2e, t0, count = xs

        def body(r, rows, carry):
            dx, g1, g3, g2 = carry
            xt = jax.lax.dynamic_slice_in_dim(buf, r, rows)
            dyt = jax.lax.dynamic_slice_in_dim(dy, r, rows)
            a, b = (jax.lax.dynamic_slice_in_dim(z, r, rows) for z in (a_all, b_all))
            sig = jax.nn.sigmoid(a)
            s = a * sig  # silu(a)
            dh = dyt @ w2e.T
            da = dh * b * sig * (1 + a * (1 - sig))
            db = dh * s
            dxt = da @ w1e.T + db @ w3e.T
            dx = jax.lax.dynamic_update_slice_in_dim(dx, dxt.astype(dx.dtype), r, 0)
            return dx, g1 + outer(xt, da), g3 + outer(xt, db), g2 + outer(s * b, dyt)

        zeros = lambda w: jnp.zeros(w.shape, _F32)
        carry = (dx, zeros(w1e), zeros(w3e), zeros(w2e))
        dx, g1, g3, g2 = _over_chunks(body, carry, t0, count, m, num_tiles)
        return dx, (g1.astype(w1e.dtype), g3.astype(w3e.dtype), g2.astype(w2e.dtype))

    dx, (d1, d3, d2) = jax.lax.scan(expert, jnp.zeros_like(buf), (w1, w3, w2, first, tiles))
    return dx, d1, d3, d2, None, None


expert_tiles.defvjp(_expert_tiles_fwd, _expert_tiles_bwd)


_IMPLS = {"dense": experts_dense, "tiled": experts_tiled, "ragged": experts_ragged}


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """ "auto" -> tiled loops on CPU, ragged_dot on accelerators (`platform`: default the backend's)."""
    if impl != "auto":
        return impl
    return "tiled" if (platform or jax.default_backend()) == "cpu" else "ragged"


class MoE(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, routes: jax.Array | None = None, stacked=None):
        """x [B, T, D], valid [B, T] bool -> (y [B, T, D], RouterStats). routes [B, T, k]: replay
        these experts instead of the router's top-k (`route_replay`). stacked: (w1, w3, w2, at), this
        layer's expert weights as w*[*at] of the model's unsliced layer stacks, for the tiled
        forward to slice each expert from directly (decode; `_tiles_forward`)."""
        c = self.cfg
        dt, pdt = c.compute_dtype, c.params_dtype
        init = nn.initializers.normal(c.initializer_range)
        e, d, f = c.num_local_experts, c.hidden_size, c.intermediate_size
        # The router is fp32 in the published checkpoint whatever param_dtype is.
        w_router = param(self, "router", (d, e), ("embed", "expert"), init, _F32)
        w1 = param(self, "w1", (e, d, f), ("expert", "embed", "mlp"), init, pdt)  # gate
        w3 = param(self, "w3", (e, d, f), ("expert", "embed", "mlp"), init, pdt)  # up
        w2 = param(self, "w2", (e, f, d), ("expert", "mlp", "embed"), init, pdt)  # down

        b, t, _ = x.shape
        impl = _IMPLS[resolve_impl(c.moe_impl)]
        w1, w3, w2 = w1.astype(dt), w3.astype(dt), w2.astype(dt)
        mesh = parallel.active_mesh(c, parallel.EXPERT)
        k = c.num_experts_per_tok
        flip = jnp.zeros((b * t,), bool)
        if mesh is None:
            xf = x.reshape(b * t, d)
            if routes is None:
                probs, weights, ids = route(xf, w_router, k)
            else:
                probs, weights, ids, flip = route_replay(xf, w_router, routes.reshape(b * t, k), valid.reshape(-1))
            if stacked is not None and impl is experts_tiled:
                y = experts_tiled(xf.astype(dt), weights, ids, *stacked[:3], at=stacked[3])
            else:
                y = impl(xf.astype(dt), weights, ids, w1, w3, w2)
        else:  # all-to-all over the expert axis; [B, T] stay as sharded
            if routes is None:
                probs, weights, ids = route(x, w_router, k)
            else:
                probs, weights, ids, flip = route_replay(x, w_router, routes, valid)
                flip = flip.reshape(b * t)
            y = expert_parallel.experts(
                x.astype(dt), weights, ids, w1, w3, w2, expert_fn=impl, mesh=mesh, capacity_factor=c.moe_capacity_factor
            )
            probs, ids = probs.reshape(b * t, e), ids.reshape(b * t, -1)

        vf = valid.reshape(-1).astype(_F32)
        counts = jnp.zeros((e,), _F32).at[ids.reshape(-1)].add(jnp.repeat(vf, ids.shape[1]))
        flips = jnp.sum(flip * vf)
        stats = RouterStats(counts, jnp.sum(probs * vf[:, None], axis=0), jnp.sum(vf), flips, ids.astype(jnp.int32))
        return y.reshape(b, t, d).astype(dt), stats
