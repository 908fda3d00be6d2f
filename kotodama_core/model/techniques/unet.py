"""U-Net skips: encoder-half layer outputs added to the mirrored decoder-half layers' inputs.

With L layers and n = L // 2 skips, encoder layer i < n pairs with decoder layer L − 1 − i:
    before decoder layer L − 1 − i:   x ← x + w_i · y_i
where y_i is the residual stream after encoder layer i and w (n,) is learned (init 1). With an odd L the
middle layer has no skip.
"""

from __future__ import annotations

import torch
from torch import nn


def unet_pairs(num_layers: int) -> dict[int, int]:
    """{decoder layer: encoder layer} for the mirrored pairs."""
    return {num_layers - 1 - i: i for i in range(num_layers // 2)}


class UNetSkips(nn.Module):
    def __init__(self, num_layers: int, device=None):
        super().__init__()
        self.pairs = unet_pairs(num_layers)
        self.encoders = frozenset(self.pairs.values())
        self.scales = nn.Parameter(torch.ones(num_layers // 2, device=device))
