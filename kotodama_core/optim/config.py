"""Optimizer and LR-schedule config sections."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from kotodama_core.schema import StrictModel


class MuonConfig(StrictModel):
    lr: float = 0.02
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: float = 0.01
    ns_steps: int = 5
    # quintic: classic (3.4445, -4.7750, 2.0315); gram_ns: Kotodama's per-iteration schedule;
    # gram: Gram Newton-Schulz iterating on X·Xᵀ.
    ns_variant: Literal["quintic", "gram_ns", "gram"] = "gram_ns"


class AdamWConfig(StrictModel):
    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    # Which AdamW parameters decay: matrices (embeddings, an untied head; 1-D gains and AttnRes queries
    # keep wd 0) or all (the original code: one AdamW group with weight_decay 0.1 over every non-Muon
    # parameter, src/training/muon.py:411-416).
    decay_scope: Literal["matrices", "all"] = "matrices"


class OptimConfig(StrictModel):
    # hybrid: Muon on 2-D hidden matrices + AdamW on the rest; adamw: AdamW everywhere (baseline, lr 8e-4).
    kind: Literal["hybrid", "adamw"] = "hybrid"
    muon: MuonConfig = MuonConfig()
    adamw: AdamWConfig = AdamWConfig()


class ScheduleConfig(StrictModel):
    """Warmup-stable-decay: linear warmup, flat to stable_fraction of training, then decay."""

    warmup_steps: int = 5000
    stable_fraction: float = 0.9
    decay: Literal["cosine", "sqrt", "linear"] = "cosine"
    min_lr_ratio: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> "ScheduleConfig":
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.stable_fraction <= 1.0:
            raise ValueError(f"stable_fraction must lie in [0, 1], got {self.stable_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        return self
