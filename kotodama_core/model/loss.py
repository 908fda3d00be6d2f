"""Chunked LM head + loss: the full fp32 logits of a batch never exist at once.

For the N non-ignored targets (target != -100) with logits ℓ_n = W·h_n:
    ce     = (1/N) Σ_n [logsumexp(ℓ_n) − ℓ_n[y_n]]
    z      = (1/N) Σ_n logsumexp(ℓ_n)²
    loss   = ce + z_loss_weight · z
Optional techniques change ℓ_n inside each chunk: ℓ_n ← ℓ_n + B[a_n] (bigram logit head, a_n the input
token at n) and then ℓ_n ← c·tanh(ℓ_n / c) (logit softcap c); see techniques/bigram_logits.py.
The tokens are cut into chunks; each chunk's logits are made in fp32 inside an activation-checkpointed
function that returns only two scalars, so backward recomputes them chunk by chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kotodama_core.model.techniques.bigram_logits import bigram_bias, softcap as apply_softcap

IGNORE_INDEX = -100


def _chunk_sums(hidden: Tensor, weight: Tensor, targets: Tensor, softcap: float = 0.0,
                bias_ids: Tensor | None = None, *bias_weights: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ CE, Σ logsumexp²) over the chunk's non-ignored tokens, with the chunk's logits in fp32."""
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if bias_ids is not None:
        logits = logits + bigram_bias(bias_ids, *bias_weights).to(logits.dtype)
    if softcap > 0:
        logits = apply_softcap(logits, softcap)
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    valid = targets != IGNORE_INDEX
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    ce_sum = torch.where(valid, lse - target_logit, zero).sum()
    z_sum = torch.where(valid, lse * lse, zero).sum()
    return ce_sum, z_sum


def chunked_lm_loss(hidden: Tensor, weight: Tensor, targets: Tensor, z_loss_weight: float,
                    chunk_tokens: int, softcap: float = 0.0, bias_ids: Tensor | None = None,
                    bias_weights: tuple[Tensor, ...] = ()) -> tuple[Tensor, dict[str, Tensor]]:
    """hidden (..., D) final normed states, weight (V, D) head, targets (...) token ids or -100.

    softcap > 0 caps the logits; bias_ids (...) with bias_weights (the bigram head's table, or its
    factors L and R) add the bigram rows B[bias_ids] before the cap.

    Returns (loss, {"ce": ce, "z_loss": z}) with ce and z detached; z is the unweighted mean
    logsumexp², so loss = ce + z_loss_weight · z.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match hidden states "
                         f"{tuple(hidden.shape[:-1])}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if bias_ids is not None and bias_ids.shape != targets.shape:
        raise ValueError(f"bias_ids shape {tuple(bias_ids.shape)} does not match targets {tuple(targets.shape)}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    n_tokens = h.shape[0]
    ce_sum = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    z_sum = ce_sum
    ids = bias_ids.reshape(-1) if bias_ids is not None else None
    plain = softcap <= 0 and ids is None
    for start in range(0, n_tokens, chunk_tokens):
        stop = min(start + chunk_tokens, n_tokens)
        extra = () if plain else (softcap, None if ids is None else ids[start:stop], *bias_weights)
        c, z = checkpoint(_chunk_sums, h[start:stop], weight, t[start:stop], *extra, use_reentrant=False)
        ce_sum = ce_sum + c
        z_sum = z_sum + z
    count = (t != IGNORE_INDEX).sum().clamp(min=1).to(ce_sum.dtype)
    ce = ce_sum / count
    z = z_sum / count
    loss = ce + z_loss_weight * z
    return loss, {"ce": ce.detach(), "z_loss": z.detach()}
