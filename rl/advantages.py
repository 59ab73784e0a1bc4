"""Group-relative advantage estimators, in a registry, and zero-variance group handling.

rewards [P, G] (P prompts, G samples each) -> advantages [P, G], one per response (the same for
all its tokens). NaN rewards (a failed scorer) mark their sample invalid: it is left out of its
group's statistics and gets advantage 0 and weight 0. A group whose valid rewards all agree
carries no signal: `zero_variance="drop"` removes it from the loss (DAPO dynamic sampling; the
batch keeps its shape, the group's weight is 0), "keep" leaves it in with advantage 0 (its
tokens still count in the token-mean denominator). Either way it is counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

ESTIMATORS: dict[str, Callable[..., np.ndarray]] = {}


class Advantages(NamedTuple):
    advantages: np.ndarray  # [P, G] float32
    weight: np.ndarray  # [P, G] float32, 1 = the sample's tokens enter the loss
    zero_variance: np.ndarray  # [P] bool: groups without reward variance
    invalid: np.ndarray  # [P, G] bool: NaN / inf rewards


def register(name: str):
    def deco(fn):
        ESTIMATORS[name] = fn
        return fn

    return deco


def _group_stats(r, valid):
    n = np.maximum(valid.sum(-1, keepdims=True), 1)
    mean = np.where(valid, r, 0.0).sum(-1, keepdims=True) / n
    var = np.where(valid, (r - mean) ** 2, 0.0).sum(-1, keepdims=True) / np.maximum(n - 1, 1)
    return mean, np.sqrt(var)


@register("group")
def group(r, valid, eps: float = 1e-6):
    """GRPO / CISPO: (R - mean_G) / (std_G + eps), sample std within each group."""
    mean, std = _group_stats(r, valid)
    return (r - mean) / (std + eps)


@register("group_batch_std")
def group_batch_std(r, valid, eps: float = 1e-6):
    """(R - mean_G) / (std over the whole batch + eps): less noisy scaling for small groups."""
    mean, _ = _group_stats(r, valid)
    centred = r - mean
    # Over valid samples of groups with some spread: solved / failed groups would shrink it.
    spread = np.where(valid, r, -np.inf).max(-1) - np.where(valid, r, np.inf).min(-1)
    use = valid & (spread > 1e-9)[:, None]
    std = np.std(centred[use], ddof=1) if use.sum() > 1 else 0.0
    return centred / (std + eps)


@register("group_no_std")
def group_no_std(r, valid, eps: float = 1e-6):
    """R - mean_G (Dr. GRPO): no per-group rescaling, so easy / hard prompts are not up-weighted."""
    del eps
    return r - _group_stats(r, valid)[0]


def compute(
    rewards, estimator: str = "group", zero_variance: str = "drop", eps: float = 1e-6, signal=None
) -> Advantages:
    """rewards [P, G] -> Advantages. See the module docstring. `signal` [P, G]: the rewards whose
    spread decides which groups carry no signal (default: `rewards`); pass the task reward when
    `rewards` adds a shaping term, as DAPO filters groups on accuracy, not on its length penalty
    (a group all right or all wrong stays out, however its lengths differ)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; available: {', '.join(sorted(ESTIMATORS))}")
    if zero_variance not in ("drop", "keep"):
        raise ValueError(f"zero_variance must be 'drop' or 'keep', got {zero_variance!r}")
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [prompts, samples per prompt], got shape {r.shape}")
    valid = np.isfinite(r)
    r = np.where(valid, r, 0.0)
    q = r if signal is None else np.where(valid, np.asarray(signal, np.float64).reshape(r.shape), 0.0)
    spread = np.where(valid, q, -np.inf).max(-1) - np.where(valid, q, np.inf).min(-1)
    zero_var = ~(spread > 1e-9)  # also true for groups with < 2 valid samples or none
    adv = np.where(valid, ESTIMATORS[estimator](r, valid, eps), 0.0)
    adv = np.where(zero_var[:, None], 0.0, adv)
    weight = valid.astype(np.float32)
    if zero_variance == "drop":
        weight = np.where(zero_var[:, None], 0.0, weight)
    return Advantages(adv.astype(np.float32), weight.astype(np.float32), zero_var, ~valid)
