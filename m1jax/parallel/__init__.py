"""Explicit collectives for the mesh axes XLA's partitioner handles poorly on its own.

GSPMD shards the dense parts of the model well from the logical-axis rules alone, but an
`expert` axis needs tokens moved to their experts (all-to-all) and a `sequence` axis needs the
lightning state carried across shards (LASP-2) and keys / values shared for softmax attention.
These run as `jax.shard_map` over the mesh of the enclosing `jax.set_mesh` /
`jax.sharding.use_abstract_mesh` (the Trainer and RLTrainer trace their steps under it; the mesh
helpers live in `m1jax.mesh` and are handed on here), so the model modules call the same functions
whatever the mesh:

- `m1jax.parallel.expert.experts`: MoE dispatch over `expert` (all-to-all both ways).
- `m1jax.parallel.sequence.lightning` / `.softmax`: attention over `sequence`.

Without a mesh context, on one device, with the axis of size 1, or with
`ModelConfig.parallel_impl="gspmd"` they are the plain single-device computations.
"""

from __future__ import annotations

from m1jax.mesh import (
    BATCH_AXES,
    EXPERT,
    SEQUENCE,
    TENSOR,
    active_mesh,
    axis_size,
    batch_spec,
    context_mesh,
    divides,
    inside_shard_map,
    mesh_context,
    traced_under,
)

__all__ = [
    "BATCH_AXES",
    "EXPERT",
    "SEQUENCE",
    "TENSOR",
    "active_mesh",
    "axis_size",
    "batch_spec",
    "context_mesh",
    "divides",
    "inside_shard_map",
    "mesh_context",
    "traced_under",
]
