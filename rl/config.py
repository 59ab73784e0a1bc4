"""The RL config: the shared sections of `m1jax.train.config` plus an `rl` section.

One step = sample `rl.prompts_per_step` prompts, `rl.samples_per_prompt` responses each (a group),
score them, compute group-relative advantages, then `rl.updates_per_rollout` optimizer updates on
disjoint minibatches of that rollout batch (off-policy after the first; M1 used 16). Each loss of
`rl.losses` has its knobs in `rl.<loss name>`, built from the registry.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from m1jax.train.config import SHARED_RENAMED, check_shared, checker, field, model_config, shared_config
from rl import advantages, losses, mismatch, rewards

OLD_LOGP = ("trainer", "sampler")
SOURCES = ("tasks", "toy_copy", "toy_reverse", "file")


def base_config() -> ml_collections.ConfigDict:
    c = shared_config()
    c.steps = 100
    # Optimizer (M1: AdamW 0.9 / 0.95, eps 1e-15), a constant learning rate after warmup.
    c.optim.update(learning_rate=1e-5, schedule="constant", warmup_steps=0, eps=1e-15, weight_decay=0.0)
    c.data.toy_length = 4  # digits of the toy_copy / toy_reverse prompts
    # source "file": prompts and their refs from a .jsonl / .parquet file (rl.prompt_files); its last
    # eval.prompts rows (at most half) are held out for evaluation
    c.data.prompts = ""
    c.data.prompt_field = "prompt"
    c.log.every = 1
    c.eval.update(every=25, prompts=64)
    c.eval.samples = 4  # sampled responses per held-out prompt for eval_sampled_accuracy (0: greedy only)
    c.checkpoint.every = 25
    r = c.rl = ml_collections.ConfigDict()
    r.init_from = ""  # a pretraining workdir (model, tokenizer and params); "" = from scratch with `model`
    r.prompts_per_step = 16
    r.samples_per_prompt = 8
    r.updates_per_rollout = 4
    r.loss = "cispo"  # a name from rl.losses; its knobs are in rl.<name>
    for name, entry in losses.LOSSES.items():
        r[name] = ml_collections.ConfigDict(dataclasses.asdict(entry.knobs()))
    r.kl_coef = 0.0  # k3 KL to the initial (reference) policy; always logged
    r.advantage = "group"
    r.zero_variance = "drop"  # or "keep" (with zero advantage)
    r.old_logp = "trainer"  # recomputed by the trainer in fp32, or the sampler's
    r.mask_truncated = False  # DAPO overlong filtering: no gradient from responses cut at max_new_tokens
    r.aux_loss = True  # keep the MoE load-balancing loss
    # Asynchronous off-policy RL (rl.worker): the batch of step s is sampled by the policy of step
    # max(0, s - max_staleness) in a rollout thread while the learner trains; 0 = synchronous.
    # > 0 needs the behaviour policy in the ratio: old_logp "sampler", or a mismatch correction.
    r.max_staleness = 0
    # Devices of the rollouts, taken after the learner's `mesh`: axis sizes, all 0 = none (rollouts
    # time-slice the learner's devices); once any axis is set, the unset ones count 1.
    r.rollout_mesh = ml_collections.ConfigDict({a: 0 for a in c.mesh})
    r.reward = "task"  # rewards by name:weight, e.g. "task:1.0,format:0.1"
    r.sampling = ml_collections.ConfigDict(
        {
            "max_new_tokens": 96,
            # The generation budget over steps, "step:tokens,..." (e.g. "0:64,100:128": 64 new tokens from
            # step 0, 128 from step 100; M1 raised its budget from 40K to 80K during RL). A string because
            # CLI overrides take strings whole. "" = max_new_tokens throughout; when set, it replaces it.
            "max_new_tokens_schedule": "",
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "confident_run": 3000,  # stop a response after this many consecutive tokens with p > confident_prob
            "confident_prob": 0.99,
            # Rollout-engine decode slots (continuous batching: a finished sample's slot takes the next
            # pending group); unset = one slot per sample of the step, every sample in flight at once.
            "slots": config_dict.placeholder(int),
            # Prompts are left-padded to a multiple of this (one compiled program per multiple). The
            # padding is computed on in every forward and update, so short prompts want a small one.
            "pad_multiple": 32,
            # Partial rollouts (rl.partial): the engine keeps its slots busy with the next prompts and a
            # step's generation ends once its P groups are complete; responses still running continue in
            # the next step under the new policy, each token keeping the version that sampled it.
            "partial": False,
        }
    )
    # DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), added to the reward of each response:
    # 0 up to max_length - buffer tokens, then linear down to -1 at max_length, -1 past it.
    # max_length 0 = the step's max_new_tokens (a response cut at the budget gets -1); buffer 0 =
    # max(1, max_length // 5) (DAPO: 4,096 of 20,480).
    # Train/inference mismatch correction (rl.mismatch): behaviour weights of the trainer's old policy
    # over the sampler, "tis" (truncated at upper) or "mis" (masked outside [lower, upper]) at the
    # "token", "sequence" or "geometric" level; "none" = off.
    # router_replay (R3): the sampler records each token's experts per layer and every training-side
    # forward of the policy replays them (the reference policy routes freely).
    r.mismatch = ml_collections.ConfigDict(
        {"mode": "none", "level": "token", "upper": 2.0, "lower": 0.5, "router_replay": False}
    )
    r.overlong = ml_collections.ConfigDict({"enabled": False, "max_length": 0, "buffer": 0})
    # Multi-turn episodes (rl.episodes, rl.envs): name "" = one response per prompt; "tools" = tool
    # use (rl.tools format; needs a tokenizer with the tool-call tokens, e.g. "byte+tools"). The
    # episode's token budget is rl.sampling.max_new_tokens (model and tool tokens together);
    # turn_tokens caps one model turn (0 = the episode budget); tools run on `workers` threads, each
    # call within timeout_s, its output cut to max_output characters; the next round of turns waits
    # at most stall_s for the episodes whose tools are still running (they join a later round).
    r.env = ml_collections.ConfigDict(
        {"name": "", "tools": "calculator", "max_turns": 4, "turn_tokens": 0, "workers": 4, "timeout_s": 5.0,
         "max_output": 256, "stall_s": 0.5}
    )  # fmt: skip
    return c


# The flat keys of the RL config before the sections: old -> new (see m1jax.train.config.RENAMED).
_RL_KEYS = ("init_from", "prompts_per_step", "samples_per_prompt", "updates_per_rollout", "loss", "kl_coef")
_RL_KEYS += ("advantage", "zero_variance", "old_logp", "mask_truncated", "aux_loss", "reward", "cispo", "grpo")
_RL_KEYS += ("dapo", "gspo")
_SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "confident_run", "confident_prob")
RENAMED = (
    SHARED_RENAMED
    | {k: f"rl.{k}" for k in _RL_KEYS}
    | {k: f"rl.sampling.{k}" for k in _SAMPLING}
    | {"eval_prompts": "eval.prompts", "eval_samples": "eval.samples", "aggregation": "rl.<loss>.aggregation"}
)


def reward_weights(spec: str) -> dict[str, float]:
    """ "task:1.0,format:0.1" -> {"task": 1.0, "format": 0.1}; a bare name weighs 1."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition(":")
        try:
            out[name.strip()] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"config.rl.reward={spec!r}: weight {w!r} of {name!r} is not a number") from None
    if not out:
        raise ValueError("config.rl.reward is empty; name at least one reward, e.g. 'task'")
    return out


