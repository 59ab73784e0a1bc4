"""Multi-turn episodes on the rollout engine: model turn, environment step, next turn.

`run` plays R episodes at once, in rounds. A round samples the next turn of every episode that is
ready with `rl.sampler.sample` (one call: continuous batching over the engine's slots; the first
round's G samples of a prompt share their prefill), with the episode so far as the prompt, so no
cache crosses a turn (the context is prefilled again: recompute, as for partial rollouts). A turn
ends at end-of-sequence (the episode ends), at `</tool_call>` (the environment's step starts on a
thread pool and the observation is appended as `<tool_response>text</tool_response>`), or at the
turn budget `sp.max_new_tokens`. The next round takes the episodes whose steps have finished, once
all have or `stall_s` after it began waiting: a slow tool holds back its own episode, not the
others. (Tools slower than `stall_s` in all split a turn over several smaller rounds, each an engine
call; and which episodes share a round then depends on timing, which can move a sampled token's
logits in their last bits through the batched prefill.) An episode ends at `budget` tokens after
the prompt (model and tool tokens together, [R, budget] arrays) or after `max_turns` model turns.
A model that writes `<tool_response>` itself (an invented observation) ends its turn there and
reads an error observation (counted in `tool_errors`).

The result is a `Rollout` over the tokens after the prompt: `mask` is 1 on the model's tokens only
(tool tokens carry no loss) and `context` is 1 on every token of the episode (tool tokens are still
attended to by the trainer's forward); `logprobs` are the sampler's, 0 on tool tokens. Turn t of
episode i draws its tokens from key id i * max_turns + t, so an episode is a function of (rng, its
prompt, the params, its environment's answers), not of which round or batch-mates its turns had
(up to floating-point rounding of the batched prefill, as in `rl.engine`).

Compiled shapes stay few: after the first round every context is left-padded to one width (the
padded prompt plus the budget) and the rows are padded to a power of two (repeats of the last one,
whose samples are dropped), so a run compiles the sampler for about log2(R) row counts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

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
    stall_s: float = 0.5,
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
    turn = np.zeros((r,), np.int32)  # model turns taken

    def sample_turns(rows: list[int]) -> list[tuple[int, str | None]]:
        """Sample the next turn of episodes `rows`; returns the (episode, turn text) pairs that call
        for an environment step (text None: an invented observation). Turn t of episode i draws
        with key id i * max_turns + t, whatever else is sampled beside it."""
        ctx = [list(prompts[i]) + tokens[i, : length[i]].tolist() for i in rows]
        kids = [i * max_turns + int(turn[i]) for i in rows]
        if all(turn[i] == 0 for i in rows):  # first turns: plain sampling (groups share their prefill)
            out = sampler(cfg, params, ctx, turn_sp, rng, pad_multiple=pad_multiple, key_ids=kids)
        else:  # fixed shapes: pow2 rows, one width (extra rows repeat the last and are ignored)
            extra = (1 << (len(ctx) - 1).bit_length()) - len(ctx)
            out = sampler(
                cfg,
                params,
                ctx + [ctx[-1]] * extra,
                turn_sp,
                rng,
                pad_multiple=width,
                key_ids=kids + [kids[-1]] * extra,
            )
        out = jax.device_get(out)
        calls = []
        for k, i in enumerate(rows):
            n = int(out.lengths[k])
            ids = np.asarray(out.tokens[k, :n])
            turn[i] += 1
            fits = append(i, ids, np.asarray(out.logprobs[k, :n]), model=True)
            why = int(out.finish[k])
            if not fits or why == FINISH_LENGTH:  # the episode's or the turn's budget is spent
                finish[i] = FINISH_LENGTH
            elif why == FINISH_CONFIDENT:
                finish[i] = FINISH_CONFIDENT
            elif ids[-1] == end_call:
                calls.append((i, tokenizer.decode(ids.tolist())))
            elif ids[-1] == open_resp:  # an invented observation: refused, as an error the model reads
                calls.append((i, None))
            else:  # end-of-sequence (or another stop token): the final answer
                finish[i] = FINISH_STOP
        return calls

    def observe(i: int, res) -> bool:
        """Apply step result `res` to episode i; True when it takes another turn."""
        if res is None:  # the environment raised: counted and logged by _step
            counts["env_errors"][i] += 1
            turn_reward[i] = np.nan
            finish[i] = FINISH_STOP
            return False
        turn_reward[i] += res.reward
        counts["tool_calls"][i] += int(res.info.get("tool_calls", 0))
        counts["tool_errors"][i] += int(res.info.get("tool_errors", 0))
        if res.observation:
            ids = [open_resp] + tokenizer.encode(res.observation, special=False) + [close_resp]
            if not append(i, np.asarray(ids, np.int32), np.zeros(len(ids), np.float32), model=False):
                finish[i] = FINISH_LENGTH
                return False
        if res.done:
            finish[i] = FINISH_STOP
            return False
        if length[i] >= budget:
            finish[i] = FINISH_LENGTH
            return False
        if turn[i] >= max_turns:  # still asking for tools after its last turn
            counts["turn_limit"][i] = 1
            finish[i] = FINISH_LENGTH
            return False
        return True

    # Rounds: sample every episode that is ready, then start its environment step on the pool. The
    # next round takes the episodes whose steps are done once all are, or `stall_s` after the wait
    # began, so a slow tool holds back only its own episode.
    ready, pending = list(range(r)), {}
    with ThreadPoolExecutor(workers, thread_name_prefix="m1jax-env") as pool:
        while ready or pending:
            if ready:
                for i, text in sample_turns(sorted(ready)):
                    pending[i] = pool.submit(_step, envs[i], text)
            ready = []
            if pending:
                wait(pending.values(), timeout=stall_s)
                if not any(f.done() for f in pending.values()):
                    wait(pending.values(), return_when=FIRST_COMPLETED)
            for i in sorted(pending):
                if pending[i].done() and observe(i, pending.pop(i).result()):
                    ready.append(i)
    counts["turns"][:] = turn
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
        kw |= dict(sampler=sampler, workers=e.workers, stall_s=e.stall_s)
        return run(cfg, params, tokenizer, episodes, prompts, turn, rng, **kw)


def metrics(counters: dict, prefix: str = "") -> dict[str, float]:
    """Per-episode means of the counters (tool calls, tool errors, turns), the environment failures
    (a count) and the fraction of episodes stopped by the turn limit."""
    out = {f"{prefix}{k}": float(np.mean(counters[k])) for k in ("turns", "tool_calls", "tool_errors")}
    out[f"{prefix}env_errors"] = float(np.sum(counters["env_errors"]))
    out[f"{prefix}turn_limit_fraction"] = float(np.mean(counters["turn_limit"]))
    return out
