"""Attention statistics the report reads after NCA training."""

from __future__ import annotations

import torch

from kotodama_core.metrics import attention_entropy


@torch.no_grad()
def head_entropies(model, input_ids: torch.Tensor, layer: int = 0) -> list[float]:
    """Per-head attention entropy (nats) at `layer` on a probe batch; see metrics.attention_entropy.

    The proxy report compares the spread (std over heads) of these at layer 0 before and after NCA.
    """
    probs = model.trace(input_ids, [layer])["attn_probs"][layer]
    return [float(h) for h in attention_entropy(probs)]
