"""Moving arrays between the host, the learner's mesh and the rollout mesh, on one host or many.

With several processes, the obvious calls run collectives the RL loop cannot afford: `jax.device_put`
of a host array checks that every process passes the same value (an all-gather over every device),
and `jax.device_put` between meshes that share no devices is refused off TPU. These helpers do the
same moves from each process's own shards. With one process they are the plain calls.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def copy_to(tree, shardings):
    """A copy of `tree` (jax.Arrays) laid out by `shardings` on other devices: how a version of the
    params reaches the rollout mesh. Within one process that is `jax.device_put`. Across processes
    jax's device_put only reshards over the same devices (the learner and rollout meshes share none),
    so each process copies its own part: every target shard it holds is taken from a source shard it
    holds (a local device-to-device copy, nothing crosses hosts) and the global arrays are assembled
    from those shards (`jax.make_array_from_single_device_arrays`). A leaf where some process holds
    no source for one of its target shards (say, the learner shards it over hosts but the rollouts
    replicate it) is first replicated over its own mesh: a collective of the source devices, decided
    alike by every process from the two layouts."""
    return jax.tree.map(_copy_leaf, tree, shardings)


def _copy_leaf(x: jax.Array, s: jax.sharding.Sharding) -> jax.Array:
    if x.is_fully_addressable and s.is_fully_addressable:
        return jax.device_put(x, s)
    if not _each_process_holds_its_part(x.sharding, s, x.shape):
        x = jax.device_put(x, NamedSharding(x.sharding.mesh, PartitionSpec()))  # same devices: supported
    want = s.addressable_devices_indices_map(x.shape)
    have = [(_bounds(sh.index, x.shape), sh.data) for sh in x.addressable_shards]
    arrays = []
    for dev, index in want.items():
        box = _bounds(index, x.shape)
        (lo, hi), data = next((b, d) for b, d in have if _contains(b, box))
        if box != (lo, hi):  # a part of that shard
            data = data[tuple(slice(a - o, e - o) for a, e, o in zip(*box, lo, strict=True))]
        arrays.append(jax.device_put(data, dev, may_alias=False))  # never the learner's buffer: it is donated
    return jax.make_array_from_single_device_arrays(x.shape, s, arrays)


def _bounds(index, shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, stop) per dimension of a shard's index (a tuple of slices)."""
    spans = [sl.indices(n)[:2] for sl, n in zip(index, shape, strict=True)]
    return tuple(a for a, _ in spans), tuple(b for _, b in spans)


def _contains(outer, inner) -> bool:
    return all(a <= c and d <= b for a, b, c, d in zip(*outer, *inner, strict=True))


def _each_process_holds_its_part(src, dst, shape) -> bool:
    """Whether every process holds, among its shards of `src`, a shard containing each of its shards
    of `dst` (global layouts only: every process gets the same answer)."""
    have = {}
    for d, index in src.devices_indices_map(shape).items():
        have.setdefault(d.process_index, []).append(_bounds(index, shape))
    return all(
        any(_contains(box, _bounds(index, shape)) for box in have.get(d.process_index, ()))
        for d, index in dst.devices_indices_map(shape).items()
    )


def shard_rows(trainer, arrays: dict) -> dict:
    """`trainer.shard_rows` (host rows [B, ...], the same on every process -> row-sharded global
    arrays) without a collective. With several processes `jax.device_put` of a host array first
    checks that every process passes the same value: an all-gather over every device, launched here
    while this step's log-prob forwards still run. On a learner mesh of one device per process the
    XLA CPU client orders that all-gather (a launch on several local devices) against neither the
    forwards nor the updates (one-device launches), while both use the gloo communicator of the
    learner's devices: the processes then pair different collectives ("Received data size doesn't
    match expected size", seen with 2 processes x mesh data=2). The rows are the same on every
    process by construction (fetched from replicated arrays, scored by the same code)."""
    if jax.process_count() == 1:
        return trainer.shard_rows(arrays)
    return {
        k: jax.make_array_from_callback(v.shape, trainer.row_sharding(v.ndim), lambda index, v=v: v[index])
        for k, v in arrays.items()
    }


def to_host(trainer, x: jax.Array) -> np.ndarray:
    """A learner array as one host array on every process. Rows sharded over several processes are
    first replicated on the learner's mesh: a program of the learner's, run in order with its others
    on every process (not `multihost_utils.process_allgather`, an all-gather over every device: see
    `shard_rows`)."""
    if not x.is_fully_addressable and not x.is_fully_replicated:
        x = jax.device_put(x, trainer.replicated)
    return np.asarray(x)
