"""Weight averaging during training: EMA and SWA of the parameters, kept in fp32 beside the model.

EMA   after every optimizer step:  ema ← d·ema + (1 − d)·w,   ema₀ = the weights training starts from.
SWA   after optimizer step n (1-based) when n is a multiple of `swa_every` and that step's LR multiplier
      is below `swa_lr_threshold` (never during LR warmup, whose multipliers are low on the way up):
      a snapshot of w joins the running uniform mean
      mean ← mean + (w − mean) / k   (k = snapshots so far), i.e. mean = (1/k) Σ snapshots.
The averaged tensors are part of the training checkpoint (exact resume) and are written at the end as
`model_avg.pt.zst`, a state dict of the model's own layout (buffers taken from the live model).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class WeightAverager:
    def __init__(self, model: nn.Module, kind: str, *, decay: float = 0.997, swa_every: int = 50,
                 swa_lr_threshold: float = 0.2):
        if kind not in ("ema", "swa"):
            raise ValueError(f"unknown averaging kind {kind!r}; choose 'ema' or 'swa'")
        self.kind, self.decay = kind, decay
        self.swa_every, self.swa_lr_threshold = swa_every, swa_lr_threshold
        self.names = [n for n, p in model.named_parameters() if torch.is_floating_point(p)]
        self.updates = 0  # EMA updates or SWA snapshots taken
        if kind == "ema":
            self.tensors = {n: p.detach().float().clone() for n, p in model.named_parameters() if n in self.names}
        else:
            self.tensors = {n: torch.zeros_like(p, dtype=torch.float32)
                            for n, p in model.named_parameters() if n in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, lr_multiplier: float, in_warmup: bool = False) -> bool:
        """Fold in the weights after 1-based optimizer step `step`, trained at `lr_multiplier`;
        returns whether they were folded in (EMA: always; SWA: on a snapshot step)."""
        params = dict(model.named_parameters())
        avg = [self.tensors[n] for n in self.names]
        cur = [params[n].detach().float() for n in self.names]
        if self.kind == "ema":
            torch._foreach_mul_(avg, self.decay)
            torch._foreach_add_(avg, cur, alpha=1.0 - self.decay)
        else:
            if in_warmup or step % self.swa_every or lr_multiplier >= self.swa_lr_threshold:
                return False
            k = self.updates + 1
            deltas = torch._foreach_sub(cur, avg)
            torch._foreach_add_(avg, deltas, alpha=1.0 / k)
        self.updates += 1
        return True

    @property
    def ready(self) -> bool:
        """Whether there is an average to use (SWA before its first snapshot has none)."""
        return self.kind == "ema" or self.updates > 0

    def averaged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with every averaged parameter replaced (in the model's dtype)."""
        state = model.state_dict()
        out = {}
        for name, tensor in state.items():
            src = self.tensors.get(name)
            out[name] = src.to(device="cpu", dtype=tensor.dtype).clone() if src is not None else tensor.detach().cpu().clone()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "updates": self.updates, "tensors": {n: t.clone() for n, t in self.tensors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint averaging is {state.get('kind')!r}, this run uses {self.kind!r}")
        missing = set(self.names) - set(state["tensors"])
        if missing:
            raise ValueError(f"checkpoint averaging state lacks {sorted(missing)[:4]}")
        for n in self.names:
            self.tensors[n].copy_(state["tensors"][n])
        self.updates = int(state["updates"])
