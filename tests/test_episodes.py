"""rl.episodes / rl.envs: multi-turn tool episodes on the rollout engine, their masks, budgets and
failures, the trainer's log-probs over tool output, and an RL run with environment "tools"."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax import M1Model, config
from m1jax.data.tokenizer import ByteTokenizer, load_tokenizer
from rl import envs, episodes, tools
from rl.config import base_config, validate
from rl.evaluate import decode_responses
from rl.sampler import FINISH_LENGTH, FINISH_STOP, Rollout, SamplingParams, sequence_logprobs

TOK = load_tokenizer("byte+tools")
CALL = tools.format_call


def scripted(script: dict[str, list[str]]):
    """A sampler whose turn k of the episode whose prompt is `name` is script[name][k] (text, ending in
    "<eos>", "</tool_call>", or nothing: cut at the turn budget); its log-probs are -(position + 1)."""
    seen = []

    def sampler(cfg, params, prompts, sp, key, pad_multiple=32, key_ids=None):
        sampler.keys.append(list(key_ids))
        rows = []
        for ids in prompts:
            text = TOK.decode(ids)
            name = text[len("<bos>") :].split("|", 1)[0]
            turn = script[name][text.count("</tool_response>")]
            rows.append(TOK.encode(turn)[: sp.max_new_tokens])
            seen.append(text)
        n = sp.max_new_tokens
        toks = np.full((len(rows), n), sp.pad_id, np.int32)
        lengths = np.array([len(r) for r in rows], np.int32)
        for i, r in enumerate(rows):
            toks[i, : len(r)] = r
        stop = np.array([bool(r) and r[-1] in sp.stop_tokens for r in rows])
        finish = np.where(stop, FINISH_STOP, FINISH_LENGTH)
        mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
        logp = -(np.arange(n)[None] + 1.0) * mask
        return Rollout(None, None, toks, logp.astype(np.float32), mask, lengths, finish)

    sampler.seen, sampler.keys = seen, []
    return sampler


class Broken:
    def reset(self, prompt, ref):
        return prompt

    def step(self, turn):
        raise RuntimeError("environment bug")


def test_episode_turns_masks_budgets_and_failures(caplog):
    script = {
        "a": [CALL("calculator", "6*7"), "it is 42<eos>"],  # one call, then the answer
        "b": ["no tools<eos>"],
        "c": [CALL("calculator", "1"), CALL("calculator", "2"), CALL("calculator", "3")],  # turn limit
        "d": [CALL("calc", "1"), "x" * 100],  # unknown tool, then a turn cut by the episode budget
        "e": [CALL("calculator", "1")],  # the environment raises
        "f": ["<tool_call>calculator 1</tool_call>", "ok<eos>"],  # malformed call
        "g": ["I know: <tool_response>", "fine<eos>"],  # an observation the model invents is refused
    }
    sampler = scripted(script)
    sp = SamplingParams(128, stop_tokens=(TOK.eos_id,), pad_id=TOK.pad_id)
    with tools.ToolPool(["calculator"], workers=2) as pool:
        env = [envs.make("tools", pool=pool) for _ in range(6)]
        env.insert(4, Broken())
        prompts = [TOK.encode(name + "|", bos=True) for name in script]
        cfg, key = config.tiny(vocab_size=272), jax.random.PRNGKey(0)
        r = episodes.run(cfg, None, TOK, env, prompts, sp, key, budget=128, max_turns=3, sampler=sampler)
    text = lambda i, m=None: TOK.decode(
        r.tokens[i, : r.lengths[i]][(m if m is not None else r.context)[i, : r.lengths[i]] > 0]
    )
    call = CALL("calculator", "6*7")
    assert text(0) == call + "<tool_response>42</tool_response>it is 42<eos>"
    assert text(0, r.mask) == call + "it is 42<eos>"  # the loss sees the model's tokens only
    n_call = len(TOK.encode(call))
    obs = slice(n_call, n_call + len(TOK.encode("<tool_response>42</tool_response>")))
    assert (r.mask[0, obs] == 0).all() and (r.context[0, obs] == 1).all() and (r.logprobs[0, obs] == 0).all()
    np.testing.assert_array_equal(r.logprobs[0, :n_call], -(np.arange(n_call) + 1.0))  # the sampler's, in place
    assert r.context[0, r.lengths[0] :].sum() == 0 and (r.tokens[0, r.lengths[0] :] == TOK.pad_id).all()
    assert text(1) == "no tools<eos>" and r.finish[1] == FINISH_STOP
    assert r.finish[0] == FINISH_STOP and r.finish[2] == FINISH_LENGTH and r.finish[3] == FINISH_LENGTH
    assert r.lengths[3] == 128  # cut at the episode's budget
    assert "error: unknown tool 'calc'" in text(3)
    assert "<tool_response>error: malformed call" in text(5) and text(5).endswith("ok<eos>")
    c = r.episode
    assert "<tool_response><tool_response>error: <tool_response> is written by the tool" in text(6)
    assert text(6).endswith("</tool_response>fine<eos>")
    np.testing.assert_array_equal(c["turns"], [2, 1, 3, 2, 1, 2, 2])
    np.testing.assert_array_equal(c["tool_calls"], [1, 0, 3, 1, 0, 1, 0])
    np.testing.assert_array_equal(c["tool_errors"], [0, 0, 0, 1, 0, 1, 1])
    np.testing.assert_array_equal(c["turn_limit"], [0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(c["env_errors"], [0, 0, 0, 0, 1, 0, 0])
    # Rewards read the model's own tokens: the tool's output does not answer for it.
    texts = decode_responses(TOK, r, TOK.eos_id)
    assert texts[0] == call + "it is 42" and texts[6] == "I know: <tool_response>fine"
    assert np.isnan(c["turn_reward"][4]) and np.isfinite(np.delete(c["turn_reward"], 4)).all()
    assert "environment Broken raised" in caplog.text
    m = episodes.metrics(c)
    assert m["tool_calls"] == pytest.approx(6 / 7) and m["env_errors"] == 1 and m["turn_limit_fraction"] == 1 / 7
    # The prompt rows are the left-padded prompts the trainer needs.
    assert r.prompt.shape == (7, 32) and list(r.prompt_lengths) == [len(p) for p in prompts]


def test_episodes_need_the_tool_tokens():
    with pytest.raises(ValueError, match="byte\\+tools"):
        episodes.tool_ids(ByteTokenizer())
    with pytest.raises(KeyError, match="unknown environment 'nope'"):
        envs.make("nope")


@pytest.mark.slow
def test_trainer_logprobs_over_tool_output_match_the_sampler():
    """Real episodes of a random tiny model: the trainer's teacher-forced log-probs of the model's
    tokens, with the tool output in the context, equal the sampler's; without it they do not."""
    cfg = dataclasses.replace(config.tiny(vocab_size=272), lm_head_fp32=True)
    params = nn.unbox(M1Model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    with tools.ToolPool(["calculator"]) as pool:
        env = [envs.make("tools", pool=pool) for _ in range(64)]
        prompts = [TOK.encode(e.reset(f"q{i // 8}", {}), bos=True) for i, e in enumerate(env)]
        sp = SamplingParams(32, stop_tokens=(TOK.eos_id,), pad_id=TOK.pad_id)
        r = episodes.run(cfg, params, TOK, env, prompts, sp, jax.random.PRNGKey(0), budget=96, max_turns=3,
                         pad_multiple=8)  # fmt: skip
    after_tool = (np.cumsum(r.context - r.mask, axis=1) > 0) & (r.mask > 0)
    assert r.episode["tool_calls"].sum() >= 3 and after_tool.sum() >= 30  # the case under test occurs
    fn = jax.jit(lambda p, *a: sequence_logprobs(cfg, p, *a)[0])
    on = r.mask > 0
    with_context = np.asarray(fn(params, r.prompt, r.prompt_lengths, r.tokens, r.mask, 1.0, None, r.context))
    np.testing.assert_allclose(with_context[on], r.logprobs[on], atol=2e-5)
    without = np.asarray(fn(params, r.prompt, r.prompt_lengths, r.tokens, r.mask, 1.0, None, None))
    assert np.abs(without - r.logprobs)[after_tool].max() > 1e-3


def tools_config():
    c = base_config()
    c.model.preset = "tiny"
    c.model.vocab_size = 272
    c.data.tokenizer = "byte+tools"
    c.data.tasks = ("add",)
    c.steps = 2
    c.eval.update(every=2, prompts=4, samples=2)
    c.checkpoint.every = 2
    c.rl.update(prompts_per_step=4, samples_per_prompt=4, updates_per_rollout=2)
    c.rl.sampling.max_new_tokens = 48
    c.rl.sampling.pad_multiple = 16
    c.rl.env.update(name="tools", tools="calculator,python", max_turns=2, turn_tokens=24, timeout_s=2.0)
    return c


@pytest.mark.slow
def test_rl_run_with_tool_episodes_logs_tool_use(tmp_path):
    from rl.loop import train

    summary = train(tools_config(), str(tmp_path), progress=False)
    with open(tmp_path / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    steps = [r for r in rows if "reward" in r]
    assert len(steps) == 2
    for r in steps:
        for k in ("turns", "tool_calls", "tool_errors", "env_errors", "turn_limit_fraction", "loss", "logp_gap"):
            assert np.isfinite(r[k]), k
        assert 1 <= r["turns"] <= 2 and r["env_errors"] == 0
        assert r["logp_gap"] < 1e-4  # the trainer sees the tool output the sampler saw
    for k in ("eval_turns", "eval_tool_calls", "eval_accuracy"):
        assert k in summary["final"] and k in summary["initial"]
    assert os.path.isdir(tmp_path / "checkpoints")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("rl.env.name", "chess", "rl.env.name"),
        ("rl.env.tools", "calculator,abacus", "abacus"),
        ("rl.env.max_turns", 0, "rl.env.max_turns"),
        ("rl.env.timeout_s", 0.0, "rl.env.timeout_s"),
        ("rl.sampling.partial", True, "rl.env.name"),
        ("data.source", "toy_copy", "rl.env.name"),
    ],
)
def test_env_config_errors_name_the_field(field, value, match):
    c = tools_config()
    c.rl.old_logp = "sampler"  # (partial rollouts need it; the others do not mind)
    c.update_from_flattened_dict({field: value})
    with pytest.raises(ValueError, match=match):
        validate(c)


