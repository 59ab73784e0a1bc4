"""Host-side settings for running on CPU: huge pages for malloc, and XLA CPU compiler options.

Huge pages. XLA's CPU runtime allocates each step's temporaries as one block (2.5 GB for the ~100M
benchmark model at T = 2048) and frees it when the step ends. glibc serves a block that large with
a fresh `mmap`, and the kernel faults it in 4 KB at a time: ~600K page faults and ~0.9 s of kernel
time per 2.5 s step on a 2-core machine (`perf stat`). glibc >= 2.35 can ask for transparent huge
pages instead (the `glibc.malloc.hugetlb=1` tunable: `madvise(MADV_HUGEPAGE)` on what it maps),
which cuts the faults 512-fold and the TLB misses of every large buffer. Tunables are read when a
process starts, so `reexec_with_hugepages()` re-runs the command line with the tunable set; the CLIs
call it first. For a notebook, start its kernel with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in the
environment. Set M1JAX_HUGEPAGES=0 to leave malloc alone.
"""

from __future__ import annotations

import functools
import os
import platform
import sys

_TUNABLE = "glibc.malloc.hugetlb"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_at_least(major: int, minor: int) -> bool:
    lib, version = platform.libc_ver()
    try:
        return lib == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (major, minor)
    except ValueError:
        return False


def _thp_available() -> bool:
    try:
        with open(_THP) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def hugepages_env(environ=None) -> dict[str, str] | None:
    """`environ` (default os.environ) with glibc's huge-page malloc tunable added, or None where it
    does not apply: not Linux with glibc >= 2.35 and THP, M1JAX_HUGEPAGES=0, or already set."""
    env = dict(os.environ if environ is None else environ)
    tunables = env.get("GLIBC_TUNABLES", "")
    if env.get("M1JAX_HUGEPAGES", "1") == "0" or _TUNABLE in tunables:
        return None
    if not (sys.platform.startswith("linux") and _glibc_at_least(2, 35) and _thp_available()):
        return None
    env["GLIBC_TUNABLES"] = f"{tunables}:{_TUNABLE}=1" if tunables else f"{_TUNABLE}=1"
    return env


def reexec_with_hugepages() -> None:
    """Replace this process by the same command line with huge-page malloc, where that applies.
    Call before any other work (the new process starts from scratch); returns if nothing to do."""
    env = hugepages_env()
    argv = getattr(sys, "orig_argv", None)
    if env is None or not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


# YNNPACK (XLA's CPU library for dots, elementwise ops and reductions) for single dots only: the
# ~100M benchmark model's training step runs 3-8% faster than with XLA's default, which also hands
# fused reductions (the norm-scale gradients, the loss) to YNNPACK. The probe drops the option
# where this jaxlib does not know it.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def cpu_compiler_options() -> dict[str, str]:
    """Options for `jax.jit(..., compiler_options=...)` of CPU programs ({} if unsupported)."""
    import jax
    import jax.numpy as jnp

    try:
        jax.jit(lambda x: x @ x, compiler_options=_CPU_OPTIONS).lower(jnp.ones((2, 2))).compile()
    except Exception:  # noqa: BLE001  (an unknown option or enum value: keep XLA's defaults)
        return {}
    return dict(_CPU_OPTIONS)


def compiler_options(devices) -> dict[str, str] | None:
    """`compiler_options` for a program that runs on `devices` (None off CPU)."""
    return cpu_compiler_options() if all(d.platform == "cpu" for d in devices) else None
