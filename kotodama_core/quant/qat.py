"""Straight-through quantization-aware training (QAT).

`QuantAwareForward(module, bits)` is the module's forward with every quantized parameter W replaced by
fake_quantize(W) = W + (Ŵ − W).detach() for the call (torch.func.functional_call), so the loss is that of
the quantized weights while the gradient reaches W unchanged and the optimizer keeps updating the float
weights. The wrapper owns no parameters and leaves the state-dict layout alone; the fake quantizer is
plain tensor code, so torch.compile traces it into the same graph as the forward pass. The engine
switches from the plain forward to this one at step qat_start_step(total, start_fraction).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from kotodama_core.quant.config import QuantBits
from kotodama_core.quant.groups import FLOAT, bits_for
from kotodama_core.quant.rowwise import fake_quantize


def qat_start_step(total_steps: int, start_fraction: float) -> int:
    """First 0-based step trained with fake-quantized weights: ceil(start_fraction · total_steps)."""
    return min(total_steps, math.ceil(start_fraction * total_steps - 1e-9))


def quantized_parameters(module: nn.Module, bits: QuantBits) -> list[tuple[str, int]]:
    """(name, bits) of every parameter that the integer grid applies to (≥ 2-D, bits < 16)."""
    out = []
    for name, p in module.named_parameters():
        width = bits_for(name, p.ndim, bits)
        if width != FLOAT:
            out.append((name, width))
    return out


class QuantAwareForward(nn.Module):
    """Calls `module` with its quantized parameters fake-quantized (straight-through)."""

    def __init__(self, module: nn.Module, bits: QuantBits):
        super().__init__()
        # Kept out of the module tree so that this wrapper adds no parameters or state-dict keys.
        self.__dict__["inner"] = module
        self.targets = quantized_parameters(module, bits)
        if not self.targets:
            raise ValueError("QAT: no parameter is quantized with these bits (all 16 or below 2-D)")

    def forward(self, *args, **kwargs):
        params = dict(self.inner.named_parameters())
        swapped = {name: fake_quantize(params[name], width) for name, width in self.targets}
        return functional_call(self.inner, swapped, args, kwargs)
