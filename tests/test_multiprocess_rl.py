"""Asynchronous RL across hosts on one machine: two JAX processes (jax.distributed over loopback,
gloo collectives), 4 CPU devices each.

Learner mesh data=2 (the first device of each process), rollout mesh data=2 (the second device of
each process, `rl.loop.make_meshes`), max_staleness K=1: the rollout thread of each process runs
the sampler on the rollout mesh while its learner thread trains, the weights cross from one mesh
to the other each step (`rl.transfer.copy_to`: jax.device_put refuses a cross-process copy between
different device sets), and the learner's stop check is an all-gather over every device each step.
Three launches of the pair: an uninterrupted 4-step run, a run stopped at
step 2 (its checkpoint carries the one batch sampled by version 1, written by process 0 only) and
that run resumed; plus one single-process run of the same config on 8 devices (learner on the
first 2, rollouts on the next 2) as the reference.

This file is also the driver each process runs:
    python tests/test_multiprocess_rl.py WORKDIR OVERRIDES_JSON STOP_AT   (STOP_AT 0 = none)
    python tests/test_multiprocess_rl.py copy_to                          (`copy_to` alone)
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the driver imports its sibling modules

from test_multiprocess import _free_port, _hostname_is_loopback, _processes, _report, _wait  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCS, DEVICES_PER_PROC = 2, 4
STEPS, STOP_AT = 4, 2
TIMEOUT_S = 300  # per launch; a healthy pair takes about a minute on 2 idle cores
CONFIG = {
    "steps": STEPS,
    "rl.max_staleness": 1,
    "rl.old_logp": "sampler",  # K > 0 needs the behaviour policy's log-probs in the ratio
    "mesh.data": 2,
    "rl.rollout_mesh.data": 2,
    "checkpoint.every": 2,
    "eval.every": 100000,  # evaluations at steps 0 and 4 only
}

pytestmark = pytest.mark.skipif(
    not _hostname_is_loopback(),
    reason="gloo (JAX's CPU collectives) listens on the address this machine's hostname resolves to, "
    "which is not loopback here; this test talks over 127.0.0.1 only",
)


def _env(process_id: int | None, port: int, cache_dir: str | None, devices: int) -> dict[str, str]:
    """test_multiprocess's environment with `devices` CPU devices; process_id None = one process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_", "SLURM_", "TPU_", "XLA_")) and "proxy" not in k.lower()
    }
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
        PYTHONPATH=ROOT,
    )
    if cache_dir is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    if process_id is not None:
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(PROCS),
            JAX_PROCESS_ID=str(process_id),
        )
    return env


def _launch(workdir, cache_dir: str | None, *, procs=PROCS, stop_at: int = 0, driver: str = "train") -> list[str]:
    """Runs the driver (`_drive`, or `_drive_copy_to` for driver="copy_to") in `procs` processes
    (1: no jax.distributed, 8 devices) to completion; returns each one's output. Fails (after
    killing them) if one exits non-zero or they outlive TIMEOUT_S."""
    port = _free_port()
    args = [sys.executable, os.path.abspath(__file__)]
    args += ["copy_to"] if driver == "copy_to" else [str(workdir), json.dumps(CONFIG), str(stop_at)]
    envs = [_env(i if procs > 1 else None, port, cache_dir, DEVICES_PER_PROC if procs > 1 else 8) for i in range(procs)]
    with _processes([args] * procs, envs, f"{workdir}.{stop_at}") as (running, outs):
        finished = _wait(running, TIMEOUT_S)
    report = _report(running, outs)
    assert finished, f"not finished within {TIMEOUT_S} s (or one failed and the other was killed)\n{report}"
    assert [p.returncode for p in running] == [0] * procs, report
    for i, out in enumerate(outs):
        if procs > 1:  # really one runtime of 2 processes, not 2 single-process runs
            assert f"jax.distributed: process {i} of {PROCS}, {PROCS * DEVICES_PER_PROC} devices" in out, report
        assert driver != "train" or f"rl driver: end_step {stop_at or STEPS}" in out, report
    return outs


