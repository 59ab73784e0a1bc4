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
from m1jax.model import abstract_params, param_axes

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Tensor parallelism over heads / expert FFN width / vocabulary, FSDP over the model width,
# expert parallelism over experts; the scanned layer axis stays whole.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
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


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules=DEFAULT_RULES):
    """A pytree of NamedShardings matching `init_params(cfg, ...)`.

    Raises ValueError naming the parameter when a sharded dimension does not divide evenly.
    """
    specs = nn.logical_to_mesh(param_axes(cfg), rules)
    shapes = nn.unbox(abstract_params(cfg))
    is_spec = lambda x: isinstance(x, PartitionSpec)

    def check(path, spec, shape):
        for dim, (size, axes) in enumerate(zip(shape.shape, tuple(spec) + (None,) * len(shape.shape), strict=False)):
            parts = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())]))
            if size % parts:
                raise ValueError(
                    f"param {jax.tree_util.keystr(path)} dim {dim} (size {size}) is not divisible by mesh axes "
                    f"{axes} of size {parts}; change the mesh or the sharding rules"
                )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(check, specs, shapes, is_leaf=is_spec)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a [B, T] token batch: B over the data-parallel axes."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", None), rules))
