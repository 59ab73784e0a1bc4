"""Fixtures for every test under the repository (tests/ and the kernel folders in m1jax/)."""

import gc
import os

import pytest

# Set before any test module imports JAX (the m1jax/ kernel tests are collected before tests/, and
# JAX reads JAX_PLATFORMS when it is imported): 8 host devices for the sharding tests; CPU only,
# so a process with libtpu installed does not probe for a TPU, and parallel workers may each load
# libtpu for the TPU AOT tests (its lockfile would forbid that).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code():
    """Drop JAX's compiled executables after each test module.

    A pytest worker runs hundreds of modules, and every CPU executable keeps its own memory mappings:
    without this a full run reaches the kernel's mapping limit (vm.max_map_count, 65530), and LLVM then
    fails with "Cannot allocate memory" or the worker segfaults.
    """
    yield
    import jax

    jax.clear_caches()
    gc.collect()
