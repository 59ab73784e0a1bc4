"""Multi-host start-up: `jax.distributed.initialize` from the environment, before any JAX work.

Every process of a multi-host job runs the same command (`launch/`); this call makes them one JAX
runtime (`jax.devices()` then lists every chip, `jax.process_index()` tells hosts apart). Sources,
in order:
- explicit: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID (any cluster);
- SLURM with more than one task (SLURM_NTASKS > 1): JAX reads the SLURM variables itself;
- a TPU pod slice (TPU_WORKER_HOSTNAMES lists more than one worker): JAX asks the TPU metadata.
Anything else is a single-process run and nothing is initialised.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger("m1jax")


def init_kwargs(env: Mapping[str, str]) -> dict | None:
    """The `jax.distributed.initialize` arguments the environment asks for, or None (one process)."""
    addr = env.get("JAX_COORDINATOR_ADDRESS", "")
    if addr:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k, "").strip().isdigit()]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS={addr!r} is set, so {missing} must be set to integers too")
        n, i = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        if not 0 <= i < n:
            raise ValueError(f"JAX_PROCESS_ID={i} must lie in [0, JAX_NUM_PROCESSES={n})")
        return {"coordinator_address": addr, "num_processes": n, "process_id": i}
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return {}  # jax's SLURM cluster detection fills in everything
    workers = [w for w in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if w.strip()]
    if len(workers) > 1:
        return {}  # jax's TPU cluster detection
    return None


def initialize(env: Mapping[str, str] | None = None) -> bool:
    """Join the multi-host runtime if the environment describes one; True if it did."""
    kwargs = init_kwargs(os.environ if env is None else env)
    if kwargs is None:
        return False
    import jax

    jax.distributed.initialize(**kwargs)
    log.info(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices")
    return True
