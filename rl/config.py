"""The RL config: an `ml_collections.ConfigDict` with few keys, checked before anything compiles.

One step = sample `prompts_per_step` prompts, `samples_per_prompt` responses each (a group),
score them, compute group-relative advantages, then `updates_per_rollout` optimizer updates on
disjoint minibatches of that rollout batch (off-policy after the first; M1 used 16).
"""

from __future__ import annotations

import ml_collections

from m1jax.train.config import base_config as pretrain_base
from m1jax.train.config import checker, model_config
from rl import advantages, losses, rewards

OLD_LOGP = ("trainer", "sampler")
SOURCES = ("tasks", "toy_copy", "toy_reverse")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""  # a pretraining workdir (model, tokenizer and params); "" = from scratch with `model`
    c.model = ml_collections.ConfigDict({"preset": "tiny"})
    c.steps = 100
    c.prompts_per_step = 16
    c.samples_per_prompt = 8
    c.updates_per_rollout = 4
    c.micro_batches = 1  # gradient accumulation inside each minibatch update
    # Objective: a name from rl.losses, each with its own knobs (absolute ratio bounds; 0 = none).
    c.loss = "cispo"
    c.aggregation = ""  # "" = the loss's default ("token_mean"; GRPO / GSPO: "seq_mean")
    c.cispo = ml_collections.ConfigDict(
        {"ratio_max": 5.0, "ratio_min": 0.0, "mask_ratio_max": 0.0, "mask_ratio_min": 0.0}
    )
    c.grpo = ml_collections.ConfigDict({"clip_low": 0.8, "clip_high": 1.2})
    c.dapo = ml_collections.ConfigDict({"clip_low": 0.8, "clip_high": 1.28})
    c.gspo = ml_collections.ConfigDict({"clip_low": 1.0 - 3e-4, "clip_high": 1.0 + 4e-4})
    c.kl_coef = 0.0  # k3 KL to the initial (reference) policy; always logged
    c.advantage = "group"
    c.zero_variance = "drop"  # or "keep" (with zero advantage)
    c.old_logp = "trainer"  # recomputed by the trainer in fp32, or the sampler's
    c.mask_truncated = False  # DAPO overlong filtering: no gradient from responses cut at max_new_tokens
    # Optimizer (M1: AdamW 0.9 / 0.95, eps 1e-15).
    c.learning_rate = 1e-5
    c.warmup_steps = 0
    c.b1 = 0.9
    c.b2 = 0.95
    c.eps = 1e-15
    c.weight_decay = 0.0
    c.grad_clip = 1.0
    c.aux_loss = True  # keep the MoE load-balancing loss
    # Sampling.
    c.max_new_tokens = 96
    c.temperature = 1.0
    c.top_p = 1.0
    c.top_k = 0
    c.confident_run = 3000  # stop a response after this many consecutive tokens with p > confident_prob
    c.confident_prob = 0.99
    # Prompts and rewards: the embedded task family (or a toy), rewards by name:weight.
    c.data = ml_collections.ConfigDict()
    c.data.source = "tasks"
    c.data.seed = 0
    c.data.tasks = ("add", "sub", "mul", "copy", "reverse", "sort", "linear")
    c.data.toy_length = 4
    c.data.tokenizer = "byte"
    c.reward = "task"  # e.g. "task:1.0,format:0.1"
    # Logging, evaluation, checkpoints, mesh.
    c.log_every = 1
    c.eval_every = 25
    c.eval_prompts = 64
    c.eval_samples = 4  # sampled responses per held-out prompt for eval_sampled_accuracy (0: greedy only)
    c.checkpoint_every = 25
    c.keep_checkpoints = 3
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, "sequence": 1})
    return c


def reward_weights(spec: str) -> dict[str, float]:
    """ "task:1.0,format:0.1" -> {"task": 1.0, "format": 0.1}; a bare name weighs 1."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition(":")
        try:
            out[name.strip()] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"config.reward={spec!r}: weight {w!r} of {name!r} is not a number") from None
    if not out:
        raise ValueError("config.reward is empty; name at least one reward, e.g. 'task'")
    return out


def loss_kwargs(c) -> dict:
    """Keyword arguments of the configured loss (0 bounds mean "none")."""
    if c.loss == "cispo":
        k = c.cispo
        none0 = lambda v: None if v == 0 else v
        kw = {"ratio_max": k.ratio_max, "ratio_min": none0(k.ratio_min)}
        kw.update(mask_ratio_max=none0(k.mask_ratio_max), mask_ratio_min=none0(k.mask_ratio_min))
    else:
        kw = dict(c[c.loss])
    if c.aggregation:
        kw["aggregation"] = c.aggregation
    return kw


def validate(c: ml_collections.ConfigDict) -> None:
    need = checker(c, base_config())

    for f in ("steps", "prompts_per_step", "samples_per_prompt", "updates_per_rollout", "micro_batches"):
        need(int(c[f]) >= 1, f, "must be a positive integer")
    for f in ("max_new_tokens", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        need(int(c[f]) >= 1, f, "must be a positive integer")
    rows = c.prompts_per_step * c.samples_per_prompt
    per_update = c.updates_per_rollout * c.micro_batches
    need(rows % per_update == 0, "updates_per_rollout", f"x micro_batches must divide the {rows} rollout rows")
    need(c.samples_per_prompt >= 2, "samples_per_prompt", "group-relative advantages need >= 2 samples per prompt")
    need(c.loss in losses.LOSSES, "loss", f"must be one of {sorted(losses.LOSSES)}")
    need(c.aggregation in ("", "token_mean", "seq_mean"), "aggregation", "must be '', 'token_mean' or 'seq_mean'")
    need(c.advantage in advantages.ESTIMATORS, "advantage", f"must be one of {sorted(advantages.ESTIMATORS)}")
    need(c.zero_variance in ("drop", "keep"), "zero_variance", "must be 'drop' or 'keep'")
    need(c.old_logp in OLD_LOGP, "old_logp", f"must be one of {OLD_LOGP}")
    need(
        c.old_logp == "trainer" or (c.top_p == 1 and c.top_k == 0),
        "old_logp",
        "'sampler' log-probs are of the top-p / top-k truncated distribution, not pi_old: use 'trainer'",
    )
    need(c.learning_rate > 0, "learning_rate", "must be positive")
    need(c.eps > 0, "eps", "must be positive")
    need(c.temperature > 0, "temperature", "must be positive")
    need(0 < c.top_p <= 1, "top_p", "must lie in (0, 1]")
    need(c.kl_coef >= 0, "kl_coef", "must be >= 0")
    need(c.data.source in SOURCES, "data", f"data.source must be one of {SOURCES}")
    if c.loss == "cispo":
        need(c.cispo.ratio_max > max(c.cispo.ratio_min, 0.0), "cispo", "ratio_max must exceed ratio_min")
    unknown = sorted(set(reward_weights(c.reward)) - set(rewards.available()))
    need(not unknown, "reward", f"unknown reward(s) {unknown}; available: {', '.join(rewards.available())}")
    pre = pretrain_base()
    pre.model = c.model
    model_config(pre)  # unknown model fields / presets fail here (with init_from, too: a typo is no less one)
