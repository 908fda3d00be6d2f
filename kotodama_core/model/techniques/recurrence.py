"""Depth recurrence: a span of layers applied several times, switched on by training progress.

Layers start..end (n = end − start + 1) run R times in a row (R = 1 is the base model), so the effective
depth is num_layers + (R − 1)·n. R follows a schedule: R = repeats[k] for the last at_fractions[k] ≤ the
training fraction, 1 before the first. Before loop layer j (slot j = layer − start) in repeat r:
    x ← x + e_(r·n + j)                      loop embedding, one learned vector per effective layer (init 0)
    x ← x + s_j ⊙ y_j^(r−1)   (r ≥ 1)         cross-repeat skip: y_j^(r−1) is the residual stream after
                                              slot j in the previous repeat; s_j per-dimension, init 0
With e = 0 and s = 0 the repeats are a plain re-application of the same layers.

R is a Python int set by `set_repeats` (KotodamaLM.set_training_progress): the layer plan is ordinary
Python, so under torch.compile a change of R recompiles the graph (once per phase of the schedule).
A new module starts at the end-of-training count repeats_at(cfg, 1.0), so a model loaded for evaluation
or export runs at the depth it finished training with; the training engine sets R every step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kotodama_core.model.techniques.config import RecurrenceConfig


def repeats_at(cfg: RecurrenceConfig, fraction: float) -> int:
    """The repeat count R at a training fraction in [0, 1] (1 when recurrence is off or not yet on)."""
    r = 1
    for at, repeats in zip(cfg.at_fractions, cfg.repeats):
        if fraction >= at:
            r = repeats
    return r


def layer_plan(num_layers: int, start: int, end: int, repeats: int) -> list[tuple[int, int, int]]:
    """The order of layer applications as (layer, repeat, slot); repeat = slot = −1 outside the span."""
    plan = [(i, -1, -1) for i in range(start)]
    for r in range(repeats):
        plan += [(i, r, i - start) for i in range(start, end + 1)]
    return plan + [(i, -1, -1) for i in range(end + 1, num_layers)]


class DepthRecurrence(nn.Module):
    def __init__(self, cfg: RecurrenceConfig, hidden_size: int, device=None):
        super().__init__()
        self.cfg = cfg
        self.span = cfg.end_layer - cfg.start_layer + 1
        self.repeats = repeats_at(cfg, 1.0)
        n_embed = max(cfg.repeats) * self.span if cfg.loop_embed else 0
        n_skip = self.span if cfg.cross_repeat_skip else 0
        # One 1-D parameter per vector: they land in the no-weight-decay AdamW group like other gains.
        self.loop_embed = nn.ParameterList(nn.Parameter(torch.zeros(hidden_size, device=device))
                                           for _ in range(n_embed))
        self.skip_scales = nn.ParameterList(nn.Parameter(torch.zeros(hidden_size, device=device))
                                            for _ in range(n_skip))

    def set_repeats(self, repeats: int) -> None:
        self.repeats = repeats

    def plan(self, num_layers: int) -> list[tuple[int, int, int]]:
        return layer_plan(num_layers, self.cfg.start_layer, self.cfg.end_layer, self.repeats)

    def enter(self, x: Tensor, repeat: int, slot: int, previous: dict[int, Tensor]) -> Tensor:
        """The input of loop slot `slot` in repeat `repeat`; `previous` holds last repeat's outputs."""
        if self.cfg.loop_embed:
            x = x + self.loop_embed[repeat * self.span + slot]
        if self.cfg.cross_repeat_skip and repeat > 0:
            x = x + self.skip_scales[slot] * previous[slot]
        return x
