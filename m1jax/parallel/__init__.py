"""Explicit collectives for the mesh axes XLA's partitioner handles poorly on its own.

GSPMD shards the dense parts of the model well from the logical-axis rules alone, but an
`expert` axis needs tokens moved to their experts (all-to-all) and a `sequence` axis needs the
lightning state carried across shards (LASP-2) and keys / values shared for softmax attention.
These run as `jax.shard_map` over the mesh of the enclosing `jax.set_mesh` /
`jax.sharding.use_abstract_mesh` (the Trainer and RLTrainer trace their steps under it), so the
model modules call the same functions whatever the mesh:

- `m1jax.parallel.expert.experts`: MoE dispatch over `expert` (all-to-all both ways).
- `m1jax.parallel.sequence.lightning` / `.softmax`: attention over `sequence`.

Without a mesh context, on one device, with the axis of size 1, or with
`ModelConfig.parallel_impl="gspmd"` they are the plain single-device computations.
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import Mesh

TENSOR = "tensor"
EXPERT = "expert"
SEQUENCE = "sequence"
BATCH_AXES = ("data", "fsdp", "expert")  # the axes a [B, ...] activation is split over (sharding.DEFAULT_RULES)


def context_mesh():
    """The abstract mesh of the enclosing mesh context, or None: no context, one device, or inside
    a `shard_map` (its axes are manual there, and the local computation must not shard again)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1 or inside_shard_map():
        return None
    return mesh


def inside_shard_map() -> bool:
    """True while tracing the body of a `shard_map` (the context mesh's axes are manual)."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh is not None and not mesh.empty and bool(mesh.manual_axes)


def axis_size(mesh, name: str) -> int:
    return int(mesh.shape[name]) if mesh is not None and name in mesh.axis_names else 1


def active_mesh(cfg, axis: str):
    """The context mesh when `axis` is > 1 there and `cfg.parallel_impl` asks for explicit
    collectives; else None (the caller computes as on one device and XLA partitions it)."""
    mesh = context_mesh()
    if cfg.parallel_impl != "shard_map" or axis_size(mesh, axis) == 1:
        return None
    return mesh


def batch_spec(mesh, b: int):
    """The mesh axes (from BATCH_AXES, in order) that a batch of `b` rows is split over: those
    that keep dividing b. None if none does."""
    axes, n = [], 1
    for a in BATCH_AXES:
        size = axis_size(mesh, a)
        if size > 1 and b % (n * size) == 0:
            axes.append(a)
            n *= size
    return tuple(axes) or None


def divides(mesh, axis: str, n: int):
    """`axis` if it splits a dimension of size n evenly (and exists with size > 1), else None."""
    size = axis_size(mesh, axis)
    return axis if size > 1 and n % size == 0 else None


def mesh_context(mesh: Mesh):
    """Context manager making `mesh` the context mesh while a step is traced (usable inside
    `jax.jit`); a one-device mesh needs none."""
    if mesh is None or mesh.size == 1:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def traced_under(mesh: Mesh, fn):
    """`fn` tracing under `mesh_context(mesh)`: jit it with the step's shardings, and the model's
    expert / sequence collectives see the mesh."""

    def run(*args, **kwargs):
        with mesh_context(mesh):
            return fn(*args, **kwargs)

    return run
