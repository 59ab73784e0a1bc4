"""Shared test helpers. Tests run on CPU in fp32 unless they say otherwise."""

import numpy as np

# The JAX environment (8 host devices, CPU only) is set by the root conftest.py, loaded first.


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: relative to the scale of the reference logits."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
