"""LeakyReLU(0.5)² MLP, the SwiGLU alternative of the golf records.

    m(x) = down_proj(leaky_relu(up_proj x, 0.5)²)
with up_proj (intermediate_size, hidden_size) and down_proj (hidden_size, intermediate_size) and no
gate_proj: two matrices instead of SwiGLU's three, so at intermediate_size = 3·hidden (the golf "MLP 3×")
it has 2/3 of SwiGLU's MLP parameters at the same width.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def leaky_relu_squared(x: Tensor, negative_slope: float = 0.5) -> Tensor:
    """leaky_relu(x, slope)²: x² for x ≥ 0, slope²·x² below."""
    return F.leaky_relu(x, negative_slope).square()


class LeakyReLUSquaredMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, make_linear, negative_slope: float = 0.5):
        super().__init__()
        self.negative_slope = negative_slope
        self.up_proj = make_linear(hidden_size, intermediate_size)
        self.down_proj = make_linear(intermediate_size, hidden_size)

    def forward(self, x: Tensor, return_act: bool = False):
        act = leaky_relu_squared(self.up_proj(x), self.negative_slope)
        out = self.down_proj(act)
        return (out, act) if return_act else out
