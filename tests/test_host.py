"""m1jax.host: the huge-page malloc re-exec and the XLA CPU compiler options."""

import importlib.util
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def linux_with_thp(monkeypatch):
    monkeypatch.setattr(host, "_glibc_at_least", lambda major, minor: True)
    monkeypatch.setattr(host, "_thp_available", lambda: True)
    monkeypatch.setattr(host.sys, "platform", "linux")


def test_hugepages_env_adds_the_tunable(linux_with_thp):
    assert host.hugepages_env({"PATH": "/bin"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    env = host.hugepages_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"


def test_hugepages_env_leaves_a_chosen_setting_alone(linux_with_thp):
    assert host.hugepages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice
    assert host.hugepages_env({"M1JAX_HUGEPAGES": "0"}) is None  # the opt-out


def test_hugepages_env_needs_glibc_and_thp(monkeypatch):
    monkeypatch.setattr(host.sys, "platform", "linux")
    monkeypatch.setattr(host, "_thp_available", lambda: False)
    monkeypatch.setattr(host, "_glibc_at_least", lambda major, minor: True)
    assert host.hugepages_env({}) is None
    monkeypatch.setattr(host, "_thp_available", lambda: True)
    monkeypatch.setattr(host, "_glibc_at_least", lambda major, minor: False)
    assert host.hugepages_env({}) is None
    monkeypatch.setattr(host, "_glibc_at_least", lambda major, minor: True)
    monkeypatch.setattr(host.sys, "platform", "darwin")
    assert host.hugepages_env({}) is None


def test_reexec_runs_the_same_command_with_the_tunable(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(
        "import os, sys\n"
        "from m1jax import host\n"
        "print('start', flush=True)\n"
        "host.reexec_with_hugepages()\n"
        "print('tunables=' + os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "M1JAX_HUGEPAGES")}
    out = subprocess.run(
        [sys.executable, str(script), "--flag", "x"], env=env, capture_output=True, text=True, check=True
    ).stdout
    expected = host.hugepages_env(env)
    if expected is None:  # this machine has no THP or an old glibc: nothing to do, run once
        assert out.splitlines() == ["start", "tunables= ['--flag', 'x']"]
    else:  # started twice (the exec), the second time with the tunable and the same arguments
        assert out.splitlines() == ["start", "start", "tunables=glibc.malloc.hugetlb=1 ['--flag', 'x']"]


def test_cpu_compiler_options_compile_and_keep_the_numbers():
    opts = host.compiler_options(jax.devices())
    assert opts == host.cpu_compiler_options()  # the test devices are CPUs
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 48))
    w = jax.random.normal(jax.random.PRNGKey(1), (48, 32))

    def f(x, w):  # a dot, a fused column reduction and a row reduction
        y = jnp.tanh(x @ w)
        return jnp.sum(y * y, axis=0), jnp.sum(y, axis=1)

    got = jax.jit(f, compiler_options=opts)(x, w)
    want = jax.jit(f)(x, w)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_compiler_options_only_for_cpu():
    assert host.compiler_options([types.SimpleNamespace(platform="gpu")]) is None
    assert host.compiler_options([types.SimpleNamespace(platform="cpu"), types.SimpleNamespace(platform="tpu")]) is None


def test_platforms_skip_an_absent_tpu(monkeypatch):
    monkeypatch.setattr(host, "tpu_chips_present", lambda: False)
    monkeypatch.setattr(host, "_gpu_present", lambda: False)
    monkeypatch.setattr(host.importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
    assert host.platforms_without_absent_tpu({}) == "cpu"
    monkeypatch.setattr(host, "_gpu_present", lambda: True)  # a GPU host: JAX's plugins choose
    assert host.platforms_without_absent_tpu({}) is None
    monkeypatch.setattr(host, "_gpu_present", lambda: False)
    assert host.platforms_without_absent_tpu({"JAX_PLATFORMS": "tpu"}) is None  # the user's choice
    assert host.platforms_without_absent_tpu({"JAX_FORCE_TPU_INIT": "1"}) is None
    assert host.platforms_without_absent_tpu({"M1JAX_KEEP_PLATFORMS": "1"}) is None
    monkeypatch.setattr(host, "tpu_chips_present", lambda: True)  # a TPU VM: JAX's own choice
    assert host.platforms_without_absent_tpu({}) is None
    monkeypatch.setattr(host, "tpu_chips_present", lambda: False)
    monkeypatch.setattr(host.importlib.util, "find_spec", lambda name: None)  # no libtpu: nothing to skip
    assert host.platforms_without_absent_tpu({}) is None


_HOLD = """
import os, sys, time
import m1jax, jax
jax.devices()
maps = open("/proc/self/maps").read()
fds = [os.readlink(f"/proc/self/fd/{f}") for f in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{f}")]
print(jax.config.jax_platforms, "libtpu" in maps, any("libtpu_lockfile" in f for f in fds), flush=True)
sys.stdin.read()  # hold on, as a training job would, until the test is done
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_cpu_job_neither_probes_nor_locks_libtpu_and_tpu_compiles_run_beside_it(tmp_path):
    """With libtpu installed but no TPU chip: importing m1jax keeps JAX off the TPU backend (no
    start-up errors, libtpu not loaded, its lockfile not held), and a TPU AOT compile in a second
    process works while the first runs."""
    if host.tpu_chips_present():
        pytest.skip("this host has TPU chips: JAX's own platform choice applies")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU_LOAD")}
    job = subprocess.Popen(
        [sys.executable, "-c", _HOLD], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        platforms, loaded, locked = job.stdout.readline().split()
        assert (loaded, locked) == ("False", "False")
        has_libtpu = importlib.util.find_spec("libtpu") is not None
        assert platforms == ("cpu" if has_libtpu else "None")
        if has_libtpu:
            compile_ = (
                "from m1jax import host; host.for_tpu_compiles()\n"
                "import jax, jax.numpy as jnp\n"
                "from experiments.aot import topology_devices\n"
                "d = topology_devices('v5p:2x2x1')[:1]\n"
                "s = jax.sharding.SingleDeviceSharding(d[0])\n"
                "jax.jit(lambda x: x @ x).lower(jax.ShapeDtypeStruct((128, 128), jnp.bfloat16, sharding=s)).compile()\n"
                "print('compiled for', d[0].device_kind)\n"
            )
            out = subprocess.run([sys.executable, "-c", compile_], env=env, capture_output=True, text=True, cwd=ROOT)
            assert out.returncode == 0 and "compiled for TPU v5" in out.stdout, out.stderr[-3000:]
    finally:
        _, err = job.communicate(input="", timeout=60)  # ends the job's read of stdin
    for noise in ("TPU", "tpu", "E0000", "libtpu"):
        assert noise not in err, err  # no start-up errors in the job's output


def test_tpu_chips_are_told_by_device_id_not_vendor(tmp_path, monkeypatch):
    """Google's vendor id also marks the gVNIC and NVMe disks of ordinary Cloud VMs."""
    for name, device in (("0000:00:04.0", "0x0042"), ("0000:00:05.0", "0x001f")):  # NIC, disk
        (tmp_path / name).mkdir()
        (tmp_path / name / "vendor").write_text("0x1ae0\n")
        (tmp_path / name / "device").write_text(device + "\n")
    real_glob = host.glob.glob

    def fake(pattern):  # this host's PCI devices: the ones made above, and no /dev/accel or /dev/vfio
        return real_glob(str(tmp_path / "*" / "vendor")) if pattern.startswith("/sys/") else []

    monkeypatch.setattr(host.glob, "glob", fake)
    assert not host.tpu_chips_present()
    (tmp_path / "0000:00:06.0").mkdir()
    (tmp_path / "0000:00:06.0" / "vendor").write_text("0x1ae0\n")
    (tmp_path / "0000:00:06.0" / "device").write_text("0x0062\n")  # a v5p chip
    assert host.tpu_chips_present()
