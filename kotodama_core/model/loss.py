"""Chunked LM head + loss: the full fp32 logits of a batch never exist at once.

For the N non-ignored targets (target != -100) with logits ℓ_n = W·h_n:
    ce     = (1/N) Σ_n [logsumexp(ℓ_n) − ℓ_n[y_n]]
    z      = (1/N) Σ_n logsumexp(ℓ_n)²
    loss   = ce + z_loss_weight · z
The tokens are cut into chunks; each chunk's logits are made in fp32 inside an activation-checkpointed
function that returns only two scalars, so backward recomputes them chunk by chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_sums(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ CE, Σ logsumexp²) over the chunk's non-ignored tokens, with the chunk's logits in fp32."""
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    valid = targets != IGNORE_INDEX
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    ce_sum = torch.where(valid, lse - target_logit, zero).sum()
    z_sum = torch.where(valid, lse * lse, zero).sum()
    return ce_sum, z_sum


def chunked_lm_loss(hidden: Tensor, weight: Tensor, targets: Tensor, z_loss_weight: float,
                    chunk_tokens: int) -> tuple[Tensor, dict[str, Tensor]]:
    """hidden (..., D) final normed states, weight (V, D) head, targets (...) token ids or -100.

    Returns (loss, {"ce": ce, "z_loss": z}) with ce and z detached; z is the unweighted mean
    logsumexp², so loss = ce + z_loss_weight · z.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match hidden states "
                         f"{tuple(hidden.shape[:-1])}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    n_tokens = h.shape[0]
    ce_sum = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    z_sum = ce_sum
    for start in range(0, n_tokens, chunk_tokens):
        stop = min(start + chunk_tokens, n_tokens)
        c, z = checkpoint(_chunk_sums, h[start:stop], weight, t[start:stop], use_reentrant=False)
        ce_sum = ce_sum + c
        z_sum = z_sum + z
    count = (t != IGNORE_INDEX).sum().clamp(min=1).to(ce_sum.dtype)
    ce = ce_sum / count
    z = z_sum / count
    loss = ce + z_loss_weight * z
    return loss, {"ce": ce.detach(), "z_loss": z.detach()}
