"""Training precision as the original ran it.

`train.precision: bf16_pure` casts the whole model to bf16 before the optimizer is built, as the
original does (src/training/train.py:237, `LuxiaBaseModel(config).to(device=device, dtype=torch.bfloat16)`),
so both optimizers keep their states in bf16 too, and every update is rounded to bf16 when written
into the weights: an update smaller than half a bf16 ulp of the weight (2^-8 relative) is lost. Decoupled
weight decay lr·wd·w (6e-4 · 0.1 = 6e-5 relative) is far below that and rounds away, and RMSNorm gains
at 1.0 (ulp 2^-7) move only when an AdamW step exceeds 2^-8 ≈ 0.0039, i.e. never at lr 6e-4.
The other precisions keep fp32 weights (and bf16 autocast on CUDA for `auto`/`bf16`).
"""

from __future__ import annotations

import torch
from torch import nn

PURE_BF16 = "bf16_pure"


def apply_precision(model: nn.Module, precision: str) -> nn.Module:
    """The model in the storage dtype `precision` asks for: bf16 for bf16_pure, unchanged otherwise."""
    if precision == PURE_BF16:
        return model.to(dtype=torch.bfloat16)
    return model


def rounds_away(update: float, weight: float) -> bool:
    """Whether adding `update` to a bf16 `weight` leaves it unchanged (|update| < half its ulp)."""
    w = torch.tensor(weight, dtype=torch.bfloat16)
    return bool((w + torch.tensor(update, dtype=torch.bfloat16)) == w)
