"""Multi-turn episodes on the rollout engine: model turn, environment step, next turn.

`run` plays R episodes at once. Each turn samples the live episodes' next turns with
`rl.sampler.sample` (one call: continuous batching over the engine's slots; the first turn's G
samples of a prompt share its prefill), with the episode so far as the prompt, so no cache
crosses a turn (the context is prefilled again: recompute, as for partial rollouts). A turn ends
at end-of-sequence (the episode ends), at `</tool_call>` (the environment steps: the turns of all
episodes step concurrently on a thread pool, and the observation is appended as
`<tool_response>text</tool_response>`), or at the turn budget `sp.max_new_tokens`. The episode
ends at `budget` tokens after the prompt (model and tool tokens together, [R, budget] arrays) or
after `max_turns` model turns. A model that writes `<tool_response>` itself (an invented
observation) ends its turn there and reads an error observation (counted in `tool_errors`).

Compiled shapes stay few: from the second turn on, every context is left-padded to one width (the
padded prompt plus the budget) and the live rows are padded to a power of two (repeats of the last
one, whose samples are dropped), so an RL run compiles the sampler for about log2(R) row counts.

The result is a `Rollout` over the tokens after the prompt: `mask` is 1 on the model's tokens only
(tool tokens carry no loss) and `context` is 1 on every token of the episode (tool tokens are still
attended to by the trainer's forward); `logprobs` are the sampler's, 0 on tool tokens. Turn t
draws its tokens with key fold_in(rng, t) and each episode's row among those still live, so the
batch of episodes is a function of (rng, the prompts, the params, the environment's answers).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from rl import envs as env_lib
from rl import tools as tool_lib
from rl.sampler import FINISH_CONFIDENT, FINISH_LENGTH, FINISH_STOP, Rollout, SamplingParams, pad_prompts, sample

log = logging.getLogger("m1jax")
COUNTERS = ("turns", "tool_calls", "tool_errors", "env_errors", "turn_limit")


def tool_ids(tokenizer) -> tuple[int, int, int, int]:
    """Ids of <tool_call>, </tool_call>, <tool_response>, </tool_response>; ValueError naming the
    tokenizer when it lacks them (use "byte+tools", or an HF vocabulary holding the four)."""
    ids = [tokenizer.token_to_id(s) for s in (tool_lib.CALL, tool_lib.END_CALL, tool_lib.RESPONSE,
                                               tool_lib.END_RESPONSE)]  # fmt: skip
    if any(i is None for i in ids):
        raise ValueError(
            f"tokenizer {tokenizer!r} has no single ids for the tool-call tokens {tool_lib.CALL} {tool_lib.END_CALL} "
            f"{tool_lib.RESPONSE} {tool_lib.END_RESPONSE}: set data.tokenizer='byte+tools' (in pretraining)"
        )
    return tuple(ids)


def run(
    cfg,
    params,
    tokenizer,
    envs: Sequence[env_lib.Env],
    prompts: Sequence[Sequence[int]],
    sp: SamplingParams,
    rng,
    *,
    budget: int,
    max_turns: int,
    pad_multiple: int = 32,
    sampler=sample,
    workers: int = 8,
) -> Rollout:
    """Play one episode per (env, prompt ids) pair; `sp.max_new_tokens` is each turn's budget and
    `budget` the episode's (tokens after the prompt). The envs were reset by the caller. The
    rollout's `episode` holds the counters [R] (COUNTERS) and "turn_reward" [R] (float64, the summed
    per-turn rewards; NaN where the environment failed)."""
    if len(envs) != len(prompts):
        raise ValueError(f"episodes.run: {len(envs)} environments for {len(prompts)} prompts")
    if budget < 1 or max_turns < 1:
        raise ValueError(f"episodes.run: need budget >= 1 and max_turns >= 1, got {budget}, {max_turns}")
    _, end_call, open_resp, close_resp = tool_ids(tokenizer)
    r, pad = len(prompts), sp.pad_id
    tokens = np.full((r, budget), pad, np.int32)
    logp = np.zeros((r, budget), np.float32)
    mask = np.zeros((r, budget), np.float32)
    context = np.zeros((r, budget), np.float32)
    length = np.zeros((r,), np.int32)
    finish = np.full((r,), FINISH_LENGTH, np.int32)
    counts = {k: np.zeros((r,), np.int32) for k in COUNTERS}
    turn_reward = np.zeros((r,), np.float64)
    turn_sp = dataclasses.replace(sp, max_new_tokens=min(sp.max_new_tokens, budget),
                                  stop_tokens=tuple(sp.stop_tokens) + (end_call, open_resp))  # fmt: skip

    def append(i, ids, lp, model: bool) -> bool:
        """Write ids after episode i's tokens; False when they did not all fit (budget spent)."""
        room = budget - length[i]
        k = min(len(ids), room)
        a, b = length[i], length[i] + k
        tokens[i, a:b], logp[i, a:b] = ids[:k], lp[:k]
        mask[i, a:b], context[i, a:b] = float(model), 1.0
        length[i] = b
        return k == len(ids)

    width = -(-max(len(p) for p in prompts) // pad_multiple) * pad_multiple + budget  # turns >= 1: one width
    live = list(range(r))
    with ThreadPoolExecutor(workers, thread_name_prefix="m1jax-env") as pool:
        for t in range(max_turns):
            if not live:
                break
            ctx = [list(prompts[i]) + tokens[i, : length[i]].tolist() for i in live]
            key = jax.random.fold_in(rng, t)
            if t == 0:  # the first turn is plain sampling (its groups share their prefill)
                out = jax.device_get(sampler(cfg, params, ctx, turn_sp, key, pad_multiple=pad_multiple))
            else:  # fixed shapes: pow2 rows, one width (extra rows repeat the last and are ignored)
                ctx = ctx + [ctx[-1]] * ((1 << (len(ctx) - 1).bit_length()) - len(ctx))
                out = jax.device_get(sampler(cfg, params, ctx, turn_sp, key, pad_multiple=width))
            stepping, turns = [], []
            for k, i in enumerate(live):
                n = int(out.lengths[k])
                ids = np.asarray(out.tokens[k, :n])
                counts["turns"][i] += 1
                fits = append(i, ids, np.asarray(out.logprobs[k, :n]), model=True)
                why = int(out.finish[k])
                if not fits or why == FINISH_LENGTH:  # the episode's or the turn's budget is spent
                    finish[i] = FINISH_LENGTH
                elif why == FINISH_CONFIDENT:
                    finish[i] = FINISH_CONFIDENT
                elif ids[-1] == end_call:
                    stepping.append(i)
                    turns.append(tokenizer.decode(ids.tolist()))
                elif ids[-1] == open_resp:  # an invented observation: refused, as an error the model reads
                    stepping.append(i)
                    turns.append(None)
                else:  # end-of-sequence (or another stop token): the final answer
                    finish[i] = FINISH_STOP
            results = list(pool.map(lambda a: _step(envs[a[0]], a[1]), zip(stepping, turns, strict=True)))
            nxt = []
            for i, res in zip(stepping, results, strict=True):
                if res is None:  # the environment raised: counted and logged by _step
                    counts["env_errors"][i] += 1
                    turn_reward[i] = np.nan
                    finish[i] = FINISH_STOP
                    continue
                turn_reward[i] += res.reward
                counts["tool_calls"][i] += int(res.info.get("tool_calls", 0))
                counts["tool_errors"][i] += int(res.info.get("tool_errors", 0))
                if res.observation:
                    ids = [open_resp] + tokenizer.encode(res.observation, special=False) + [close_resp]
                    if not append(i, np.asarray(ids, np.int32), np.zeros(len(ids), np.float32), model=False):
                        finish[i] = FINISH_LENGTH
                        continue
                if res.done:
                    finish[i] = FINISH_STOP
                elif length[i] >= budget:
                    finish[i] = FINISH_LENGTH
                else:
                    nxt.append(i)
            live = nxt
    for i in live:  # still asking for tools after max_turns
        counts["turn_limit"][i] = 1
        finish[i] = FINISH_LENGTH
    prompt, prompt_lengths = pad_prompts(cfg, prompts, sp, pad_multiple)
    return Rollout(prompt, prompt_lengths, tokens, logp, mask, length, finish, context=context,
                   episode=dict(counts, turn_reward=turn_reward))  # fmt: skip


def _step(env, turn: str | None):
    if turn is None:
        msg = f"error: {tool_lib.RESPONSE} is written by the tool; call one with {tool_lib.CALL}NAME, a newline, input"
        return env_lib.StepResult(msg, info={"tool_errors": 1})
    try:
        return env.step(turn)
    except Exception:
        log.exception(f"environment {type(env).__name__} raised in step(); the episode ends with an invalid reward")
        return None


def play(c, cfg, params, tokenizer, texts: Sequence[str], refs, sp: SamplingParams, rng, *, sampler=sample) -> Rollout:
    """Episodes of environment `c.rl.env.name` for prompt texts (repeat one G times in a row for a
    group) on a fresh tool pool: `sp.max_new_tokens` is the episode budget, `rl.env.turn_tokens`
    (0 = the same) each turn's."""
    e = c.rl.env
    names = tool_lib.parse_names(e.tools)
    with tool_lib.ToolPool(names, workers=e.workers, timeout_s=e.timeout_s, max_output=e.max_output) as pool:
        episodes = [env_lib.make(e.name, pool=pool) for _ in texts]
        prompts = [
            tokenizer.encode(env.reset(t, ref), bos=True) for env, t, ref in zip(episodes, texts, refs, strict=True)
        ]
        turn = dataclasses.replace(sp, max_new_tokens=min(e.turn_tokens or sp.max_new_tokens, sp.max_new_tokens))
        kw = dict(budget=sp.max_new_tokens, max_turns=e.max_turns, pad_multiple=c.rl.sampling.pad_multiple)
        return run(cfg, params, tokenizer, episodes, prompts, turn, rng, sampler=sampler, workers=e.workers, **kw)


def metrics(counters: dict, prefix: str = "") -> dict[str, float]:
    """Per-episode means of the counters (tool calls, tool errors, turns), the environment failures
    (a count) and the fraction of episodes stopped by the turn limit."""
    out = {f"{prefix}{k}": float(np.mean(counters[k])) for k in ("turns", "tool_calls", "tool_errors")}
    out[f"{prefix}env_errors"] = float(np.sum(counters["env_errors"]))
    out[f"{prefix}turn_limit_fraction"] = float(np.mean(counters["turn_limit"]))
    return out
