"""Fixtures for every test under the repository (tests/ and the kernel folders in m1jax/)."""

import gc

import pytest


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
