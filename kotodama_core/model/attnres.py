"""Block Attention Residuals (arXiv 2603.15031): a learned softmax mixture over depth sources.

A read with pseudo-query q and key-norm gain g over sources v_1..v_S (each (B, T, D)) is
    w_s = softmax_s(⟨q, RMSNorm_g(v_s)⟩)        (no 1/√d, softmax in at least float32)
    read = Σ_s w_s · v_s.
With q = 0 every w_s = 1/S, so the read is the mean of its sources.

Sources (see KotodamaLM): the token embedding, the sum of sublayer outputs of every completed block,
and the running sum of the open block. This single function is the unit a fused GPU kernel replaces.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attn_res_read(sources: list[Tensor], query: Tensor, norm_weight: Tensor, eps: float,
                  return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Σ_s softmax_s(⟨q, RMSNorm_g(v_s)⟩)·v_s over the list `sources` (all (B, T, D), one dtype).

    Returns the read in the sources' dtype, and with return_weights the (B, T, S) mixture weights.
    Uses ⟨q, RMSNorm_g(v)⟩ = ⟨g∘q, v⟩·rsqrt(mean(v²) + eps) and a loop over sources, so autograd saves
    only (B, T) statistics and references to the sources — never a stacked (B, T, S, D) copy.
    Elementwise products rather than matmuls keep autocast from rounding the sources to bf16.
    """
    compute = torch.promote_types(sources[0].dtype, torch.float32)
    gq = norm_weight.to(compute) * query.to(compute)
    logits = []
    for v in sources:
        v = v.to(compute)
        inv_rms = torch.rsqrt(v.pow(2).mean(dim=-1) + eps)
        logits.append((v * gq).sum(dim=-1) * inv_rms)
    weights = torch.softmax(torch.stack(logits, dim=-1), dim=-1)  # (B, T, S)
    out = weights[..., 0:1] * sources[0].to(compute)
    for s in range(1, len(sources)):
        out = out + weights[..., s:s + 1] * sources[s].to(compute)
    out = out.to(sources[0].dtype)
    if return_weights:
        return out, weights
    return out
