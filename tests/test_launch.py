"""Multi-host start-up and the launch scripts (bash -n and their --dry-run), plus the AOT tool on a
small config compiled for a 4-chip TPU v5p slice (needs libtpu, which .ci/run installs)."""

import importlib.util
import os
import subprocess

import pytest

from m1jax.distributed import init_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/tpu_pod.sh", "launch/slurm_gpu.sbatch"]


def test_init_kwargs_from_environment():
    assert init_kwargs({}) is None
    assert init_kwargs({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # one TPU host
    assert init_kwargs({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}) == {}
    assert init_kwargs({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert init_kwargs({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == {}
    env = {"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert init_kwargs(env) == {"coordinator_address": "h0:1234", "num_processes": 4, "process_id": 3}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        init_kwargs({**env, "JAX_PROCESS_ID": "4"})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        init_kwargs({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_PROCESS_ID": "0"})


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)


def _run(*args, env=None):
    return subprocess.run(
        ["bash", *args], cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60
    )


def test_tpu_pod_dry_run():
    out = _run("launch/tpu_pod.sh", "--dry-run", "--zone", "us-east5-a", "--type", "v5p-128", "--queued", "all")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.replace("\\ ", " ")  # printf %q escapes the spaces of --command
    assert "queued-resources create m1jax-" in lines and "--accelerator-type v5p-128" in lines
    assert lines.count("--worker=all") >= 2  # setup and run reach every worker
    assert "experiments.pretrain --config configs/pretrain_m1_full.py" in lines
    assert "worker15.log" in lines and "worker16.log" not in lines  # v5p-128: 64 chips, 16 hosts
    assert "queued-resources delete" in lines
    bad = _run("launch/tpu_pod.sh", "--dry-run", "run")  # no zone
    assert bad.returncode == 2 and "--zone" in bad.stderr
    bad = _run("launch/tpu_pod.sh", "--dry-run", "--zone", "z", "--bogus", "run")
    assert bad.returncode == 2 and "unknown argument: --bogus" in bad.stderr


def test_slurm_dry_run():
    env = {"SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": ""}
    cmd = ["launch/slurm_gpu.sbatch", "--dry-run", "--", "python", "-m", "experiments.pretrain", "--config", "x.py"]
    out = _run(*cmd, env=env)
    assert out.returncode == 0, out.stderr
    text = out.stdout.replace("\\ ", " ")
    assert "srun --nodes=4" in text and "JAX_COORDINATOR_ADDRESS=" in text
    assert "JAX_NUM_PROCESSES=4" in text and "experiments.pretrain --config x.py" in text


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (the tpu extra)")
def test_aot_compiles_small_config_for_v5p():
    from experiments import aot
    from m1jax.train import config as tc

    c = tc.base_config()
    c.model.update(preset="tiny", vocab_size=96)
    c.update(batch_size=8, seq_len=256)
    c.mesh.update(fsdp=2, tensor=2)
    r = aot.run(c, "v5p:2x2x1", "both", rl_prompt_len=64)
    assert r["chips"] == 4 and r["mesh"]["fsdp"] == 2 and r["mesh"]["tensor"] == 2
    assert r["moe_impl"] == "ragged"  # resolved for the TPU target, not for this CPU
    for step in ("pretrain", "cispo"):
        s = r[step]
        assert s["compiled"] and s["fits"] is True, s
        assert s["hbm_gib"] == 95.0 and 0 < s["peak_bytes"] < 2**30 and s["argument_bytes"] > 0
        assert s["xla_flops_per_chip"] > 0 and s["model_flops_per_step"] > 0
    assert r["fits"] is True
    with pytest.raises(SystemExit, match="uses 2 of the 4 chips"):
        c.mesh.update(fsdp=1)
        aot.run(c, "v5p:2x2x1", "pretrain")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (the tpu extra)")
def test_aot_compiles_expert_and_sequence_parallel_steps_for_v5p():
    """The explicit collectives compile for TPU: expert all-to-all and LASP-2 with the Mosaic
    lightning kernel per shard (resolved for the target, with bf16 compute)."""
    from experiments import aot
    from m1jax.train import config as tc

    c = tc.base_config()
    c.model.update(preset="tiny", vocab_size=96, num_local_experts=4, moe_capacity_factor=1.5, dtype="auto")
    c.update(batch_size=4, seq_len=512)
    c.mesh.update(expert=2, sequence=2)
    r = aot.run(c, "v5p:2x2x1", "both", rl_prompt_len=128)
    assert r["mesh"]["expert"] == 2 and r["mesh"]["sequence"] == 2
    assert r["lightning_impl"] == "pallas_tpu" and r["dtype"] == "bfloat16" and r["moe_capacity_factor"] == 1.5
    assert all(r[s]["compiled"] and r[s]["fits"] for s in ("pretrain", "cispo")), r


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (the tpu extra)")
def test_aot_compiles_rollout_engine_decode_for_v5p():
    """The rollout engine's decode program compiles for a TPU slice with the engine state sharded:
    slots over the batch axes, heads over "tensor", experts over "expert"; the state is donated."""
    from experiments import aot
    from m1jax.train import config as tc

    c = tc.base_config()
    c.model.update(preset="tiny", vocab_size=96, num_local_experts=4, dtype="auto")
    c.update(batch_size=4, seq_len=256)
    c.mesh.update(expert=2, tensor=2)
    r = aot.run(c, "v5p:2x2x1", "decode", rl_prompt_len=64, slots=4, decode_len=192)
    d = r["decode"]
    assert d["compiled"] and d["fits"] is True, d
    assert d["slots"] == 4 and d["max_len"] == 256 and d["xla_flops_per_chip"] > 0
    assert d["alias_bytes"] > 0  # the donated engine state is updated in place
    # each chip holds its 2 of the 4 slots and half the heads: well under the whole state
    assert 0 < d["argument_bytes"] < d["weights_bytes"] + d["engine_state_bytes"]
    assert "pretrain" not in r and r["fits"] is True
    with pytest.raises(SystemExit, match="--slots=3 must be a multiple of the 2 batch-parallel"):
        aot.run(c, "v5p:2x2x1", "decode", rl_prompt_len=64, slots=3)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (the tpu extra)")
def test_aot_compiles_sequence_parallel_prefill_for_v5p():
    """A long prompt's prefill compiles with sequence parallelism: the cache's softmax positions
    are split over "sequence" (each chip holds a quarter of them), only the last logits come back."""
    from experiments import aot
    from m1jax.train import config as tc

    c = tc.base_config()
    c.model.update(preset="tiny", vocab_size=96, dtype="auto")
    c.update(batch_size=2, seq_len=1024)
    c.mesh.update(sequence=4)
    r = aot.run(c, "v5p:2x2x1", "prefill")
    p = r["prefill"]
    assert p["compiled"] and p["fits"] is True and p["prompt_len"] == 1024, p
    # per chip: a quarter of the K/V positions, the whole lightning states (heads are not split here)
    kv = 2 * 1024 * 2 * 16 * 2  # k and v, 1024 positions, tiny's 2 KV heads of 16, bf16
    assert p["cache_bytes_per_chip"] == p["cache_bytes"] - kv + kv // 4
    assert p["output_bytes"] >= p["cache_bytes_per_chip"]
