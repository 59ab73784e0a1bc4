"""Mesh axes and the mesh context: the ground floor under the kernels, the explicit collectives
(`m1jax.parallel`), the sharding rules (`m1jax.sharding`) and the training steps.

A step traced under `mesh_context(mesh)` (`traced_under`) lets the model's layers ask for the
mesh (`context_mesh`, `active_mesh`) without passing it through every module.
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "expert", "tensor", "sequence")
TENSOR = "tensor"
EXPERT = "expert"
SEQUENCE = "sequence"
BATCH_AXES = ("data", "fsdp", "expert")  # the axes a [B, ...] batch is split over (sharding.DEFAULT_RULES)


def batch_parallel(mesh_shape) -> int:
    """How many ways a batch is split on a mesh of this shape ({axis: size})."""
    n = 1
    for a in BATCH_AXES:
        n *= int(dict(mesh_shape).get(a, 1))
    return n


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
