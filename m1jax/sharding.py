"""Logical axis names -> device mesh axes.

Every parameter is annotated with logical names ("embed", "heads", "expert", "layers", ...); a
rule table maps them onto the axes of a `jax.sharding.Mesh`. Changing the parallelism layout means
changing the rules, never the modules.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m1jax.config import ModelConfig
from m1jax.mesh import BATCH_AXES, MESH_AXES
from m1jax.model import abstract_params

# Tensor parallelism over heads / expert FFN width / vocabulary, FSDP over the model width,
# expert parallelism over experts, sequence parallelism over the tokens of a row ("length");
# the scanned layer axis stays whole. Parameters (and their optimizer moments) are also split
# over "sequence" along the model width, FSDP-style: the sequence shards of a row would
# otherwise each hold a full copy.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("length", "sequence"),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "sequence")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("layers", None),
    ("sublayers", None),
    ("norm", None),
)


def make_mesh(shape: dict[str, int], devices=None) -> Mesh:
    """A mesh over `MESH_AXES`, e.g. make_mesh({"fsdp": 4, "tensor": 2}); missing axes have size 1."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; expected a subset of {MESH_AXES}")
    dims = tuple(shape.get(a, 1) for a in MESH_AXES)
    devices = jax.devices() if devices is None else devices
    if int(np.prod(dims)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, dims, strict=True))} needs {int(np.prod(dims))} devices, have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(dims), MESH_AXES)


def tree_shardings(boxed, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree whose leaves are boxed with logical axes (`nn.Partitioned`,
    e.g. parameters and the optimizer moments derived from them); unboxed leaves are replicated.

    Raises ValueError naming the leaf when a sharded dimension does not divide evenly.
    """
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)
    shapes = nn.unbox(boxed)
    is_spec = lambda x: isinstance(x, PartitionSpec)

    def check(path, spec, shape):
        for dim, (size, axes) in enumerate(zip(shape.shape, tuple(spec) + (None,) * len(shape.shape), strict=False)):
            parts = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())]))
            if size % parts:
                raise ValueError(
                    f"{jax.tree_util.keystr(path)} dim {dim} (size {size}) is not divisible by mesh axes "
                    f"{axes} of size {parts}; change the mesh or the sharding rules"
                )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(check, specs, shapes, is_leaf=is_spec)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules=DEFAULT_RULES):
    """A pytree of NamedShardings matching `init_params(cfg, ...)` (errors name the parameter)."""
    return tree_shardings(abstract_params(cfg), mesh, rules)


def mesh_from_config(axes: dict[str, int], devices=None) -> Mesh:
    """A mesh from axis sizes where one axis may be -1 (all remaining devices); without -1 the
    mesh may be smaller than the machine (the first devices)."""
    devices = jax.devices() if devices is None else devices
    sizes = {a: int(n) for a, n in axes.items()}
    free = [a for a, n in sizes.items() if n == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {free}")
    fixed = int(np.prod([n for n in sizes.values() if n != -1]))
    if free:
        if len(devices) % fixed:
            raise ValueError(f"mesh {sizes}: {len(devices)} devices are not divisible by the fixed axes ({fixed})")
        sizes[free[0]] = len(devices) // fixed
    elif fixed < len(devices):
        devices = devices[:fixed]  # a mesh smaller than the machine uses its first devices
    return make_mesh(sizes, devices)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a [B, T] token batch: B over the data-parallel axes, T over "sequence"."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))
