"""Policy-gradient objectives (SPEC section 2), in a registry: cispo, grpo, dapo, gspo.

Every loss takes per-token arrays [B, T]:
  logp      log pi_theta of the sampled tokens (differentiated)
  old_logp  log pi_old (the behaviour policy; constant)
  advantages [B] or [B, T]
  mask      1.0 on response tokens that count, 0.0 elsewhere (prompt, padding, dropped groups)
and returns (loss, metrics), loss minimised. Aggregation:
  "token_mean" (default but GRPO): sum over all tokens / `denom` (default: the tokens in this batch).
  "seq_mean": per-sequence token means, summed / `denom` (default: the sequences with any token).
Pass the *global* count as `denom` when a batch is split into micro-batches or data shards, so the
pieces add up to exactly the full-batch loss. An optional k3 KL to a reference policy (`ref_logp`)
is added with `kl_coef` (0 by default, as in M1) and always reported as a metric.

A loss is one function `fn(logp, old_logp, advantages, mask, knobs, *, denom, ref_logp, kl_coef)`
registered with its knobs, a frozen dataclass whose defaults are the loss's defaults: the RL
config's `rl.<name>` section is built from it, and the registered function takes the knobs as
keyword arguments (`cispo(logp, old, adv, mask, ratio_max=3.0)`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

_F32 = jnp.float32
AGGREGATIONS = ("token_mean", "seq_mean")
LossFn = Callable[..., tuple[jax.Array, dict]]


class Loss(NamedTuple):
    fn: LossFn  # takes the knobs as keyword arguments
    knobs: type  # frozen dataclass: the knobs and their defaults


LOSSES: dict[str, Loss] = {}


def register(name: str, knobs: type):
    """Register `fn(logp, old_logp, advantages, mask, knobs, *, denom, ref_logp, kl_coef)` under
    `name`; returns it taking the knobs as keyword arguments (unknown ones are a TypeError)."""

    def deco(fn) -> LossFn:
        @functools.wraps(fn)
        def loss(logp, old_logp, advantages, mask, *, denom=None, ref_logp=None, kl_coef: float = 0.0, **kw):
            k = knobs(**kw)
            return fn(logp, old_logp, advantages, mask, k, denom=denom, ref_logp=ref_logp, kl_coef=kl_coef)

        LOSSES[name] = Loss(loss, knobs)
        return loss

    return deco


def get(name: str) -> LossFn:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(sorted(LOSSES))}")
    return LOSSES[name].fn


def knobs(name: str, **values):
    """The knobs of loss `name` (its defaults, changed by `values`); ValueError for a bad one."""
    get(name)
    return LOSSES[name].knobs(**values)


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; use 'token_mean' or 'seq_mean'")


@dataclasses.dataclass(frozen=True)
class CispoKnobs:
    ratio_max: float = 5.0  # absolute upper bound of the IS weight (M1: eps_high)
    ratio_min: float = 0.0  # absolute lower bound; 0: none (M1 used none)
    mask_ratio_max: float = 0.0  # eq. 7's token mask (absolute); 0: off
    mask_ratio_min: float = 0.0
    aggregation: str = "token_mean"

    def __post_init__(self):
        _check_aggregation(self.aggregation)
        if not self.ratio_max > max(self.ratio_min or 0.0, 0.0):
            raise ValueError(f"ratio_max={self.ratio_max} must exceed ratio_min={self.ratio_min} and 0")


@dataclasses.dataclass(frozen=True)
class ClipKnobs:
    """PPO-style absolute ratio bounds [clip_low, clip_high] around 1."""

    clip_low: float = 0.8
    clip_high: float = 1.2
    aggregation: str = "seq_mean"

    def __post_init__(self):
        _check_aggregation(self.aggregation)
        if not 0 <= self.clip_low <= 1 <= self.clip_high:
            raise ValueError(f"need 0 <= clip_low <= 1 <= clip_high, got [{self.clip_low}, {self.clip_high}]")


@dataclasses.dataclass(frozen=True)
class DapoKnobs(ClipKnobs):
    clip_high: float = 1.28  # clip-higher
    aggregation: str = "token_mean"


@dataclasses.dataclass(frozen=True)
class GspoKnobs(ClipKnobs):
    clip_low: float = 1.0 - 3e-4  # sequence ratios stay near 1: the paper's bounds
    clip_high: float = 1.0 + 4e-4


def aggregate(per_token, mask, aggregation: str = "token_mean", denom=None):
    """Masked [B, T] values -> scalar. See the module docstring for `denom`."""
    per_token = jnp.where(mask > 0, per_token, 0.0) * mask  # where(): NaN/inf outside the mask never leak
    if aggregation == "token_mean":
        d = jnp.sum(mask) if denom is None else denom
        return jnp.sum(per_token) / jnp.maximum(d, 1e-8)
    if aggregation == "seq_mean":
        lengths = jnp.sum(mask, axis=-1)
        seq = jnp.sum(per_token, axis=-1) / jnp.maximum(lengths, 1e-8)
        d = jnp.sum(lengths > 0) if denom is None else denom
        return jnp.sum(seq) / jnp.maximum(d, 1e-8)
    _check_aggregation(aggregation)


def k3_kl(logp, ref_logp):
    """Per-token k3 estimator of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = ref - logp (>= 0)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def prepare(logp, old_logp, advantages, mask):
    """fp32 inputs, advantages broadcast to [B, T], everything outside the mask zeroed."""
    logp, old_logp, mask = logp.astype(_F32), old_logp.astype(_F32), mask.astype(_F32)
    adv = jnp.asarray(advantages, _F32)
    adv = jnp.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, logp.shape)
    # Outside the mask the inputs may be anything (padding, -inf log-probs): neutralise them so
    # neither the value nor the gradient can become NaN.
    on = mask > 0
    logp = jnp.where(on, logp, 0.0)
    old_logp = jnp.where(on, old_logp, 0.0)
    adv = jnp.where(on, adv, 0.0)
    return logp, old_logp, adv, mask