def test_calc_task_demonstrates_the_calculator_and_mental_products():
    from m1jax.data import tasks

    exs = [e for _, e in zip(range(200), tasks.examples(0, "train", ("calc",)), strict=False)]
    tool = [e for e in exs if tools.CALL in e.reasoning]
    assert 0.35 < len(tool) / len(exs) < 0.65 and "calc" not in tasks.TASKS
    for e in tool[:20]:  # the demonstrated call, run for real, gives the demonstrated output
        call = tools.parse_call(e.reasoning.split(tools.RESPONSE)[0])
        assert call.name == "calculator" and tools.get("calculator")(call.arg, 1.0) == e.answer
        assert e.reasoning.endswith(tools.format_response(e.answer)) and tasks.score(e.completion, e.answer) == 1
        ids = TOK.encode(e.text)
        assert [i for i in ids if i >= 261] == [261, 262, 263, 264]
    head = [e for e in exs if tools.CALL not in e.reasoning]
    assert all(e.reasoning == tasks.mul_steps(*map(int, e.prompt[5:-3].split("*"))) for e in head)


def test_tool_configs_validate():
    import importlib.util

    from m1jax.train.config import validate as validate_pretrain

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mods = {}
    for name in ("pretrain_tools", "cispo_tools"):
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, "configs", f"{name}.py"))
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    pc = mods["pretrain_tools"].get_config()
    assert validate_pretrain(pc, tokenizer_vocab=load_tokenizer(pc.data.tokenizer).vocab_size).vocab_size == 272
    c = mods["cispo_tools"].get_config()
    validate(c)
    assert c.rl.env.name == "tools" and c.data.tasks == ("calc",)


