"""Fault injection: every failure is a resume with the same loss curve or one named error.

Kills (SIGKILL during a step and during a save, SIGTERM), a torn metrics line, truncated and
garbled checkpoints (the latest one and all of them), rerunning a finished run, unknown config
fields, non-finite losses, and bad input at the Python API. Each asserts the exact outcome: the
uninterrupted run's loss curve (to 1e-6), or the error's text, exit status and how much it printed.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import shutil
import signal
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax import M1Model, init_params
from m1jax.config import PRESETS
from m1jax.generate import generate
from m1jax.hf import CheckpointError, load_pretrained, save_pretrained
from m1jax.train import config as tc
from m1jax.train import loop
from m1jax.train.checkpoint import CheckpointRestoreError
from m1jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
OVERRIDES = {  # a seconds-per-run config (1 lightning + 1 softmax layer); checkpoints at steps 3, 6 and 8
    "model.preset": "tiny", "model.vocab_size": 264, "model.num_hidden_layers": 2, "model.attn_type_list": (0, 1),
    "steps": STEPS, "batch_size": 4, "seq_len": 64,
    "optim.warmup_steps": 2, "log.every": 1, "eval.every": 4, "checkpoint.every": 3, "eval.num_samples": 2,
    "eval.max_new_tokens": 8, "data.num_train_docs": 2000, "data.num_eval_docs": 50,
}  # fmt: skip


_CACHE_OPTIONS = {  # every compile cached, however quick: the runs here recompile the same programs
    "jax_compilation_cache_dir": None,
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """One persistent compilation cache for this module's runs, in this process and its children:
    a resumed run compiles the programs of the run before it again (~4x faster with the cache)."""
    from jax._src import compilation_cache

    path = str(tmp_path_factory.mktemp("jax_cache"))
    old = {k: getattr(jax.config, k) for k in _CACHE_OPTIONS}
    for k, v in (_CACHE_OPTIONS | {"jax_compilation_cache_dir": path}).items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()  # JAX decides once per process whether to use the cache
    yield path
    for k, v in old.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


def child_env(cache: str) -> dict[str, str]:
    return dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def config(**changes):
    c = tc.base_config()
    c.update_from_flattened_dict(OVERRIDES | changes)
    return c


def curve(workdir) -> dict[int, float]:
    rows = [r for r in read_metrics(str(workdir)) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate metric rows: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def same_curve(workdir, reference) -> None:
    got, want = curve(workdir), curve(reference)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=0, atol=1e-6)


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, finished: its curve, checkpoints and summary."""
    workdir = tmp_path_factory.mktemp("reference")
    out = loop.train(config(), str(workdir), progress=False)
    assert out["end_step"] == STEPS and checkpoint_steps(workdir) == [3, 6, 8]
    return workdir


