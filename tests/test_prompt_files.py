"""rl.prompt_files: math and code prompts from local jsonl / parquet files, checked row by row."""

from __future__ import annotations

import json

import pytest

from rl import prompt_files, rewards
from rl.config import base_config, validate
from rl.evaluate import exact
from rl.prompts import for_config


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return prompt_files.write_examples(str(tmp_path_factory.mktemp("prompts")))


def file_config(path, reward):
    c = base_config()
    c.data.source, c.data.prompts, c.rl.reward = "file", path, reward
    c.eval.prompts = 8
    return c


def test_example_files_feed_the_math_and_code_rewards(examples):
    math_rows = prompt_files.load(examples["math"], "prompt", ("math",))
    code_rows = prompt_files.load(examples["code"], "prompt", ("code",))
    assert len(math_rows) == 64 and len(code_rows) == 32
    refs = [r for _, r in math_rows[:6]]
    assert rewards.get("math")([f"</think> \\boxed{{{r['answer']}}}" for r in refs], refs).tolist() == [1.0] * 6
    assert rewards.get("math")(["</think> 0.123"] * 6, refs).tolist() == [0.0] * 6
    refs = [r for _, r in code_rows[:3]]
    right = [f"```python\n{r['solution']}```" for r in refs]
    assert rewards.get("code")(right, refs).tolist() == [1.0] * 3
    assert rewards.get("code")(["```python\ndef add_k(x):\n    return 0\n```"] * 3, refs).tolist() == [0.0] * 3


def test_steps_draw_train_rows_and_evaluation_holds_out_the_last(examples):
    c = file_config(examples["math"], "math")
    validate(c)
    ev = for_config(c, -1, 8)
    rows = prompt_files.load(examples["math"], "prompt", ("math",))
    assert ev == rows[-8:]
    a, b = for_config(c, 3, 16), for_config(c, 3, 16)
    assert a == b and a != for_config(c, 4, 16)  # a pure function of (seed, step)
    assert all(p not in rows[-8:] for p in a)
    refs = [r for _, r in ev]
    assert exact(c, [f"\\boxed{{{r['answer']}}}" for r in refs], refs).all()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "rows, reward, match",
    [
        ([{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2"}], "math", r"line 2 has no field 'answer'"),
        ([{"question": "1+1", "answer": "2"}], "math", r"line 1 has no field 'prompt'"),
        ([{"prompt": "1+1", "answer": "2"}, "{oops"], "math", r"line 2 is not JSON"),
        ([{"prompt": "1+1", "answer": "\\frac{"}], "math", r"line 1, field 'answer': math-verify cannot parse"),
        ([{"prompt": "f", "answer": "1"}], "code", r"line 1 has no field 'tests'"),
        ([{"prompt": ["a"], "tests": "assert 1"}], "code", r"line 1, field 'prompt' is a list"),
    ],
)
def test_bad_rows_name_the_file_row_and_field(tmp_path, rows, reward, match):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=match) as e:
        validate(file_config(path, reward))
    assert "bad.jsonl" in str(e.value)


def test_bad_paths_name_the_field(tmp_path, examples):
    with pytest.raises(ValueError, match="data.prompts"):
        validate(file_config("", "math"))
    with pytest.raises(ValueError, match="rl.reward.*must include one of"):
        validate(file_config(examples["math"], "format"))
    with pytest.raises(ValueError, match="no such file"):
        validate(file_config(str(tmp_path / "missing.jsonl"), "math"))
    (tmp_path / "p.csv").write_text("prompt,answer\n")
    with pytest.raises(ValueError, match=".jsonl or .parquet"):
        validate(file_config(str(tmp_path / "p.csv"), "math"))
    # a parquet row is named by its 0-based index
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "tests": "assert 1"}, {"prompt": "b", "tests": None}]),
                   tmp_path / "c.parquet")  # fmt: skip
    with pytest.raises(ValueError, match=r"c.parquet: row 1 has no field 'tests'"):
        validate(file_config(str(tmp_path / "c.parquet"), "code"))


@pytest.mark.slow
def test_rl_run_on_a_math_prompt_file(tmp_path, examples):
    from rl.loop import train

    c = file_config(examples["math"], "math")
    c.model.preset, c.model.vocab_size = "tiny", 272
    c.steps = 1
    c.eval.update(every=1, prompts=4, samples=2)
    c.rl.update(prompts_per_step=4, samples_per_prompt=2, updates_per_rollout=1)
    c.rl.sampling.update(max_new_tokens=8, pad_multiple=16)
    summary = train(c, str(tmp_path), progress=False)
    assert summary["end_step"] == 1
    for k in ("eval_accuracy", "eval_sampled_accuracy", "eval_reward"):
        assert 0.0 <= summary["final"][k] <= 1.0
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert any("reward" in r and r["invalid_rewards"] == 0 for r in rows)
