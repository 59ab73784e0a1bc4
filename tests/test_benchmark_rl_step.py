"""experiments/benchmarks/rl_step.py: its tokenizer wrapper, and the benchmark in --quick mode. TRL is
not a test dependency: without it (the test venv, CI) the quick run is skipped; run it where trl is
installed beside m1jax."""

import json
import sys

import pytest


@pytest.mark.parametrize("kind", ["digits", "bytes"])
def test_wrapped_tokenizer_encodes_prompts_like_ours(kind):
    pytest.importorskip("transformers")
    from experiments.benchmarks.rl_step import hf_tokenizer
    from m1jax.data.tokenizer import ByteTokenizer
    from rl import prompts

    tok, source, vocab = (
        (prompts.DigitTokenizer(), "toy_copy", 16) if kind == "digits" else (ByteTokenizer(), "tasks", 264)
    )
    hf = hf_tokenizer(tok, vocab)
    assert len(hf.get_vocab()) == vocab and sorted(hf.get_vocab().values()) == list(range(vocab))  # one token per id
    for text, _ in prompts.batch(source, 0, 0, 16, tasks=("copy", "reverse", "add")):
        assert hf(text)["input_ids"] == tok.encode(text, bos=True), text
    assert (hf.pad_token_id, hf.eos_token_id) == (tok.pad_id, tok.eos_id)


@pytest.mark.slow
def test_rl_step_benchmark_quick_mode(tmp_path, monkeypatch):
    pytest.importorskip("trl", reason="the RL step benchmark compares against TRL, which is not installed")
    from experiments.benchmarks import rl_step

    out = tmp_path / "rl_step.json"
    monkeypatch.setattr(sys, "argv", ["rl_step", "--quick", "--out", str(out)])
    rl_step.main()
    r = json.loads(out.read_text())
    assert r["parity"]["max_abs_logp_diff"] < 1e-4  # both sides start from the same function
    assert r["shape"]["rows"] == 16 and r["shape"]["updates_per_rollout"] == 2
    for side in ("m1jax", "trl"):
        assert len(r[side]["times_s"]) == r["warmup"] + r["steps"]
        assert r[side]["step_s"] > 0
    assert set(r["m1jax"]["phases_s"]) >= {"gen_time_s", "reward_time_s", "logprob_time_s", "update_time_s"}
    assert len(r["trl"]["optimizer_step_times_s"]) == 2 * (r["warmup"] + r["steps"])
    assert r["ratio"] > 0