SCHEDULE = "rl.sampling.max_new_tokens_schedule"


def token_schedule(spec: str) -> list[tuple[int, int]]:
    """ "0:64,100:128" -> [(0, 64), (100, 128)] (from step 0, 64 new tokens; from step 100, 128);
    "" -> []. The first step must be 0 and both steps and tokens strictly increase."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        step, _, tokens = part.partition(":")
        try:
            out.append((int(step), int(tokens)))
        except ValueError:
            raise ValueError(f"config.{SCHEDULE}={spec!r}: {part!r} is not step:tokens (two integers)") from None
    problem = None
    if out and out[0][0] != 0:
        problem = f"the first stage must start at step 0, not {out[0][0]}"
    elif any(t < 1 for _, t in out):
        problem = "tokens must be >= 1"
    elif any(a[0] >= b[0] or a[1] >= b[1] for a, b in zip(out, out[1:], strict=False)):
        problem = "steps and tokens must both strictly increase (the budget only grows)"
    if problem:
        raise ValueError(f"config.{SCHEDULE}={spec!r}: {problem}")
    return out


def max_new_tokens_at(c, step: int) -> int:
    """The generation budget of `step`: the tokens of the last schedule stage starting at or before it,
    or rl.sampling.max_new_tokens without a schedule."""
    stages = token_schedule(c.rl.sampling.max_new_tokens_schedule)
    return next((t for s, t in reversed(stages) if s <= step), c.rl.sampling.max_new_tokens)


def overlong_limits(c, budget: int) -> tuple[int, int]:
    """(max_length, buffer) of the soft overlong penalty at a step with generation budget `budget`."""
    o = c.rl.overlong
    top = o.max_length or budget
    return top, o.buffer or max(1, top // 5)


def rollout_axes(c) -> dict[str, int] | None:
    """The axis sizes of `rl.rollout_mesh`, or None when it is unset (rollouts share `mesh`)."""
    axes = {a: int(n) for a, n in c.rl.rollout_mesh.items()}
    return {a: n or 1 for a, n in axes.items()} if any(axes.values()) else None


def loss_kwargs(c) -> dict:
    """The knobs of the configured loss, as its keyword arguments."""
    return dict(c.rl[c.rl.loss])


def validate(c: ml_collections.ConfigDict) -> None:
    need = checker(c, base_config(), RENAMED)
    check_shared(c, need)
    r = c.rl
    for f in ("prompts_per_step", "samples_per_prompt", "updates_per_rollout", "sampling.max_new_tokens"):
        need(int(field(r, f)) >= 1, f"rl.{f}", "must be a positive integer")
    rows = r.prompts_per_step * r.samples_per_prompt
    per_update = r.updates_per_rollout * c.micro_batches
    need(rows % per_update == 0, "rl.updates_per_rollout", f"x micro_batches must divide the {rows} rollout rows")
    need(r.samples_per_prompt >= 2, "rl.samples_per_prompt", "group-relative advantages need >= 2 samples per prompt")
    need(r.loss in losses.LOSSES, "rl.loss", f"must be one of {sorted(losses.LOSSES)}")
    try:
        losses.knobs(r.loss, **r[r.loss])
    except ValueError as e:
        raise ValueError(f"config.rl.{r.loss}: {e}") from None
    need(r.advantage in advantages.ESTIMATORS, "rl.advantage", f"must be one of {sorted(advantages.ESTIMATORS)}")
    need(r.zero_variance in ("drop", "keep"), "rl.zero_variance", "must be 'drop' or 'keep'")
    need(r.old_logp in OLD_LOGP, "rl.old_logp", f"must be one of {OLD_LOGP}")
    s = r.sampling
    need(
        r.old_logp == "trainer" or (s.top_p == 1 and s.top_k == 0),
        "rl.old_logp",
        "'sampler' log-probs are of the top-p / top-k truncated distribution, not pi_old: use 'trainer'",
    )
    need(s.temperature > 0, "rl.sampling.temperature", "must be positive")
    need(
        s.slots is None or s.slots >= r.samples_per_prompt,
        "rl.sampling.slots",
        f"must be >= samples_per_prompt={r.samples_per_prompt} (a group is inserted whole), or unset (one per sample)",
    )
    need(0 < s.top_p <= 1, "rl.sampling.top_p", "must lie in (0, 1]")
    need(int(s.pad_multiple) == s.pad_multiple >= 1, "rl.sampling.pad_multiple", "must be a positive integer")
    budgets = [t for _, t in token_schedule(s.max_new_tokens_schedule)] or [s.max_new_tokens]
    o = r.overlong
    if o.enabled:
        need(o.max_length >= 0, "rl.overlong.max_length", "must be >= 0 (0 = the step's max_new_tokens)")
        need(o.buffer >= 0, "rl.overlong.buffer", "must be >= 0 (0 = max(1, max_length // 5))")
        if o.buffer:  # (0 picks one that fits)
            top = o.max_length or min(budgets)  # without max_length, every stage's budget must leave room
            need(o.buffer < top, "rl.overlong.buffer", f"must be < max_length ({top}; 0 = a stage's max_new_tokens)")
    m = r.mismatch
    need(m.mode in mismatch.MODES, "rl.mismatch.mode", f"must be one of {mismatch.MODES}")
    need(m.level in mismatch.LEVELS, "rl.mismatch.level", f"must be one of {mismatch.LEVELS}")
    need(m.upper > 1, "rl.mismatch.upper", "must be > 1 (the weights' upper bound)")
    need(0 <= m.lower < 1, "rl.mismatch.lower", "must lie in [0, 1) (MIS's lower bound; 0 = none)")
    if m.mode != "none":
        need(
            r.old_logp == "trainer",
            "rl.mismatch.mode",
            "corrects the trainer's old log-probs toward the sampler's; with rl.old_logp='sampler' the ratio "
            "already is pi_theta / pi_sampler: use mode 'none'",
        )
        need(
            s.top_p == 1 and s.top_k == 0,
            "rl.mismatch.mode",
            "needs the sampler's log-probs of the untruncated distribution (top_p = 1, top_k = 0)",
        )
    need(r.kl_coef >= 0, "rl.kl_coef", "must be >= 0")
    need(int(r.max_staleness) == r.max_staleness >= 0, "rl.max_staleness", "must be an integer >= 0 (0 = synchronous)")
    need(
        r.max_staleness == 0 or r.old_logp == "sampler" or m.mode != "none",
        "rl.max_staleness",
        "> 0 samples with an older policy, so the ratio must involve its log-probs: set rl.old_logp='sampler', "
        "or keep 'trainer' with a behaviour correction (rl.mismatch.mode 'tis' or 'mis')",
    )
    if s.partial:
        need(
            r.old_logp == "sampler" or m.mode != "none",
            "rl.sampling.partial",
            "carries responses across policy versions, so the ratio must involve the sampler's log-probs: set "
            "rl.old_logp='sampler', or keep 'trainer' with a behaviour correction (rl.mismatch.mode 'tis' or 'mis')",
        )
        need(not m.router_replay, "rl.sampling.partial", "records no routes yet: turn off rl.mismatch.router_replay")
    e = r.env
    if e.name:
        from rl import envs, tools  # (tools registers the built-in tools)

        need(e.name in envs.available(), "rl.env.name", f"must be '' or one of {envs.available()}")
        tools.parse_names(e.tools)  # its error names config.rl.env.tools
        for f, lo in (("max_turns", 1), ("turn_tokens", 0), ("workers", 1), ("max_output", 16)):
            need(int(e[f]) == e[f] >= lo, f"rl.env.{f}", f"must be an integer >= {lo}")
        need(e.timeout_s > 0, "rl.env.timeout_s", "must be positive")
        need(0 <= e.stall_s < float("inf"), "rl.env.stall_s", "must be a finite number >= 0 (seconds)")
        need(not s.partial, "rl.env.name", "multi-turn episodes do not run with rl.sampling.partial yet")
        need(not c.data.source.startswith("toy_"), "rl.env.name", "needs a text source (the digit toy has no tools)")
        need(not m.router_replay, "rl.env.name", "multi-turn episodes record no routes: turn off router_replay")
    for a, n in r.rollout_mesh.items():
        need(a in c.mesh, f"rl.rollout_mesh.{a}", f"is not a mesh axis (axes: {', '.join(c.mesh)})")
        need(int(n) == n >= 0, f"rl.rollout_mesh.{a}", "must be an integer >= 0 (all 0 = share the learner's mesh)")
    if rollout_axes(c) is not None:
        need(
            all(n != -1 for n in c.mesh.values()),
            "rl.rollout_mesh",
            "needs devices beside the learner's: `mesh` must not take all of them with -1",
        )
    need(c.data.source in SOURCES, "data.source", f"must be one of {SOURCES}")
    unknown = sorted(set(reward_weights(r.reward)) - set(rewards.available()))
    need(not unknown, "rl.reward", f"unknown reward(s) {unknown}; available: {', '.join(rewards.available())}")
    if c.data.source == "file":  # every row is checked now (file, row, field), not at the step that draws it
        from rl import prompt_files

        need(bool(c.data.prompts), "data.prompts", "must name a .jsonl or .parquet file with data.source='file'")
        need(
            bool(set(reward_weights(r.reward)) & set(prompt_files.NEEDS)),
            "rl.reward",
            f"with data.source='file' must include one of {sorted(prompt_files.NEEDS)} (it decides accuracy)",
        )
        prompt_files.load(c.data.prompts, c.data.prompt_field, tuple(reward_weights(r.reward)))
    model_config(c.model)  # unknown model fields / presets fail here (with init_from, too: a typo is no less one)
