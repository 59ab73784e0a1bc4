"""One table per attention kind of its implementations: where each runs, its block size, how it
meets sharded arrays, and where its code lives (imported on first use).

Config validation (`ModelConfig.lightning_impl` / `softmax_impl`), dispatch (`m1jax.kernels`) and
the benchmarks read these tables. Adding a kernel: its folder (reference, kernel, VJP, tests side
by side) and one row here; `"auto"` is not a row, it resolves per platform (`m1jax.kernels`).
"""

from __future__ import annotations

import dataclasses
import importlib

ANY = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    platforms: tuple[str, ...]  # backends it compiles for (any backend in interpret mode)
    entry: str  # "module:function"; "" for a name that only picks another row (pallas_gpu)
    block_size: int | None = None  # default chunk length; None: the implementation has no blocks
    max_block: int | None = None  # chunk cap (registers / tiles), whatever is asked for
    pallas: bool = False  # a Pallas call: XLA cannot partition it, so it runs per device shard
    # When the per-device run may use custom_partitioning (else shard_map under a mesh context):
    # "always", "interpret" (only in interpret mode) or "compiled" (only outside it).
    partitionable: str = "always"
    summary: str = ""

    def load(self):
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)

    def chunk(self, block_size: int | None, t: int) -> int:
        """The chunk length a call with `block_size` (None: the default) runs at on `t` tokens."""
        c = block_size or self.block_size or t
        return max(1, min(c, self.max_block or c, t))

    def can_partition(self, interpret: bool) -> bool:
        return {"always": True, "interpret": interpret, "compiled": not interpret}[self.partitionable]


def _table(*impls: Impl) -> dict[str, Impl]:
    return {i.name: i for i in impls}


_L = "m1jax.kernels.lightning"
LIGHTNING = _table(
    Impl("reference", ANY, f"{_L}.reference:lightning_chunked", 256,
         summary="blocked jnp form (SPEC 1.2): per-block matmuls, lax.scan over the fp32 state"),
    Impl("recurrent", ANY, f"{_L}.reference:lightning_recurrence",
         summary="the token recurrence: ground truth for the tests, never picked by auto"),
    Impl("pallas_tpu", ("tpu",), f"{_L}.pallas_tpu:forward", 256, pallas=True, partitionable="interpret",
         summary="Mosaic TPU kernel, grid (B, H, T/C), fp32 state in VMEM (custom_partitioning is broken on TPU)"),
    Impl("pallas_gpu", ("gpu",), "", 64, max_block=64, pallas=True,
         summary="picks pallas_mgpu (Hopper, 16-bit, Dk and Dv in {64, 128}) or else pallas_triton"),
    Impl("pallas_mgpu", ("gpu",), f"{_L}.pallas_mgpu:forward", 64, max_block=64, pallas=True,
         partitionable="compiled", summary="Mosaic GPU (Hopper): TMA, wgmma, chunk-parallel spans"),
    Impl("pallas_triton", ("gpu",), f"{_L}.pallas_triton:forward", 64, max_block=64, pallas=True,
         summary="backend-neutral Pallas lowered by Triton, chunk-parallel spans (older GPUs, fp32)"),
)  # fmt: skip

SOFTMAX = _table(
    Impl("flash", ANY, "m1jax.kernels.softmax.flash:flash_attention", 256,
         summary="FlashAttention-2-style jnp loops over key blocks with a custom VJP (what auto picks)"),
    Impl("blocked", ANY, "m1jax.kernels.softmax.reference:causal_attention",
         summary="query blocks over the causal triangle, plain autodiff: the flash loop's reference"),
)  # fmt: skip

LIGHTNING_IMPLS = ("auto", *LIGHTNING)
SOFTMAX_IMPLS = ("auto", *SOFTMAX)


def lookup(table: dict[str, Impl], name: str, what: str) -> Impl:
    if name not in table:
        raise ValueError(f"unknown {what} impl {name!r}; expected one of {['auto', *table]}")
    return table[name]
