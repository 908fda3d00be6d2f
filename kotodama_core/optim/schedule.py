"""Warmup–stable–decay learning-rate multiplier."""

from __future__ import annotations

import math

from kotodama_core.optim.config import ScheduleConfig


def wsd_lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """LR multiplier for 0-based `step` of a `total_steps` run: warmup(step) · decay(step).

    warmup(step) = min(1, (step + 1) / warmup_steps)       (1 if warmup_steps = 0; step 0 already trains
                                                            at the first warmup LR, never at the base LR)
    decay(step)  = 1                                        for step < S, S = floor(stable_fraction · total)
                 = m + (1 − m) · f(p),  p = min(1, (step − S) / (total − S))   otherwise,
    with m = min_lr_ratio and f(p) = 0.5·(1 + cos(π·p)) (cosine), 1 − sqrt(p) (sqrt) or 1 − p (linear).
    The last step (total − 1) is just short of m; only a step past the end gets exactly m.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warmup = 1.0 if cfg.warmup_steps == 0 else min(1.0, (step + 1) / cfg.warmup_steps)
    decay_start = math.floor(cfg.stable_fraction * total_steps)
    if step < decay_start:
        return warmup
    p = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    if cfg.decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * p))
    elif cfg.decay == "sqrt":
        shape = 1.0 - math.sqrt(p)
    else:
        shape = 1.0 - p
    return warmup * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape)
