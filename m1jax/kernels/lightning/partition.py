"""Run the Pallas lightning kernels on sharded arrays: per device, on its [B/n, H/m, T, D] shard.

XLA cannot partition a Mosaic (or Triton) custom call, so under a multi-device mesh a bare
`pallas_call` fails to compile ("wrap the call in a shard_map"). Lightning attention is independent
per (batch row, head), so the kernel runs unchanged on local shards:

- with a mesh context (`jax.set_mesh(mesh)` around the jitted call): `shard_map`, batch over the
  mesh axes other than "tensor" that divide B, heads over "tensor" (the layout of
  `m1jax.sharding.DEFAULT_RULES`); XLA reshards other layouts at the boundary.
- without one: `custom_partitioning` lets XLA's partitioner pick the batch/head sharding of q (CPU
  and GPU). It is not wired through on TPU (jax-ml/jax#38196), so there the kernel is called as is:
  fine on one device; `resolve_lightning_impl("auto")` falls back to the reference on a
  multi-device TPU without a mesh context.
Sequence sharding (LASP-2, SPEC 4) belongs to the model, not the kernel.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from m1jax.mesh import context_mesh


def _batch_head_specs(sharding, segmented: bool):
    spec = tuple(getattr(sharding, "spec", ())) + (None, None)
    b, h = spec[0], spec[1]
    mesh = sharding.mesh
    four = NamedSharding(mesh, P(b, h, None, None))
    args = [four, four, four, NamedSharding(mesh, P(h)), four]
    if segmented:
        args.append(NamedSharding(mesh, P(b, None)))
    return mesh, tuple(args), (four, four)


def _shardable(core, segmented: bool):
    if segmented:

        def call(q, k, v, slopes, h0, runs):
            return core(q, k, v, slopes, h0, runs)

    else:

        def call(q, k, v, slopes, h0):
            return core(q, k, v, slopes, h0, None)

    fn = custom_partitioning(call)

    def infer(mesh, arg_shapes, result_shape):
        return _batch_head_specs(arg_shapes[0].sharding, segmented)[2]

    def partition(mesh, arg_shapes, result_shape):
        mesh, args, outs = _batch_head_specs(arg_shapes[0].sharding, segmented)
        return mesh, call, outs, args

    rule = "b h t k, b h t k, b h t v, h, b h k v" + (", b t" if segmented else "") + " -> b h t v, b h k v"
    fn.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=("t", "k", "v"),
    )
    return fn


def _shard_map_specs(mesh, b: int, h: int):
    tensor = "tensor" if "tensor" in mesh.axis_names and h % mesh.shape["tensor"] == 0 else None
    batch, n = [], 1
    for a in mesh.axis_names:
        if a != "tensor" and mesh.shape[a] > 1 and b % (n * mesh.shape[a]) == 0:
            batch.append(a)
            n *= mesh.shape[a]
    bspec = tuple(batch) if batch else None
    four = P(bspec, tensor, None, None)
    return four, P(tensor), P(bspec, None)


def _sharded(core, q, k, v, slopes, h0, runs, mesh):
    four, head, rows = _shard_map_specs(mesh, q.shape[0], q.shape[1])
    args, specs = [q, k, v, slopes, h0], [four, four, four, head, four]
    if runs is not None:
        args.append(runs)
        specs.append(rows)

    def local(q, k, v, slopes, h0, runs=None):
        return core(q, k, v, slopes, h0, runs)

    fn = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=(four, four), check_vma=False)
    return fn(*args)


@functools.cache
def shardable(forward, partitionable: bool = True, **kw):
    """`forward(q, k, v, slopes, h0, runs, **kw)` (head-major) as a core that runs on sharded arrays.

    partitionable: use `custom_partitioning` when there is no mesh context (False for Mosaic TPU).
    """
    core = functools.partial(forward, **kw)
    plain, seg = (_shardable(core, False), _shardable(core, True)) if partitionable else (None, None)

    def run(q, k, v, slopes, h0, runs):
        mesh = context_mesh()
        if mesh is not None:
            return _sharded(core, q, k, v, slopes, h0, runs, mesh)
        if not partitionable or not jax.sharding.get_abstract_mesh().empty:  # a one-device mesh context
            return core(q, k, v, slopes, h0, runs)
        return plain(q, k, v, slopes, h0) if runs is None else seg(q, k, v, slopes, h0, runs)

    return run