def copy_of(reference, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(reference, dst)
    return dst


def run_driver(workdir, cache: str, fault: str, at: int) -> subprocess.CompletedProcess:
    args = [sys.executable, os.path.join(ROOT, "tests", "fault_driver.py"), str(workdir), json.dumps(OVERRIDES)]
    return subprocess.run(
        [*args, fault, str(at)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=child_env(cache)
    )


def cli(module: str, *args, cache: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *([] if module == "experiments.aot" else ["--noprogress"]), *args]
    env = child_env(cache) if cache else None
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def cli_flags(workdir) -> list[str]:
    """--config (a file holding `config()`) and --workdir for the CLI."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "fault_config.py")
    with open(path, "w") as fh:
        fh.write(
            "from m1jax.train.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
            f"    c.update_from_flattened_dict({OVERRIDES!r})\n    return c\n"
        )
    return [f"--config={path}", f"--workdir={workdir}"]


def garble(directory) -> None:
    """Flip bits all through every tensor data file under `directory` (metadata left intact)."""
    for root, _, files in os.walk(directory):
        for f in files:
            if os.path.basename(root) == "d":  # orbax's (OCDBT) tensor data
                path = os.path.join(root, f)
                data = bytearray(open(path, "rb").read())
                data[::7] = bytes(b ^ 0x5A for b in data[::7])
                open(path, "wb").write(bytes(data))


# -- kills ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_during_a_step_resumes_the_same_curve(reference, tmp_path, compile_cache):
    proc = run_driver(tmp_path, compile_cache, "kill_in_step", 5)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert max(r["step"] for r in read_metrics(str(tmp_path)) if "loss" in r) == 4  # logged past the checkpoint
    out = loop.train(config(), str(tmp_path), progress=False)
    assert out["start_step"] == 3  # the last checkpoint; the row of step 4 is superseded
    same_curve(tmp_path, reference)


@pytest.mark.slow
def test_sigkill_during_a_save_resumes_the_same_curve(reference, tmp_path, compile_cache):
    proc = run_driver(tmp_path, compile_cache, "kill_in_save", 6)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert checkpoint_steps(tmp_path) == [3]  # step 6 was being written, never committed
    out = loop.train(config(), str(tmp_path), progress=False)
    assert out["start_step"] == 3
    same_curve(tmp_path, reference)


@pytest.mark.slow
def test_sigterm_then_a_torn_metrics_line_resume_the_same_curve(reference, tmp_path, monkeypatch, caplog):
    base = loop.Trainer

    class Preempted(base):  # SIGTERM arrives while step 4 runs, as a preemption would
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            step, n = self.step, [0]

            def stepped(state, batch):
                n[0] += 1
                if n[0] == 4:
                    os.kill(os.getpid(), signal.SIGTERM)
                return step(state, batch)

            self.step = stepped

    monkeypatch.setattr(loop, "Trainer", Preempted)
    out = loop.train(config(), str(tmp_path), progress=False)
    assert out["stopped_by"] == "SIGTERM" and out["end_step"] == 4 and checkpoint_steps(tmp_path)[-1] == 4
    monkeypatch.setattr(loop, "Trainer", base)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 3.0, "gr')  # what a kill during a write leaves
    with caplog.at_level(logging.WARNING, logger="m1jax"):
        out = loop.train(config(), str(tmp_path), progress=False)
    assert out["start_step"] == 4
    assert any("metrics.jsonl: dropped 1 unreadable line(s) [" in r.message for r in caplog.records)
    same_curve(tmp_path, reference)


# -- damaged checkpoints -----------------------------------------------------------------------


def test_garbled_latest_checkpoint_falls_back_quietly(reference, tmp_path, capfd, caplog):
    run = copy_of(reference, tmp_path)
    os.remove(run / "summary.json")  # the run is not finished: train its last steps again
    garble(run / "checkpoints" / "8")
    with caplog.at_level(logging.WARNING, logger="m1jax"):
        out = loop.train(config(), str(run), progress=False)
    assert out["start_step"] == 6
    assert any("step 8" in r.message and "falling back" in r.message for r in caplog.records)
    same_curve(run, reference)
    assert "Event loop is closed" not in capfd.readouterr().err  # the failed read's leftovers are quiet


def test_truncated_latest_checkpoint_falls_back(reference, tmp_path):
    run = copy_of(reference, tmp_path)
    os.remove(run / "summary.json")
    for root, _, files in os.walk(run / "checkpoints" / "8"):  # what a full disk or a torn copy leaves
        for f in files:
            with open(os.path.join(root, f), "r+b") as fh:
                fh.truncate(os.path.getsize(os.path.join(root, f)) // 2)
    out = loop.train(config(), str(run), progress=False)
    assert out["start_step"] == 6
    same_curve(run, reference)
    rows = [r for r in read_metrics(str(run)) if "sample_accuracy" in r]
    assert len(rows) == 1  # the repeated final stage replaced its row


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_no_readable_checkpoint_is_a_named_error(reference, tmp_path, damage):
    run = copy_of(reference, tmp_path)
    os.remove(run / "summary.json")  # unfinished: a finished run is reported from its summary, not restored
    for step in (3, 6, 8):
        if damage == "garble":
            garble(run / "checkpoints" / str(step))
        else:
            for root, _, files in os.walk(run / "checkpoints" / str(step)):
                for f in files:
                    open(os.path.join(root, f), "w").close()
    with pytest.raises(CheckpointRestoreError, match=r"none of the 3 checkpoint\(s\) in .* could be restored"):
        loop.train(config(), str(run), progress=False)


def test_cli_prints_one_error_for_unreadable_checkpoints(reference, tmp_path, compile_cache):
    run = copy_of(reference, tmp_path)
    os.remove(run / "summary.json")
    for step in (3, 6, 8):
        garble(run / "checkpoints" / str(step))
    proc = cli("experiments.pretrain", *cli_flags(run), cache=compile_cache)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) <= 8, proc.stderr  # a warning per checkpoint, then the error
    assert any(line.startswith("error: none of the 3 checkpoint(s)") for line in lines)


# -- finished runs ----------------------------------------------------------------------------


@pytest.mark.slow
def test_rerunning_a_finished_run_reports_it_and_a_longer_run_extends_it(reference, tmp_path, caplog):
    run = copy_of(reference, tmp_path)
    before = (run / "metrics.jsonl").read_bytes()
    out = loop.train(config(), str(run), progress=False)
    assert out["complete"] and out["end_step"] == STEPS and out["last_loss"] == curve(reference)[STEPS]
    assert len(out["samples"]) == 2 and out["sample_accuracy"] is not None
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing appended
    with caplog.at_level(logging.WARNING, logger="m1jax"):
        out = loop.train(config(steps=STEPS + 2), str(run), progress=False)
    assert out["start_step"] == STEPS and out["end_step"] == STEPS + 2 and not out.get("complete")
    assert any("extending the finished run" in r.message for r in caplog.records)
    assert sorted(curve(run)) == list(range(1, STEPS + 3))


def test_cli_rerun_of_a_finished_run_says_complete(reference, tmp_path, compile_cache):
    run = copy_of(reference, tmp_path)
    proc = cli("experiments.pretrain", *cli_flags(run), cache=compile_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"the run in {run} is already complete at step {STEPS}" in proc.stdout
    assert "held-out greedy accuracy" in proc.stdout
    assert (run / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()


def test_final_stage_killed_before_its_summary_is_repeated_once(reference, tmp_path):
    """A run killed after its last checkpoint but before summary.json (written last) finishes its
    final stage again on rerun, without a second sample_accuracy row."""
    run = copy_of(reference, tmp_path)
    os.remove(run / "summary.json")
    out = loop.train(config(), str(run), progress=False)
    assert out["start_step"] == STEPS and out["end_step"] == STEPS and not out.get("complete")
    assert len([r for r in read_metrics(str(run)) if "sample_accuracy" in r]) == 1
    assert (run / "summary.json").exists()
    same_curve(run, reference)


RL_OVERRIDES = {"steps": 2, "rl.prompts_per_step": 4, "rl.samples_per_prompt": 2, "rl.updates_per_rollout": 1,
                "eval.prompts": 4, "eval.samples": 0, "checkpoint.every": 2, "eval.every": 2}  # fmt: skip


@pytest.mark.slow
def test_cli_rerun_of_a_finished_rl_run_says_complete(tmp_path):
    from rl.loop import train as rl_train

    path = tmp_path / "rl_config.py"
    path.write_text(
        f"import runpy\n\n\ndef get_config():\n    c = runpy.run_path({ROOT + '/configs/cispo_toy.py'!r})"
        f"['get_config']()\n    c.update_from_flattened_dict({RL_OVERRIDES!r})\n    return c\n"
    )
    workdir = tmp_path / "run"
    first = rl_train(runpy.run_path(str(path))["get_config"](), str(workdir), progress=False)
    before = (workdir / "metrics.jsonl").read_bytes()
    proc = cli("experiments.cispo", f"--config={path}", f"--workdir={workdir}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"the run in {workdir} is already complete at step 2" in proc.stdout
    assert f"mean reward {first['final']['eval_reward']:.3f}" in proc.stdout
    assert (workdir / "metrics.jsonl").read_bytes() == before


# -- config errors ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "flag", "message"),
    [
        ("experiments.pretrain", "--config.nonsense=1", "error: unknown field(s) 'nonsense' in config; it has: batch"),
        ("experiments.pretrain", "--config.model.bogus=3", "error: unknown field(s) 'bogus' in config.model"),
        ("experiments.pretrain", "--config.data.sourc=x", "'sourc' (did you mean 'source'?) in config.data"),
        ("experiments.pretrain", "--config=configs/nope.py", "error: --config=configs/nope.py: no such config file"),
        ("experiments.cispo", "--config.rl.reward=task,bogus", "config.rl.reward='task,bogus': unknown reward(s)"),
        ("experiments.cispo", "--config.rl.cispo.ratio_maxx=2", "'ratio_maxx' (did you mean 'ratio_max'?)"),
        ("experiments.cispo", "--config.cispo.ratio_max=2", "config.cispo is now config.rl.cispo"),
        ("experiments.cispo", "--config.temperature=2", "config.temperature is now config.rl.sampling.temperature"),
        ("experiments.pretrain", "--config.learning_rate=1", "config.learning_rate is now config.optim.learning_rate"),
        ("experiments.pretrain", "--config.nonsense.deep=1", "error: --config.nonsense.deep=1: unknown field(s)"),
        (
            "experiments.pretrain",
            "--config.data.nonsens.x=1",
            "'nonsens' in config.data; it has: mixture, num_eval_docs",
        ),
        ("experiments.pretrain", "--config.steps.x=1", "config.steps is a value, not a section with fields"),
        ("experiments.cispo", "--config.model.preset.x=1", "config.model.preset is a value, not a section"),
        ("experiments.pretrain", "--config.steps=abc", "error: flag --config.steps=abc: invalid literal for int()"),
        ("experiments.aot", "--config.nonsense.deep=1", "error: --config.nonsense.deep=1: unknown field(s)"),
    ],
)
def test_cli_config_errors_are_one_line(tmp_path, module, flag, message):
    where = [f"--config={ROOT}/configs/pretrain_tiny.py"] if module == "experiments.aot" else [f"--workdir={tmp_path}"]
    proc = cli(module, *where, flag, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr


@pytest.mark.slow
def test_cli_nonfinite_run_is_one_error(tmp_path, compile_cache):
    flags = ("--config.optim.learning_rate=1e9", "--config.optim.grad_clip=0", "--config.max_bad_steps=1")
    flags += ("--config.steps=30",)
    proc = cli("experiments.pretrain", *cli_flags(tmp_path), *flags, cache=compile_cache)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "NaN or Inf found" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 consecutive steps up to step ") and "max_bad_steps=1" in last
    assert "Traceback" in (tmp_path / "run.log").read_text()  # the detail is in the log


# -- the Python API ----------------------------------------------------------------------------

CFG = PRESETS["tiny"](vocab_size=64, num_hidden_layers=2, attn_type_list=(0, 1))


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tokens", "error", "match"),
    [
        (jnp.zeros((1, 4), jnp.float32), TypeError, "tokens must be integer ids, got dtype float32"),
        (jnp.zeros((4,), jnp.int32), ValueError, r"tokens must be \[B, T\] \(batch, time\), got shape \(4,\)"),
        ([[1, 2]], TypeError, r"tokens must be an integer array \[B, T\], got list"),
    ],
)
def test_model_rejects_bad_tokens(params, tokens, error, match):
    with pytest.raises(error, match=match):
        M1Model(CFG).apply({"params": params}, tokens)


def test_model_checks_shape_and_dtype_under_jit(params):
    f = jax.jit(lambda t: M1Model(CFG).apply({"params": params}, t)[0])
    with pytest.raises(TypeError, match="integer ids"):
        f(jnp.zeros((1, 4), jnp.float32))


@pytest.mark.parametrize(
    ("prompts", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "no prompts given"),
        ("hello", {}, TypeError, "prompts must be a list of token-id lists, got str"),
        ([[1, 2], [1.5]], {}, TypeError, "prompt 1 must be a flat list of integer token ids"),
        ([[1, 2], []], {}, ValueError, "prompt 1 is empty"),
        ([[1, 2]], {"temperature": -1.0}, ValueError, "temperature must be >= 0"),
        ([[1, 2]], {"temperature": float("nan")}, ValueError, "temperature must be >= 0"),
        ([[1, 2]], {"top_p": 0.0}, ValueError, r"top_p must lie in \(0, 1\]"),
        ([[1, 2]], {"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1"),
        ([[1, 2**32 + 5]], {}, ValueError, r"prompt 0 holds token ids outside \[0, 2\*\*31\)"),
        ([[1, [2, 3]]], {}, TypeError, "prompt 0 must be a flat list of integer token ids"),
        ([[1, 200]], {}, ValueError, r"token ids must lie in \[0, vocab_size=64\)"),
    ],
)
def test_generate_rejects_bad_input(params, prompts, kwargs, error, match):
    with pytest.raises(error, match=match):
        generate(CFG, params, prompts, kwargs.pop("max_new_tokens", 2), **kwargs)


def test_generate_takes_arrays_of_prompts(params):
    want = generate(CFG, params, [[1, 2, 3], [4, 5, 6]], 3, temperature=0).tokens
    for prompts in (np.asarray([[1, 2, 3], [4, 5, 6]], np.int64), jnp.asarray([[1, 2, 3], [4, 5, 6]])):
        np.testing.assert_array_equal(generate(CFG, params, prompts, 3, temperature=0).tokens, want)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, params):
    path = tmp_path_factory.mktemp("hf")
    with warnings.catch_warnings():  # partial rotary: a note about transformers, not about this test
        warnings.simplefilter("ignore", UserWarning)
        save_pretrained(CFG, params, str(path))
    return path


def test_load_pretrained_config_errors(hf_dir, tmp_path):
    good = json.loads((hf_dir / "config.json").read_text())
    shutil.copytree(hf_dir, tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.json"
    cfg_file.write_text(json.dumps({k: v for k, v in good.items() if k != "hidden_size"}))
    with pytest.raises(CheckpointError, match=r"config.json: missing required key\(s\) \['hidden_size'\]"):
        load_pretrained(str(tmp_path / "m"))
    cfg_file.write_text(json.dumps([good]))
    with pytest.raises(CheckpointError, match="config.json: expected a JSON object, got a JSON list"):
        load_pretrained(str(tmp_path / "m"))
    cfg_file.write_text(json.dumps({k: v for k, v in good.items() if k != "head_dim"} | {"num_attention_heads": 0}))
    with pytest.raises(CheckpointError, match=r"config.json: invalid config \(ZeroDivisionError"):
        load_pretrained(str(tmp_path / "m"))
    cfg_file.write_text(json.dumps(dict(good, rope_parameters=[1])))
    with pytest.raises(CheckpointError, match=r"config.json: invalid config \(AttributeError"):
        load_pretrained(str(tmp_path / "m"))


def test_load_pretrained_rejects_non_finite_tensors_unless_told(hf_dir, tmp_path, params):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(hf_dir, tmp_path / "m")
    file = str(tmp_path / "m" / "model.safetensors")
    tensors = load_file(file)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].copy()
    tensors["model.norm.weight"][3] = np.nan
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor model.norm.weight holds 1 NaN/Inf value\(s\)"):
        load_pretrained(str(tmp_path / "m"))
    _, loaded = load_pretrained(str(tmp_path / "m"), check_finite=False)
    assert np.isnan(np.asarray(loaded["final_norm"]["scale"])[3])
    _, clean = load_pretrained(str(hf_dir))  # the untouched checkpoint loads with the check on
    np.testing.assert_array_equal(np.asarray(clean["final_norm"]["scale"]), np.asarray(params["final_norm"]["scale"]))