def _rows(workdir) -> list[dict]:
    """The training rows (with a loss), without the timings (which no two runs share)."""
    from m1jax.train.metrics import read_metrics

    rows = [r for r in read_metrics(workdir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice (more than one writer?): {steps}"
    from rl.loop import TIMINGS  # (imported late: this file is also a driver)

    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def _params(workdir) -> dict:
    with np.load(f"{workdir}.params.npz") as z:
        return dict(z)


def _assert_rows_close(got: list[dict], want: list[dict], rtol: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for x, y in zip(want, got, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_allclose(y[key], x[key], rtol=rtol, atol=1e-6, err_msg=f"step {x['step']}: {key}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four launches: single (1 process), full, part (stopped at STOP_AT) and resumed, pairs."""
    base = tmp_path_factory.mktemp("multiprocess_rl")
    cache = str(tmp_path_factory.mktemp("jax_cache_rl"))
    out, seconds = {}, {}
    for name, kw in [("full", {}), ("part", {"stop_at": STOP_AT}), ("resumed", {}), ("single", {"procs": 1})]:
        workdir = base / ("part" if name == "resumed" else name)
        t0 = time.monotonic()
        out[f"{name}_logs"] = _launch(workdir, cache, **kw)
        seconds[name] = round(time.monotonic() - t0, 1)
        out[name] = workdir
        if name == "part":
            out["part_rows"] = _rows(workdir)
            out["part_files"] = sorted(os.listdir(workdir / "rollouts"))
    print(f"launch times (s): {seconds}")
    return out


@pytest.mark.slow
def test_two_processes_match_one_and_only_process_0_writes(runs):
    """The pair finishes; process 0 alone writes the metrics (each step once) and TensorBoard; its
    rows and final params equal (allclose) those of one process driving the same two meshes."""
    full, single = runs["full"], runs["single"]
    rows = _rows(full)
    assert [r["staleness_max"] for r in rows] == [0, 1, 1, 1]  # batch s sampled by version s - 1
    _assert_rows_close(rows, _rows(single), rtol=1e-4)
    a, b = _params(single), _params(full)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert len(os.listdir(full / "tb")) == 1, os.listdir(full / "tb")  # one TensorBoard writer
    for i, out in enumerate(runs["full_logs"]):  # each process's meshes: 1 local device of each
        assert "learner devices [(0, 0), (1, 0)]; rollout devices [(0, 1), (1, 1)]" in out, out[-3000:]
        assert f"params written: {i == 0}" in out, out[-3000:]


@pytest.mark.slow
def test_two_processes_stop_and_resume_equal_the_uninterrupted_run(runs):
    """Stopped at step 2, the checkpoint carries the batch of step 2 (sampled by version 1), written
    once by process 0 and read by both on resume: the resumed run's rows and params equal the
    uninterrupted pair's."""
    part = runs["part"]
    assert [r["step"] for r in runs["part_rows"]] == [1, 2]
    assert runs["part_files"] == ["step_2.npz"]
    from rl import rollouts

    (saved,) = rollouts.load(str(part), STOP_AT, 1)
    assert (int(saved["step"]), int(saved["version"])) == (2, 1)
    for out in runs["resumed_logs"]:
        assert f"resumed from step {STOP_AT}" in out, out[-3000:]
        assert "saved rollout batch(es)" not in out, out[-3000:]  # no "less stale" warning: nothing lost
    resumed = _rows(part)
    assert resumed[:STOP_AT] == runs["part_rows"]  # not retrained
    _assert_rows_close(resumed, _rows(runs["full"]), rtol=1e-6)
    a, b = _params(runs["full"]), _params(part)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.slow
def test_copy_to_moves_each_process_its_shards(tmp_path):
    """`rl.transfer.copy_to` between two meshes of disjoint devices, each spanning both processes (what
    jax.device_put refuses across processes): from replicated or sharded sources to replicated or
    sharded targets, including a source sharded over the processes that must be gathered first."""
    outs = _launch(tmp_path / "copy", None, procs=PROCS, driver="copy_to")
    for out in outs:
        assert "copy_to: 6 cases equal" in out, out[-3000:]


def _drive_copy_to() -> None:
    from experiments import cli
    from m1jax import distributed

    cli.setup_logging()
    distributed.initialize()
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from rl.transfer import copy_to

    local = [jax.local_devices(process_index=p) for p in range(jax.process_count())]
    mesh = lambda first: Mesh(np.array([[d[first], d[first + 2]] for d in local]), ("x", "y"))
    src, dst = mesh(0), mesh(1)  # (process, 2 local devices): devices 0, 2 and 1, 3 of each process
    value = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    cases = [  # (source spec, target spec)
        (P(), P()),
        (P(), P("x", "y")),  # each target shard a slice of the local replica
        (P("x"), P("x")),
        (P("x", "y"), P(None, "y")),
        (P("x"), P()),  # the other process's rows: gathered over the source mesh first
        (P("y", "x"), P("x")),
    ]
    for a, b in cases:
        x = jax.make_array_from_callback(value.shape, NamedSharding(src, a), lambda index: value[index])
        y = jax.block_until_ready(copy_to({"w": x}, {"w": NamedSharding(dst, b)})["w"])
        assert y.sharding == NamedSharding(dst, b), (a, b, y.sharding)
        assert {sh.device for sh in y.addressable_shards} == set(dst.local_devices), (a, b)
        for sh in y.addressable_shards:
            np.testing.assert_array_equal(np.asarray(sh.data), value[sh.index], err_msg=f"{a} -> {b}")
    print(f"copy_to: {len(cases)} cases equal", flush=True)


def _drive(workdir: str, overrides: str, stop_at: str) -> None:
    """One process of a run: join the runtime (if the environment says so), train, and report."""
    from experiments import cli
    from m1jax import distributed

    cli.setup_logging()
    distributed.initialize()
    import jax
    from test_rl_train import small_toy

    from rl import loop

    c = small_toy(json.loads(overrides))
    mesh, rollout_mesh = loop.make_meshes(c)
    local = lambda d: jax.local_devices(process_index=d.process_index).index(d)
    ids = lambda m: sorted((d.process_index, local(d)) for d in m.devices.flat)
    print(f"learner devices {ids(mesh)}; rollout devices {ids(rollout_mesh)}", flush=True)
    s = loop.train(c, workdir, progress=False, stop_at=int(stop_at) or None)
    leaves = jax.tree_util.tree_leaves_with_path(s["state"]["params"])
    params = {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}  # replicated: each process has all
    primary = jax.process_index() == 0
    if primary:
        np.savez(f"{workdir}.params.npz", **params)
    print(f"params written: {primary}", flush=True)
    print(f"rl driver: end_step {s['end_step']} stopped_by {s['stopped_by']}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["copy_to"]:
        _drive_copy_to()
    else:
        _drive(*sys.argv[1:])
