"""Ahead-of-time checks without hardware.

TPU: the Mosaic kernel, forward and backward, lowers and compiles for a TPU v5p topology on this
CPU machine (libtpu + `jax.experimental.topologies`); the compiled program must contain the
kernels. GPU: the Mosaic GPU kernels (Hopper) and the Triton kernels lower for CUDA (via
`jax.export`): Pallas -> Mosaic GPU / Triton IR, layouts, wgmma and TMA shapes, SMEM use. Compiling
them to PTX needs a GPU, so these are lowering checks only. Each check also runs under a global
`jax_default_matmul_precision="highest"`, which the kernels' dots must not inherit (Mosaic TPU
rejects an fp32 contract precision on bf16 operands).
"""

import contextlib
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from m1jax.kernels import lightning_attention

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # pytest -n 2: each worker loads libtpu

B, T, H, D = 1, 2000, 8, 128  # T not a multiple of the block: the ragged tail is compiled too
SLOPES = jnp.linspace(0.9, 1e-4, H)


def _precision(name):
    """The global matmul precision for one test ("default": unset), scoped so it cannot leak."""
    return contextlib.nullcontext() if name == "default" else jax.default_matmul_precision(name)


def _loss(impl, segmented, q, k, v, h0, ids):
    o, s = lightning_attention(q, k, v, SLOPES, initial_state=h0, segment_ids=ids if segmented else None, impl=impl)
    return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s)


def _args(dtype, sharding=None):
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    qkv = [sds((B, T, H, D), dtype)] * 3
    return qkv + [sds((B, H, D, D), jnp.float32), sds((B, T), jnp.int32)]


def _topology():
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu")  # 4 chips


@pytest.fixture(scope="module")
def v5p():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install 'jax[tpu]'); .ci/run installs it")
    mesh = jax.sharding.Mesh([[_topology().devices[0]]], ("x", "y"))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


# "highest" only with segments (the dots are the same without them): each compile costs ~4 s; the
# forward-only and sharded tests below compile the same kernel and stay at the default.
_V5P_CASES = [("default", False), ("default", True), ("highest", True)]


@pytest.mark.slow
@pytest.mark.parametrize("precision,segmented", _V5P_CASES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_kernel_compiles_for_v5p_forward_and_backward(v5p, precision, segmented, dtype):
    grad = jax.value_and_grad(lambda *a: _loss("pallas_tpu", segmented, *a), argnums=(0, 1, 2, 3))
    with _precision(precision):
        compiled = jax.jit(grad).lower(*_args(dtype, v5p)).compile()
    text = compiled.as_text()
    # One forward kernel and three backward calls, all Mosaic.
    assert text.count('custom_call_target="tpu_custom_call"') == 4
    assert "lightning_fwd_tpu" in text
    mem = compiled.memory_analysis()
    assert mem is not None and mem.temp_size_in_bytes < 64 * 2**20  # linear in T: no [T, T] buffers


def test_tpu_forward_only_is_one_kernel(v5p):
    f = jax.jit(lambda q, k, v: lightning_attention(q, k, v, SLOPES, impl="pallas_tpu", block_size=128))
    text = f.lower(*_args(jnp.bfloat16, v5p)[:3]).compile().as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 1


def _abstract_h100():
    """Newer jax asks which GPU to lower for when none is attached: an abstract H100."""
    try:
        from jax._src.mesh import AbstractDevice

        device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
        return jax.sharding.use_abstract_mesh(mesh)
    except (ImportError, TypeError, AttributeError):  # jax 0.10 lowers without one
        return contextlib.nullcontext()


@pytest.mark.parametrize("precision", ["default", "highest"])
@pytest.mark.parametrize("segmented", [False, True])
def test_gpu_kernels_lower_for_cuda(segmented, precision):
    pytest.importorskip("jax.experimental.pallas.triton")
    grad = jax.value_and_grad(lambda *a: _loss("pallas_triton", segmented, *a), argnums=(0, 1, 2, 3))
    disabled = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with _abstract_h100(), _precision(precision):
        exported = jax.export.export(jax.jit(grad), platforms=["cuda"], disabled_checks=disabled)(*_args(jnp.bfloat16))
    text = exported.mlir_module()
    assert "__gpu$xla.gpu.triton" in text
    assert "lightning_span_states" in text and "lightning_span_outputs" in text


@pytest.mark.parametrize("precision", ["default", "highest"])
@pytest.mark.parametrize("segmented", [False, True])
def test_mosaic_gpu_kernels_lower_for_cuda(segmented, precision):
    """Forward and backward at the M1 head size: 2 kernels x (1 forward + 3 backward calls), where
    jax may share one lowered function between the two backward calls of equal shapes."""
    import re

    grad = jax.value_and_grad(lambda *a: _loss("pallas_mgpu", segmented, *a), argnums=(0, 1, 2, 3))
    disabled = [jax.export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")]
    with _abstract_h100(), _precision(precision):
        exported = jax.export.export(jax.jit(grad), platforms=["cuda"], disabled_checks=disabled)(*_args(jnp.bfloat16))
    text = exported.mlir_module()
    calls = re.findall(r"stablehlo.custom_call @mosaic_gpu_v2\(([^)]*)\)", text)
    arity = sorted(len(c.split(",")) for c in calls)  # span states: k, v, w, g; outputs: 9 operands
    assert len(calls) >= 6 and set(arity) == {4, 9} and arity.count(4) == arity.count(9)


def test_tpu_kernel_compiles_sharded_over_batch_and_heads(v5p):
    """4 v5p chips, batch over "data" and heads over "tensor" inside `jax.set_mesh`: the kernel runs
    on local shards (shard_map), so the program has the 4 Mosaic calls and no gathers."""
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.Mesh(np.array(_topology().devices).reshape(2, 2), ("data", "tensor"))
    sh = NamedSharding(mesh, P("data", None, "tensor", None))
    qkv = [jax.ShapeDtypeStruct((4, T, H, D), jnp.bfloat16, sharding=sh)] * 3

    def loss(q, k, v):
        return jnp.sum(lightning_attention(q, k, v, SLOPES, impl="pallas_tpu")[0].astype(jnp.float32) ** 2)

    with jax.set_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), out_shardings=(sh,) * 3).lower(*qkv).compile().as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 4
    assert "all-gather" not in text and "all-to-all" not in text
