"""m1jax.host: the huge-page malloc re-exec and the XLA CPU compiler options."""

import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax import host


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
