"""Host-side settings: which JAX platforms to start, huge pages for malloc, XLA CPU compiler options.

Platforms. With libtpu installed (the `tpu` extra) JAX tries to start a TPU backend in every
process, also on machines without a TPU: ~7 lines of start-up errors, and the process then holds
libtpu's lockfile, so a second process that needs libtpu (a TPU AOT compile) aborts.
`skip_absent_tpu()`, run when `m1jax` is imported, leaves the TPU backend out where this host has
no TPU chip and the user chose no platforms (JAX_PLATFORMS); `for_tpu_compiles()` lets a process
load libtpu beside another one, for compiling only.

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
import glob
import importlib.util
import os
import platform
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v3, v4, v5p, v5e, v6e, 7x and one unnamed): Google's vendor id alone
# also marks the virtual NICs and disks of ordinary Cloud VMs.
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def tpu_chips_present() -> bool:
    """True if a TPU chip is attached to this host (a Cloud TPU VM)."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        if _read(vendor) == _GOOGLE_PCI_VENDOR and _read(vendor[: -len("vendor")] + "device") in _TPU_PCI_DEVICES:
            return True
    return bool(glob.glob("/dev/accel[0-9]*")) or bool(glob.glob("/dev/vfio/[0-9]*"))


def _gpu_present() -> bool:
    """A GPU device node (NVIDIA, WSL, AMD): JAX's own platform choice is then left alone."""
    nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")
    return any(os.path.exists(d) for d in nodes) or bool(glob.glob("/dev/dri/renderD*") and _intel_gpu_plugin())


def _intel_gpu_plugin() -> bool:
    return importlib.util.find_spec("intel_extension_for_openxla") is not None


def platforms_without_absent_tpu(environ=None) -> str | None:
    """ "cpu" where JAX would probe for a TPU this host cannot have, else None (leave JAX's
    choice): None when the user set JAX_PLATFORMS, asked for TPU start-up (JAX_FORCE_TPU_INIT),
    libtpu is not installed, a TPU chip is attached, or a GPU is (its plugin decides)."""
    env = os.environ if environ is None else environ
    if env.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in env or env.get("M1JAX_KEEP_PLATFORMS") == "1":
        return None
    if importlib.util.find_spec("libtpu") is None or tpu_chips_present() or _gpu_present():
        return None
    return "cpu"


def skip_absent_tpu() -> str | None:
    """Leave the TPU backend out of JAX's start-up where it cannot work (see the module docstring).
    Only before JAX starts its backends, and only if nobody chose platforms; returns the value set."""
    import jax

    try:  # private: where a JAX release moves it, do nothing rather than fail the import of m1jax
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:
        return None
    if getattr(jax.config, "jax_platforms", None) or backends_are_initialized():
        return None
    value = platforms_without_absent_tpu()
    if value is not None:
        jax.config.update("jax_platforms", value)
    return value


def for_tpu_compiles() -> None:
    """Settings for a process that loads libtpu only to compile for a TPU topology: no local TPU
    backend (a training job may own the chips), and libtpu may be loaded beside another process
    (its lockfile guards the chips, which a compile never opens)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax

    jax.config.update("jax_platforms", "cpu")


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