def _masked_stats(x, mask) -> dict:
    on = mask > 0
    n = jnp.maximum(jnp.sum(mask), 1.0)
    return {
        "mean": jnp.sum(jnp.where(on, x, 0.0)) / n,
        "max": jnp.max(jnp.where(on, x, -jnp.inf), initial=-jnp.inf),
        "min": jnp.min(jnp.where(on, x, jnp.inf), initial=jnp.inf),
    }


def finish(per_token, logp, ratio, clipped, mask, aggregation, denom, ref_logp, kl_coef, extra=None):
    """(loss, metrics) from per-token losses [B, T]: aggregated, plus the KL term, with the
    ratio / clip metrics every loss reports."""
    loss = aggregate(per_token, mask, aggregation, denom)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    st = _masked_stats(ratio, mask)
    metrics = {
        "pg_loss": loss,
        "clip_fraction": jnp.sum(clipped * mask) / n,
        "ratio_mean": st["mean"],
        "ratio_max": st["max"],
        "ratio_min": st["min"],
        "tokens": jnp.sum(mask),
    }
    if ref_logp is not None:
        kl_tok = k3_kl(logp, jnp.where(mask > 0, ref_logp.astype(_F32), logp))
        kl = aggregate(kl_tok, mask, aggregation, denom)
        metrics["kl"] = kl
        if kl_coef:
            loss = loss + kl_coef * kl
    metrics.update(extra or {})
    metrics["loss"] = loss
    return loss, metrics


