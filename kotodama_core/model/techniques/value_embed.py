"""Value embeddings: extra token-embedding tables mixed in at chosen layers with learned scalar scales.

Layer ℓ = layers[k] uses table E_(k mod num_tables) and scale λ_k:
    target "values":   v ← v + λ_k · E[ids]  (viewed as (KV heads, head_dim)) inside attention at ℓ
    target "residual": x ← x + λ_k · E[ids]  on the residual stream before layer ℓ
λ_k = 0 gives exactly the model without the technique.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ValueEmbeddings(nn.Module):
    def __init__(self, layers: list[int], num_tables: int, vocab_size: int, width: int, make_embedding,
                 device=None):
        super().__init__()
        self.slot = {layer: k for k, layer in enumerate(layers)}
        self.num_tables = num_tables
        self.tables = nn.ModuleList(make_embedding(vocab_size, width) for _ in range(num_tables))
        self.scales = nn.ParameterList(nn.Parameter(torch.zeros((), device=device)) for _ in layers)

    def term(self, layer: int, ids: Tensor) -> Tensor | None:
        """λ_k · E[ids] (B, T, width) for a listed layer, None otherwise (a Python-level decision)."""
        k = self.slot.get(layer)
        if k is None:
            return None
        return self.scales[k] * self.tables[k % self.num_tables](ids)
