"""Shared test helpers. Tests run on CPU in fp32 unless they say otherwise."""

import os

import numpy as np

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: relative to the scale of the reference logits."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
