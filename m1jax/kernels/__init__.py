"""Compute kernels behind one stable signature each; `impl` picks a row of `registry`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m1jax.kernels import lightning as _lightning
from m1jax.kernels import registry
from m1jax.kernels.lightning.partition import shardable
from m1jax.mesh import context_mesh, inside_shard_map

# Below this length a kernel launch does not pay off over the jnp blocked form.
MIN_KERNEL_LENGTH = 128


def resolve_lightning_impl(
    impl: str, t: int | None = None, platform: str | None = None, devices: int | None = None
) -> str:
    """ "auto" -> the Pallas kernel of the platform (TPU, GPU), else the jnp reference.

    Short sequences (t < MIN_KERNEL_LENGTH) and CPU use the reference; decode never comes here (the
    model steps the recurrence directly).
    """
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    if t is not None and t < MIN_KERNEL_LENGTH:
        return "reference"
    devices = jax.device_count() if devices is None else devices
    if platform == "tpu" and devices > 1 and context_mesh() is None and not inside_shard_map():
        return "reference"  # Mosaic needs shard_map, which needs the mesh: see kernels/lightning/partition.py
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu"}.get(platform, "reference")


def _is_hopper() -> bool:
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


def gpu_kernel(dtype, dk: int, dv: int, interpret: bool = False) -> str:
    """Which GPU kernel "pallas_gpu" runs: Mosaic GPU on Hopper (sm_90) for 16-bit inputs with Dk and
    Dv each 64 or 128 (`pallas_mgpu.supports`), else the Triton kernel (older GPUs, fp32, other head
    sizes).

    In interpret mode Mosaic GPU needs jax >= 0.11 (its interpreter runs wgmma there)."""
    from m1jax.kernels.lightning import pallas_mgpu

    if not pallas_mgpu.supports(dtype, dk, dv):
        return "pallas_triton"
    ok = pallas_mgpu.interpret_available() if interpret else _is_hopper()
    return "pallas_mgpu" if ok else "pallas_triton"


def _kernel_call(spec: registry.Impl, interpret, q, k, v, slopes, initial_state, segment_ids, **kw):
    """A Pallas lightning kernel on [B, T, H, D] inputs: head-major, run per device shard, with the
    backward of `vjp.py` (three forward calls)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    hm = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, H, D] <-> [B, H, T, D]
    h0 = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else initial_state
    runs = None if segment_ids is None else _lightning.run_ids(segment_ids)
    core = shardable(spec.load(), partitionable=spec.can_partition(interpret), interpret=interpret, **kw)
    out, final = _lightning.lightning_vjp(core, hm(q), hm(k), hm(v), slopes, h0, runs)
    return hm(out), final


def lightning_attention(
    q, k, v, slopes, *, initial_state=None, segment_ids=None, impl="reference", block_size=None, interpret=False
):
    """Causal lightning attention.

    Args:
      q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; slopes: [H] (decay exp(-slope) per token; constants,
        they get no gradient from the kernels).
      initial_state: optional fp32 [B, H, Dk, Dv] state entering the first token.
      segment_ids: optional [B, T] ids; attention and state stay inside each contiguous run.
      impl: a row of `registry.LIGHTNING` ("reference", "recurrent", "pallas_tpu", "pallas_gpu",
        "pallas_mgpu", "pallas_triton") or "auto" (`resolve_lightning_impl`).
      block_size: chunk length; None picks the implementation's default.
      interpret: run a Pallas kernel in interpret mode (any backend, for tests).
    Returns:
      (out [B, T, H, Dv] in q's dtype, final_state fp32 [B, H, Dk, Dv]).
    """
    impl = resolve_lightning_impl(impl, q.shape[1])
    if impl == "pallas_gpu":
        impl = gpu_kernel(q.dtype, q.shape[-1], v.shape[-1], interpret)
    spec = registry.lookup(registry.LIGHTNING, impl, "lightning")
    kw = dict(initial_state=initial_state, segment_ids=segment_ids)
    if spec.block_size is not None:  # blocked forms; a kernel caps it at its max_block itself
        kw["block_size"] = block_size or spec.block_size
    if not spec.pallas:
        return spec.load()(q, k, v, slopes, **kw)
    return _kernel_call(spec, interpret, q, k, v, slopes, **kw)


def softmax_attention(q, k, v, runs=None, *, impl: str = "auto"):
    """Causal GQA softmax attention: q [B, T, H, D], k / v [B, T, G, D], runs [B, T] document ids
    (None: one document). impl: a row of `registry.SOFTMAX` or "auto" (the flash loop)."""
    spec = registry.lookup(registry.SOFTMAX, "flash" if impl == "auto" else impl, "softmax")
    return spec.load()(q, k, v, runs)


LIGHTNING_IMPLS = registry.LIGHTNING_IMPLS

__all__ = [
    "LIGHTNING_IMPLS",
    "gpu_kernel",
    "lightning_attention",
    "registry",
    "resolve_lightning_impl",
    "softmax_attention",
]
