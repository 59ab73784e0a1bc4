"""Multi-host training on one machine: two JAX processes of `experiments.pretrain` over loopback.

Each process gets 2 CPU devices (a 4-device global mesh, the batch split over both processes),
joins through JAX_COORDINATOR_ADDRESS=127.0.0.1:<port> (m1jax.distributed) and runs its
collectives with gloo (jax's default CPU implementation once jax.distributed is up). Both work in
one workdir, as on a shared filesystem. Three launches of the pair: an uninterrupted 4-step run, a
2-step run, and that run resumed to 4 steps, whose loss curve must equal the uninterrupted one; a
fourth is preempted by a SIGTERM to one of its processes.
"""

from __future__ import annotations

import contextlib
import glob
import ipaddress
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from m1jax.data.pipeline import Corpus, Packer, loss_mask
from m1jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCS, DEVICES_PER_PROC = 2, 2
BATCH, SEQ = 4, 32  # global batch: 2 rows per process, 1 per device
TIMEOUT_S = 240  # per launch of the pair; a healthy one takes ~15-50 s on 2 cores
STOP_TIMEOUT_S = 60  # from a SIGTERM to both exits: a healthy pair needs a step and a save, seconds
FLAGS = [
    "--noprogress", "--config.model.preset=tiny", "--config.model.vocab_size=264",
    # 1 lightning + 1 softmax layer of the default's widths: both attention kinds, half the compile time
    "--config.model.num_hidden_layers=2", "--config.model.attn_type_list=(0, 1)",
    f"--config.batch_size={BATCH}", f"--config.seq_len={SEQ}", "--config.log.every=1",
    "--config.checkpoint.every=2", "--config.eval.every=100000", "--config.eval.batches=1",
    # constant after warmup: the schedule does not depend on config.steps, so a run extended from
    # 2 to 4 steps is the same run as one of 4 steps
    "--config.optim.warmup_steps=1", "--config.optim.schedule=constant",
    "--config.data.num_train_docs=200", "--config.data.num_eval_docs=20", "--config.eval.max_new_tokens=4",
    "--config.mesh.data=-1",  # all 4 devices of both processes on the batch axis
]  # fmt: skip


def _hostname_is_loopback() -> bool:
    """gloo binds the address the hostname resolves to: only loopback is allowed here."""
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


pytestmark = pytest.mark.skipif(
    not _hostname_is_loopback(),
    reason="gloo (JAX's CPU collectives) listens on the address this machine's hostname resolves to, "
    "which is not loopback here; this test talks over 127.0.0.1 only",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(process_id: int, port: int, cache_dir: str) -> dict[str, str]:
    # Nothing inherited that could redirect the run: other JAX settings, cluster detection, proxies.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_", "SLURM_", "TPU_", "XLA_")) and "proxy" not in k.lower()
    }
    env.update(
        JAX_PLATFORMS="cpu",
        # LLVM at -O0: a third of the compile time, and these steps are tiny (the same flags in every run)
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROC} --xla_backend_optimization_level=0",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",  # jax's default binds [::]
        JAX_NUM_PROCESSES=str(PROCS),
        JAX_PROCESS_ID=str(process_id),
        # Process 0 of a later launch reuses the compiled steps (jax writes no entries for the others).
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return env


@contextlib.contextmanager
def _processes(commands, envs, log_prefix: str):
    """Starts one process per (command, env); yields (procs, outs). Output goes to files (no pipe
    can fill up and stall a process); on leaving the block any process still running is killed
    (only these) and outs gets each one's output."""
    logs = [open(f"{log_prefix}.p{i}.log", "w+") for i in range(len(commands))]  # noqa: SIM115 - closed below
    procs, outs = [], []
    try:
        for cmd, env, log in zip(commands, envs, logs, strict=True):
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
        yield procs, outs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.seek(0)
            outs.append(f.read())
            f.close()


