"""Learning-rate schedules and the AdamW optimizer of pretraining (and RL)."""

from __future__ import annotations

import jax
import optax


def schedule(kind: str, peak: float, steps: int, warmup: int, min_ratio: float = 0.1, decay_fraction: float = 0.2):
    """Linear warmup to `peak`, then "cosine" to min_ratio * peak at `steps`, "wsd" (stable, then a
    linear decay over the last `decay_fraction` of the steps) or "constant"."""
    floor = peak * min_ratio
    warm = optax.linear_schedule(peak / max(warmup, 1), peak, max(warmup, 1) - 1)
    rest = max(steps - warmup, 1)
    if kind == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=min_ratio)
    elif kind == "wsd":
        decay = max(int(round(rest * decay_fraction)), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [rest - decay]
        )
    elif kind == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return optax.join_schedules([warm, after], [warmup]) if warmup else after


def _decay_mask(params):
    """Weight decay on weight matrices only, not on norm scales (stacked layers make every
    parameter >= 2-D, so the name decides, not the rank)."""
    name = lambda k: str(getattr(k, "key", getattr(k, "name", k)))
    return jax.tree_util.tree_map_with_path(lambda path, p: all(name(k) != "scale" for k in path), params)


def adamw(lr, *, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0) -> optax.GradientTransformation:
    """Global-norm clipping (0 disables) then AdamW."""
    opt = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask)
    return optax.chain(optax.clip_by_global_norm(grad_clip), opt) if grad_clip > 0 else opt


def from_config(o, steps: int):
    """(lr schedule, AdamW) of a config's `optim` section for a run of `steps` optimizer updates."""
    lr_fn = schedule(o.schedule, o.learning_rate, steps, o.warmup_steps, o.min_lr_ratio, o.decay_fraction)
    tx = adamw(lr_fn, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, grad_clip=o.grad_clip)
    return lr_fn, tx
