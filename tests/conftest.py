"""Shared test helpers. Tests run on CPU in fp32 unless they say otherwise."""

import os

import numpy as np

# 8 host devices for the sharding tests; set before JAX initialises its backend.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# Tests run on CPU. With libtpu installed (for the TPU AOT tests) JAX would otherwise probe for a TPU in
# every process; and parallel workers may each load libtpu for the AOT topology (its lockfile forbids that).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: relative to the scale of the reference logits."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