def _pair(workdir, steps: int, cache_dir: str, *extra: str):
    """Starts both pretraining processes (`_processes`)."""
    port = _free_port()
    args = [sys.executable, "-m", "experiments.pretrain", f"--workdir={workdir}", f"--config.steps={steps}"]
    envs = [_env(i, port, cache_dir) for i in range(PROCS)]
    return _processes([[*args, *FLAGS, *extra]] * PROCS, envs, f"{workdir}.{steps}")


def _wait(procs, timeout_s: float) -> bool:
    """Whether both exited within timeout_s; returns early once one has failed (its partner would
    wait on it in a collective)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    return all(p.poll() is not None for p in procs)


def _report(procs, outs) -> str:
    return "\n".join(
        f"--- process {i} (rc {p.returncode})\n{o[-4000:]}" for i, (p, o) in enumerate(zip(procs, outs, strict=True))
    )


def _launch(workdir, steps: int, cache_dir: str, *extra: str) -> list[str]:
    """Run both processes to completion; returns each one's output. Fails (after killing both) if
    either exits non-zero or the pair outlives TIMEOUT_S."""
    with _pair(workdir, steps, cache_dir, *extra) as (procs, outs):
        timed_out = not _wait(procs, TIMEOUT_S)
    report = _report(procs, outs)
    assert not timed_out, f"the pair did not finish within {TIMEOUT_S} s\n{report}"
    assert [p.returncode for p in procs] == [0] * PROCS, report
    for i, out in enumerate(outs):  # really one runtime of 2 processes, not 2 single-process runs
        assert f"jax.distributed: process {i} of {PROCS}, {PROCS * DEVICES_PER_PROC} devices" in out, report
        assert f"trained to step {steps}:" in out, report
    return outs


def _losses(workdir, key="loss") -> dict[int, float]:
    rows = [r for r in read_metrics(workdir) if key in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"{key} logged twice for a step (more than one writer?): {steps}"
    return {r["step"]: r[key] for r in rows}


def _packers(workdir) -> list[Packer]:
    """A fresh packer per process's shard of the workdir's cached training corpus."""
    (path,) = glob.glob(str(workdir / "data" / "train-*.npz"))
    with np.load(path) as f:
        corpus = Corpus(f["tokens"], f["offsets"])
    return [Packer(corpus, SEQ, BATCH // PROCS, seed=0, shard=i, num_shards=PROCS) for i in range(PROCS)]


def _data_state(workdir, step: int) -> dict:
    with open(os.path.join(workdir, "checkpoints", str(step), "data", "metadata")) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> str:
    """One persistent compilation cache for every launch of the module."""
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, jax_cache):
    """The three launches (about a minute on 2 idle cores): full (4 steps, with samples), part
    (2 steps), resumed (the part run's workdir, 4 steps)."""
    base = tmp_path_factory.mktemp("multiprocess")
    full, parts = base / "full", base / "parts"
    cache = jax_cache
    out = {"full": full, "parts": parts}
    out["full_logs"] = _launch(full, 4, cache, "--config.eval.num_samples=2")
    out["part_logs"] = _launch(parts, 2, cache, "--config.eval.num_samples=0")
    out["part_metrics"] = read_metrics(parts)
    out["part_checkpoints"] = sorted(int(p) for p in os.listdir(parts / "checkpoints") if p.isdigit())
    out["resumed_logs"] = _launch(parts, 4, cache, "--config.eval.num_samples=0")
    return out


@pytest.mark.slow
def test_two_processes_train_and_only_process_0_writes(runs):
    full = runs["full"]
    curve = _losses(full)
    assert sorted(curve) == list(range(1, 5)), curve
    assert all(math.isfinite(v) for v in curve.values()), curve
    assert curve[4] < curve[1], curve  # it learns
    assert {4} == set(_losses(full, "eval_loss")) and math.isfinite(_losses(full, "eval_loss")[4])
    assert len(os.listdir(full / "tb")) == 1, os.listdir(full / "tb")  # one TensorBoard writer
    with open(full / "samples.jsonl") as fh:
        assert len(fh.readlines()) == 2
    p0, p1 = runs["full_logs"]
    assert "held-out greedy accuracy" in p0 and "held-out greedy accuracy" not in p1  # samples shown once
    assert sorted(int(p) for p in os.listdir(full / "checkpoints") if p.isdigit()) == [2, 4]


@pytest.mark.slow
def test_each_process_packs_its_shard_and_the_checkpoint_holds_both(runs):
    """Replaying a packer per corpus shard (BATCH / 2 rows a step) in this process: every step's
    global token count is the sum over both shards' rows, and the final checkpoint's data state
    holds both processes' positions, each exactly where its shard's packer stands."""
    full = runs["full"]
    packers = _packers(full)
    logged = {r["step"]: r["tokens"] for r in read_metrics(full) if "loss" in r}
    for step in range(1, 5):
        counts = [int(loss_mask(p.next_batch()["segment_ids"]).sum()) for p in packers]
        assert logged[step] == sum(counts) and min(counts) > 0, (step, logged[step], counts)
    shards = _data_state(full, 4)["shards"]
    assert [(s["shard"], s["num_shards"]) for s in shards] == [(0, PROCS), (1, PROCS)], shards
    assert [p.state for p in packers] == shards


@pytest.mark.slow
def test_resume_continues_the_uninterrupted_run(runs):
    full, parts = runs["full"], runs["parts"]
    assert runs["part_checkpoints"] == [2]
    assert sorted(r["step"] for r in runs["part_metrics"] if "loss" in r) == [1, 2]
    for out in runs["resumed_logs"]:
        assert f"resumed from step 2 ({parts / 'checkpoints'})" in out, out[-3000:]
    kept = [r for r in read_metrics(parts) if r["step"] <= 2]  # not retrained: timings too are the first run's
    assert kept == [r for r in runs["part_metrics"] if r["step"] <= 2]
    a, b = _losses(full), _losses(parts)
    assert sorted(b) == list(range(1, 5)), b
    np.testing.assert_allclose([b[s] for s in range(1, 5)], [a[s] for s in range(1, 5)], rtol=1e-6, atol=0)
    np.testing.assert_allclose(_losses(parts, "eval_loss")[4], _losses(full, "eval_loss")[4], rtol=1e-6)
    assert _data_state(parts, 4) == _data_state(full, 4)
    assert not (parts / "samples.jsonl").exists()


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, jax_cache):
    """A preempted host: SIGTERM to process 1 only, mid-run. Both processes agree on the stop
    (loop.stop_requested), leave the step loop after the same step N, save the checkpoint at N
    together and exit 0. Without the agreement the signalled process enters the save's collectives
    while its partner enters the next step's, and both hang."""
    workdir = tmp_path / "stopped"
    metrics = workdir / "metrics.jsonl"
    # 10000 steps and no periodic checkpoint: the run only ends by the signal, whose save is the only one
    extra = ("--config.eval.num_samples=0", "--config.checkpoint.every=100000")
    started = exited = False
    with _pair(workdir, 10000, jax_cache, *extra) as (procs, outs):
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            # complete lines only (process 0 may be mid-write); one loss row per step (log_every=1)
            if metrics.exists() and metrics.read_text().count("\n") >= 3:
                started = True
                break
            time.sleep(0.2)
        if started:
            procs[1].send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            exited = _wait(procs, STOP_TIMEOUT_S)
            stop_s = time.monotonic() - signalled
    report = _report(procs, outs)
    assert started, f"training did not reach step 3 within {TIMEOUT_S} s\n{report}"
    assert exited, f"not both exited within {STOP_TIMEOUT_S} s of the SIGTERM to process 1\n{report}"
    assert [p.returncode for p in procs] == [0] * PROCS, f"after {stop_s:.1f} s\n{report}"
    for i, out in enumerate(outs):
        assert f"jax.distributed: process {i} of {PROCS}, {PROCS * DEVICES_PER_PROC} devices" in out, report
    stops = [re.findall(r"^stopped by (.+) at step (\d+); checkpoint saved", o, re.M) for o in outs]
    assert [[s[0] for s in found] for found in stops] == [["signal on another process"], ["SIGTERM"]], report
    (n,) = {int(found[0][1]) for found in stops}  # one step for both
    assert n >= 3, report
    assert sorted(_losses(workdir)) == list(range(1, n + 1))  # process 0 logged every step up to N, none after
    assert sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit()) == [n]
    shards = _data_state(workdir, n)["shards"]
    assert [(s["shard"], s["num_shards"]) for s in shards] == [(0, PROCS), (1, PROCS)], shards
    packers = _packers(workdir)  # both positions are those after N steps: neither process ran ahead
    for _ in range(n):
        for p in packers:
            p.next_batch()
    assert [p.state for p in packers] == shards