@register("cispo", CispoKnobs)
def cispo(logp, old_logp, advantages, mask, k: CispoKnobs, *, denom, ref_logp, kl_coef):
    """CISPO (M1 eq. 4-5): -sg(clip(r, ratio_min, ratio_max)) * A * logp, every token keeps a gradient.

    ratio_max / ratio_min are absolute bounds on r = pi/pi_old (M1 used no lower bound: 0). The
    unified mask of eq. 7 is off unless `mask_ratio_max` / `mask_ratio_min` are set (absolute): a
    token is then dropped when A > 0 and r > mask_ratio_max, or A < 0 and r < mask_ratio_min.
    """
    logp, old_logp, adv, mask = prepare(logp, old_logp, advantages, mask)
    ratio = jnp.exp(logp - old_logp)
    lo = k.ratio_min or 0.0
    weight = jax.lax.stop_gradient(jnp.clip(ratio, lo, k.ratio_max))
    clipped = ((ratio > k.ratio_max) | (ratio < lo)).astype(_F32)
    if k.mask_ratio_max or k.mask_ratio_min:
        hi_m = k.mask_ratio_max or jnp.inf
        lo_m = k.mask_ratio_min or -jnp.inf
        ratio_c = jax.lax.stop_gradient(ratio)
        drop = ((adv > 0) & (ratio_c > hi_m)) | ((adv < 0) & (ratio_c < lo_m))
        weight = weight * (1.0 - drop.astype(_F32))  # the token still counts in |o_i| and the metrics
    per_token = -weight * adv * logp
    return finish(per_token, logp, ratio, clipped, mask, k.aggregation, denom, ref_logp, kl_coef)


def _ppo_clip(ratio, adv, low, high):
    """PPO's pessimistic clipped surrogate (to minimise) and whether the clipped branch was taken."""
    unclipped, clipped = ratio * adv, jnp.clip(ratio, low, high) * adv
    return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(_F32)


def _token_ppo(logp, old_logp, advantages, mask, k: ClipKnobs, *, denom, ref_logp, kl_coef):
    logp, old_logp, adv, mask = prepare(logp, old_logp, advantages, mask)
    ratio = jnp.exp(logp - old_logp)
    per_token, clipped = _ppo_clip(ratio, adv, k.clip_low, k.clip_high)
    return finish(per_token, logp, ratio, clipped, mask, k.aggregation, denom, ref_logp, kl_coef)


@register("grpo", ClipKnobs)
def grpo(logp, old_logp, advantages, mask, k: ClipKnobs, *, denom, ref_logp, kl_coef):
    """GRPO: PPO clipped surrogate per token, ratio clipped to [clip_low, clip_high] (absolute),
    per-sequence mean by default."""
    return _token_ppo(logp, old_logp, advantages, mask, k, denom=denom, ref_logp=ref_logp, kl_coef=kl_coef)


@register("dapo", DapoKnobs)
def dapo(logp, old_logp, advantages, mask, k: DapoKnobs, *, denom, ref_logp, kl_coef):
    """DAPO: the PPO surrogate with clip-higher ([0.8, 1.28] absolute) and a global token mean.
    Dynamic sampling (dropping zero-variance groups) lives in `rl.advantages`."""
    return _token_ppo(logp, old_logp, advantages, mask, k, denom=denom, ref_logp=ref_logp, kl_coef=kl_coef)


@register("gspo", GspoKnobs)
def gspo(logp, old_logp, advantages, mask, k: GspoKnobs, *, denom, ref_logp, kl_coef):
    """GSPO: one ratio per sequence, s_i = exp(mean_t (logp - old_logp)) over its tokens, in the PPO
    surrogate (the sequence's advantage is its first token's). Token form: every token carries the
    sequence's value, so "seq_mean" aggregation gives the paper's per-sequence objective."""
    logp, old_logp, adv, mask = prepare(logp, old_logp, advantages, mask)
    lengths = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
    log_s = jnp.sum((logp - old_logp) * mask, axis=-1, keepdims=True) / lengths
    seq_ratio = jnp.broadcast_to(jnp.exp(log_s), logp.shape)
    per_token, clipped = _ppo_clip(seq_ratio, adv, k.clip_low, k.clip_high)
    return finish(per_token, logp, seq_ratio, clipped, mask, k.aggregation, denom, ref_logp, kl_coef)
