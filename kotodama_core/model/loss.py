"""Chunked LM head + loss: the full fp32 logits of a batch never exist at once.

For the N non-ignored targets (target != -100) with logits ℓ_n = W·h_n:
    ce     = (1/N) Σ_n [logsumexp(ℓ_n) − ℓ_n[y_n]]
    z      = (1/N) Σ_n logsumexp(ℓ_n)²
    loss   = ce + z_loss_weight · z
Optional techniques change ℓ_n inside each chunk: ℓ_n ← ℓ_n + B[a_n] (bigram logit head, a_n the input
token at n) and then ℓ_n ← c·tanh(ℓ_n / c) (logit softcap c); see techniques/bigram_logits.py.
The tokens are cut into chunks. Without techniques, `_FusedLinearLoss` computes each chunk's fp32 logits
once and turns them straight into the gradients of the loss (the loss is a scalar, so its gradient can be
made in the forward pass and scaled in backward):
    ∂loss/∂ℓ_n = [softmax(ℓ_n)·(1 + 2·w_z·lse_n) − onehot(y_n)] / N      (0 for ignored targets)
    ∂loss/∂h_n = (∂loss/∂ℓ_n)·W,   ∂loss/∂W = Σ_n (∂loss/∂ℓ_n)ᵀ h_n
so no logits are kept or recomputed. With techniques the chunk function is activation-checkpointed
instead and autograd recomputes each chunk's logits in backward.
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


class _FusedLinearLoss(torch.autograd.Function):
    """(CE + w_z·z) over all tokens of h (N, D) against W (V, D), gradients made chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, z_loss_weight: float, chunk_tokens: int):
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        acc = torch.promote_types(h.dtype, torch.float32)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        ce_sum = torch.zeros((), dtype=acc, device=h.device)
        z_sum = torch.zeros((), dtype=acc, device=h.device)
        # Under autocast the two gradient products run in the autocast dtype: cast each chunk's
        # gradient once for both, rather than letting autocast cast it (and its transpose) twice.
        device_type = h.device.type
        mm_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                    else weight.dtype)
        for start in range(0, h.shape[0], chunk_tokens):
            stop = min(start + chunk_tokens, h.shape[0])
            h_c, y, ok = h[start:stop], targets[start:stop], valid[start:stop]
            logits = F.linear(h_c, weight).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            y_safe = y.clamp(min=0).unsqueeze(-1)
            target_logit = logits.gather(-1, y_safe).squeeze(-1)
            zero = torch.zeros((), dtype=acc, device=h.device)
            ce_sum = ce_sum + torch.where(ok, lse - target_logit, zero).sum()
            z_sum = z_sum + torch.where(ok, lse * lse, zero).sum()
            scale = ok.to(acc) / count
            grad_logits = logits.sub_(lse.unsqueeze(-1)).exp_()  # softmax, in the logits' buffer
            grad_logits.mul_((scale * (1 + 2 * z_loss_weight * lse)).unsqueeze(-1))
            grad_logits.scatter_add_(-1, y_safe, -scale.unsqueeze(-1))
            grad_mm = grad_logits.to(mm_dtype)
            grad_h[start:stop] = (grad_mm @ weight.to(mm_dtype)).to(h.dtype)
            grad_w += (grad_mm.t() @ h_c.to(mm_dtype)).to(acc)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ce, z = ce_sum / count, z_sum / count
        return ce + z_loss_weight * z, ce, z

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_ce: Tensor, _grad_z: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None


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
    if softcap <= 0 and bias_ids is None:
        loss, ce, z = _FusedLinearLoss.apply(h, weight, t, float(z_loss_weight), int(chunk_tokens))
        return loss, {"ce": ce.detach(), "z_loss": z.detach()}
    n_tokens = h.shape[0]
    ce_sum = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    z_sum = ce_sum
    ids = bias_ids.reshape(-1) if bias_ids is not None else None
    for start in range(0, n_tokens, chunk_tokens):
        stop = min(start + chunk_tokens, n_tokens)
        extra = (softcap, None if ids is None else ids[start:stop], *bias_weights)
        c, z = checkpoint(_chunk_sums, h[start:stop], weight, t[start:stop], *extra, use_reentrant=False)
        ce_sum = ce_sum + c
        z_sum = z_sum + z
    count = (t != IGNORE_INDEX).sum().clamp(min=1).to(ce_sum.dtype)
    ce = ce_sum / count
    z = z_sum / count
    loss = ce + z_loss_weight * z
    return loss, {"ce": ce.detach(), "z_loss": z.detach()}