def test_a_slow_tool_holds_back_only_its_own_episode():
    @tools.register("_test_slow")
    def slow(arg, timeout_s):
        time.sleep(2.0)
        return "late"

    script = {
        "slow": [CALL("_test_slow", ""), "done<eos>"],
        "quick": [CALL("calculator", "1+1"), CALL("calculator", "2+2"), CALL("calculator", "3+3"), "6<eos>"],
    }
    sampler = scripted(script)
    sp = SamplingParams(64, stop_tokens=(TOK.eos_id,), pad_id=TOK.pad_id)
    try:
        with tools.ToolPool(["calculator", "_test_slow"], workers=2, timeout_s=5.0) as pool:
            env = [envs.make("tools", pool=pool) for _ in script]
            prompts = [TOK.encode(name + "|", bos=True) for name in script]
            cfg, key = config.tiny(vocab_size=272), jax.random.PRNGKey(0)
            t0 = time.perf_counter()
            r = episodes.run(
                cfg, None, TOK, env, prompts, sp, key, budget=256, max_turns=4, sampler=sampler, stall_s=0.1
            )
            took = time.perf_counter() - t0
    finally:
        tools._REGISTRY.pop("_test_slow")
    order = [s.split("|")[0][len("<bos>") :] for s in sampler.seen]
    # the quick episode's four turns are all sampled before the slow one's second
    assert order[:2] == ["slow", "quick"] and order[2:5] == ["quick"] * 3 and order[5] == "slow", order
    assert took < 4, took
    assert r.episode["turns"].tolist() == [2, 4] and r.finish.tolist() == [FINISH_STOP, FINISH_STOP]
    assert sampler.keys == [[0, 4], [5], [6], [7], [1]]  # turn t of episode i: key id i * max_turns + t
    assert TOK.decode(r.tokens[0, : r.lengths[0]]).endswith("<tool_response>late</tool_response>done<eos>")