@pytest.fixture(scope="module")
def mixture_runs(tmp_path_factory, jax_cache):
    """A mixture of two prepared directories on the pair: 4 steps straight, and 2 then resumed to 4."""
    from m1jax.data.prepare import prepare

    base = tmp_path_factory.mktemp("mixture")
    dirs = []
    for name, texts in (
        ("arith", [f"{i}+{i % 7}={i + i % 7}" for i in range(120)]),
        ("words", [" ".join(["ab", "cd", "ef"][: 1 + i % 3]) * (1 + i % 4) for i in range(30)]),
    ):
        (base / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        prepare(str(base / f"{name}.jsonl"), str(base / name), shard_rows=32, progress=False)
        dirs.append(base / name)
    mix = f"--config.data.mixture={dirs[0]}:0.7,{dirs[1]}:0.3"
    full, parts = base / "full", base / "parts"
    flags = (mix, "--config.eval.num_samples=0", "--config.data.num_eval_docs=4", "--config.eval.every=4")
    _launch(full, 4, jax_cache, *flags)
    _launch(parts, 2, jax_cache, *flags)
    _launch(parts, 4, jax_cache, *flags)
    return {"full": full, "parts": parts, "dirs": dirs}


@pytest.mark.slow
def test_a_mixture_on_two_processes_resumes_exactly(mixture_runs):
    """Each process draws its shard of both sources through the Grain loader; the checkpoint holds
    both processes' mixture positions (those of a replay here), and 2 + 2 steps equal 4."""
    from m1jax.data import prepared
    from m1jax.data.pipeline import mixed_packer

    full, parts = mixture_runs["full"], mixture_runs["parts"]
    a, b = _losses(full), _losses(parts)
    assert sorted(a) == sorted(b) == list(range(1, 5)), (a, b)
    np.testing.assert_allclose([b[s] for s in range(1, 5)], [a[s] for s in range(1, 5)], rtol=1e-6, atol=0)
    assert _data_state(parts, 4) == _data_state(full, 4)
    rows = [r for r in read_metrics(full) if "loss" in r]
    assert all(abs(r["data/arith/share"] + r["data/words/share"] - 1) < 1e-9 for r in rows), rows
    evals = _losses(full, "eval_loss/words")
    assert sorted(evals) == [4] and math.isfinite(evals[4])
    sources = [prepared.open_prepared(str(d), split="train", num_eval_docs=4) for d in mixture_runs["dirs"]]
    packers = [
        mixed_packer(sources, [0.7, 0.3], SEQ, BATCH // PROCS, seed=0, shard=i, num_shards=PROCS) for i in range(PROCS)
    ]
    for _ in range(4):
        for p in packers:
            p.next_batch()
    assert [p.state for p in packers] == _data_state(full, 4)["shards"]
