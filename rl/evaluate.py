"""Held-out evaluation of a policy: greedy reward and exact-answer accuracy, and the accuracy of
sampled responses at the training temperature (avg@k), each with its standard error over prompts;
`paired_change` compares two evaluations on the same prompts."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from rl import episodes
from rl import prompts as prompt_lib
from rl import rewards as reward_lib
from rl.config import max_new_tokens_at, reward_weights
from rl.sampler import SamplingParams, sample


def decode_responses(tokenizer, rollout, stop_id) -> list[str]:
    """The response texts the rewards read: of a multi-turn episode, the model's own tokens only (a
    tool's output must not answer for the model), its turns joined."""
    toks, lengths = np.asarray(rollout.tokens), np.asarray(rollout.lengths)
    own = None if rollout.context is None else np.asarray(rollout.mask) > 0
    out = []
    for row, (t, n) in enumerate(zip(toks, lengths, strict=True)):
        ids = (t[:n] if own is None else t[:n][own[row, :n]]).tolist()
        if ids and ids[-1] == stop_id:
            ids = ids[:-1]
        out.append(tokenizer.decode(ids))
    return out


def exact(c, texts, refs) -> np.ndarray:
    """1.0 where the answer is exactly right (the task family's check, or all positions for the toy)."""
    if c.data.source == "file":  # full marks of the first accuracy reward configured (validate ensures one)
        from rl.prompt_files import NEEDS

        return reward_lib.get(next(n for n in reward_weights(c.rl.reward) if n in NEEDS))(texts, refs) >= 1.0
    return reward_lib.get("positions" if c.data.source != "tasks" else "task")(texts, refs) >= 1.0


def _se(x: np.ndarray) -> float:
    """Standard error of the mean of per-prompt values."""
    return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def paired_change(before: dict, after: dict) -> dict:
    """Per-prompt arrays of two `evaluate(..., per_prompt=)` calls on the same held-out prompts ->
    {metric: {"delta", "se", "z"}}: the mean change and its paired standard error (the prompts are
    the same, so prompt difficulty cancels out of the error)."""
    out = {}
    for k in before.keys() & after.keys():
        d = np.asarray(after[k], np.float64) - np.asarray(before[k], np.float64)
        se = _se(d)
        out[k] = {"delta": float(d.mean()), "se": se, "z": float(d.mean() / se) if se > 0 else 0.0}
    return out


def evaluate(
    cfg, params, tokenizer, c, reward_fn, per_prompt: dict | None = None, max_new_tokens: int | None = None
) -> dict:
    """Held-out prompts: greedy mean reward and exact-answer accuracy, and the accuracy of
    `eval_samples` sampled responses per prompt at the training temperature (avg@k), each with
    its standard error over prompts (`*_se`). Prompts and sampling keys are fixed, so two calls
    see the same prompts; `per_prompt`, if given, receives the per-prompt values. `max_new_tokens`:
    the generation budget (default: step 0's of `rl.sampling.max_new_tokens_schedule`)."""
    split = "test" if c.data.source == "tasks" else "eval"
    pairs = prompt_lib.for_config(c, -1, c.eval.prompts, split=split)
    s = c.rl.sampling
    n = max_new_tokens or max_new_tokens_at(c, 0)
    sp = SamplingParams(n, greedy=True, stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)

    def responses(texts, refs, sp, key):  # one response per prompt text, or one episode (rl.env)
        if c.rl.env.name:
            return episodes.play(c, cfg, params, tokenizer, texts, refs, sp, key)
        prompts = [tokenizer.encode(p, bos=True) for p in texts]
        return sample(cfg, params, prompts, sp, key, pad_multiple=c.rl.sampling.pad_multiple)

    refs = [ref for _, ref in pairs]
    r = responses([p for p, _ in pairs], refs, sp, jax.random.PRNGKey(0))
    texts = decode_responses(tokenizer, r, tokenizer.eos_id)
    vals = {"eval_reward": np.asarray(reward_fn(texts, refs)), "eval_accuracy": exact(c, texts, refs).astype(float)}
    if r.episode is not None:  # (greedy episodes' tool use, per prompt)
        vals |= {f"eval_{k}": np.asarray(r.episode[k], float) for k in ("turns", "tool_calls", "tool_errors")}
    if c.eval.samples > 0:  # the sampling policy RL optimises: accuracy averaged over k samples per prompt
        sp = dataclasses.replace(sp, greedy=False, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        k_refs = [ref for ref in refs for _ in range(c.eval.samples)]
        r = responses([p for p, _ in pairs for _ in range(c.eval.samples)], k_refs, sp, jax.random.PRNGKey(1))
        hits = exact(c, decode_responses(tokenizer, r, tokenizer.eos_id), k_refs).astype(float)
        vals["eval_sampled_accuracy"] = hits.reshape(len(pairs), c.eval.samples).mean(axis=1)
    if per_prompt is not None:
        per_prompt.update(vals)
    out = {k: float(np.mean(v)) for k, v in vals.items()}
    out |= {f"{k}_se": _se(v) for k, v in vals.items() if k != "eval_reward"}
    return out
