"""Train/inference mismatch controls: importance weights of the trainer's old policy over the sampler.

The sampler's log-probs l_s (recorded while sampling) and the trainer's l_o (its own forward at
the step's start) differ by numerics (bf16 kernels, MoE routing flips) and, in asynchronous runs,
by staleness. With d_t = l_o - l_s per response token, a behaviour weight c >= 0 multiplies each
token's advantage in the update (every objective here is linear in a non-negative advantage scale,
so this is the same as weighting its per-token loss; a weight-0 token stays in the token-mean
denominator, as eq. 7's mask does). With CISPO, when nothing clips, c * r = pi_theta / pi_sampler:
the behaviour policy enters the IS weight.

Modes (`rl.mismatch.mode`) at a level (`rl.mismatch.level`), all in log space so a product over
10^4 tokens cannot overflow:
  tis  truncated IS:  c = exp(min(s, log upper))
  mis  masked IS:     c = 1[log lower <= s <= log upper]
with s = d_t ("token"), sum_t d_t of the sequence ("sequence"), or its mean ("geometric", whose
bounds must sit near 1, e.g. [0.99, 1.01]).
"""

from __future__ import annotations

import numpy as np

MODES = ("none", "tis", "mis")
LEVELS = ("token", "sequence", "geometric")


def behaviour_weights(trainer_logp, sampler_logp, mask, mode: str, level: str, upper: float, lower: float):
    """(c [B, N] float32, metrics) from [B, N] log-probs and the response mask (host NumPy)."""
    if mode not in MODES:
        raise ValueError(f"unknown mismatch mode {mode!r}; use one of {MODES}")
    if level not in LEVELS:
        raise ValueError(f"unknown mismatch level {level!r}; use one of {LEVELS}")
    on = np.asarray(mask) > 0
    d = np.where(on, np.asarray(trainer_logp, np.float64) - np.asarray(sampler_logp, np.float64), 0.0)
    if level == "token":
        s = d
    else:
        s = d.sum(-1, keepdims=True)
        if level == "geometric":
            s = s / np.maximum(on.sum(-1, keepdims=True), 1)
        s = np.broadcast_to(s, d.shape)
    log_lo = np.log(lower) if lower > 0 else -np.inf  # lower 0: no lower bound
    if mode == "none":
        c = np.ones_like(d)
    elif mode == "tis":
        c = np.exp(np.minimum(s, np.log(upper)))
    else:
        c = ((s >= log_lo) & (s <= np.log(upper))).astype(np.float64)
    c = np.where(on, c, 0.0)
    kept = on & (c > 0)
    n = max(int(on.sum()), 1)
    metrics = {
        "is_weight_mean": float(c[on].mean()) if on.any() else 1.0,
        "is_weight_max": float(c[on].max()) if on.any() else 1.0,
        "is_truncated_fraction": float(np.sum(on & (s > np.log(upper)))) / n if mode == "tis" else 0.0,
        "is_masked_fraction": float(np.sum(on & (c == 0))) / n,
        # The gap left in the update: |d| over the tokens that still carry weight.
        "logp_gap_corrected": float(np.abs(d[kept]).mean()) if kept.any() else 0.0,
    }
    return c.astype(np.float32), metrics
