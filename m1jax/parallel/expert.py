"""Expert parallelism: MoE tokens travel to the shard holding their expert and back (all-to-all).

Experts are split over the `expert` mesh axis (E / ep per shard); tokens are split over the batch
axes (`expert` among them) and `sequence`. Per shard, each top-k assignment of a local token goes
into a send buffer of `ep` slots of `cap` rows (one slot per destination shard, assignments in
token order); an all-to-all swaps the slots, each shard runs its local experts on the rows it
received (any single-device expert kernel of `m1jax.moe`), a second all-to-all returns the outputs,
and each token sums its k outputs with its router weights, exactly as on one device.

`cap` = `capacity_factor` x (local assignments / ep), rounded up; `capacity_factor` 0 means
dropless: cap = all local assignments, the worst case (every token picks experts on one shard).
Assignments past a full slot are dropped (their output is zero, the token keeps its other k-1).
A `tensor` axis splits each expert's FFN width: partial outputs are summed over it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from m1jax import parallel


def capacity(assignments: int, ep: int, capacity_factor: float) -> int:
    """Rows per (source, destination) slot for `assignments` = local tokens x k."""
    if capacity_factor <= 0:
        return assignments
    return max(1, min(assignments, math.ceil(capacity_factor * assignments / ep)))


def experts(x, weights, ids, w1, w3, w2, *, expert_fn, mesh, capacity_factor: float = 0.0):
    """x [B, T, D] tokens, weights / ids [B, T, k] router output, w1 / w3 [E, D, F], w2 [E, F, D] ->
    y [B, T, D] = sum_k weights * expert_{ids}(x), with experts sharded over `mesh`'s "expert" axis.

    expert_fn(x [N, D], weights [N, k], ids [N, k], w1, w3, w2): a single-device expert kernel
    (m1jax.moe), run on each shard's received rows. The [B, T] token dims keep their batch /
    sequence sharding (flattening them across shards would reshard).
    """
    b, t, _ = x.shape
    e = w1.shape[0]
    ep = parallel.axis_size(mesh, parallel.EXPERT)
    if e % ep:
        raise ValueError(f"num_local_experts={e} is not divisible by the expert mesh axis ({ep})")
    tensor = parallel.divides(mesh, parallel.TENSOR, w1.shape[2])
    tokens = P(parallel.batch_spec(mesh, b), parallel.divides(mesh, parallel.SEQUENCE, t), None)
    up, down = P(parallel.EXPERT, None, tensor), P(parallel.EXPERT, tensor, None)

    def local(x, weights, ids, w1, w3, w2):
        bl, tl, d = x.shape
        flat = lambda a: a.reshape(bl * tl, a.shape[-1])
        y = _dispatch_compute_return(
            flat(x), flat(weights), flat(ids), w1, w3, w2, expert_fn, ep, capacity_factor, tensor
        )
        return y.reshape(bl, tl, d)

    fn = jax.shard_map(
        local, mesh=mesh, in_specs=(tokens, tokens, tokens, up, up, down), out_specs=tokens, check_vma=False
    )
    return fn(x, weights, ids, w1, w3, w2)


def _dispatch_compute_return(x, weights, ids, w1, w3, w2, expert_fn, ep: int, capacity_factor: float, tensor):
    """One shard's part: x [n, D], weights / ids [n, k], local experts w* [E/ep, ...] -> [n, D]."""
    n, k = ids.shape
    d = x.shape[1]
    e_loc = w1.shape[0]
    cap = capacity(n * k, ep, capacity_factor)
    flat = ids.reshape(-1)  # [n*k], assignment a = (token a // k, choice a % k)
    dest, local_id = flat // e_loc, flat % e_loc
    onehot = (dest[:, None] == jnp.arange(ep)).astype(jnp.int32)  # [n*k, ep]
    rank = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # order within its destination
    kept = rank < cap
    slot = jnp.where(kept, dest * cap + rank, ep * cap)  # ep * cap: out of range, dropped by the scatter
    token = jnp.arange(n * k, dtype=jnp.int32) // k

    def scatter(fill, values):
        return jnp.full((ep * cap,) + values.shape[1:], fill, values.dtype).at[slot].set(values, mode="drop")

    # Send: rows, their expert on the destination shard, and whether the row is real.
    send_x = scatter(0, x[token]).reshape(ep, cap, d)
    send_id = scatter(0, local_id).reshape(ep, cap)
    send_ok = scatter(False, kept).reshape(ep, cap)
    swap = lambda a: jax.lax.all_to_all(a, parallel.EXPERT, 0, 0)  # slot j <-> shard j
    recv_x, recv_id, recv_ok = swap(send_x), swap(send_id), swap(send_ok)

    rows = recv_x.reshape(ep * cap, d)
    gate = recv_ok.reshape(ep * cap, 1).astype(weights.dtype)  # empty rows contribute zero
    y = expert_fn(rows, gate, recv_id.reshape(ep * cap, 1), w1, w3, w2)  # [ep*cap, D]
    if tensor is not None:  # each tensor shard holds F / tp of every expert's width
        y = jax.lax.psum(y, tensor)
    back = swap(y.reshape(ep, cap, d)).reshape(ep * cap, d)  # back[slot] = output of my assignment

    out = jnp.where(kept[:, None], back[jnp.minimum(slot, ep * cap - 1)], 0).reshape(n, k, d)
    return jnp.einsum("nkd,nk->nd", out, weights.astype(out.dtype))
