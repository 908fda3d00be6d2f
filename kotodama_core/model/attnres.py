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

from kotodama_core.model.norm import rms_norm


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


# ---------------------------------------------------------------- two-phase block reads
# Within one block the completed sources v_1..v_S do not change; only the open block's sum p does. The
# R reads of a block (queries q_r, gains g_r) therefore split exactly into
#   phase 1, once per block:   ℓ_rs = ⟨g_r∘q_r, v_s⟩·rsqrt(mean(v_s²) + eps),   lse_r = logsumexp_s ℓ_rs,
#                              mix_r = Σ_s exp(ℓ_rs − lse_r)·v_s
#   phase 2, at each read:     ℓ_rp = ⟨g_r∘q_r, p⟩·rsqrt(mean(p²) + eps),   w_p = σ(ℓ_rp − lse_r),
#                              read_r = (1 − w_p)·mix_r + w_p·p
# since the softmax over {v_1..v_S, p} gives p the weight exp(ℓ_rp) / (exp(lse_r) + exp(ℓ_rp)) and the
# completed sources their phase-1 weights times (1 − w_p). Each completed source is then read twice per
# block (forward) instead of twice per read, and its gradient is formed once per block instead of once
# per read and then summed — the dominant memory traffic of AttnRes at 28 layers.


def completed_sources_mix(done: list[Tensor], queries: Tensor, norm_weights: Tensor,
                          eps: float) -> tuple[Tensor, Tensor]:
    """Phase 1 for R reads over the completed sources `done` (S ≥ 1 tensors (B, T, D), one dtype).

    queries and norm_weights are (R, D). Returns mix (R, B, T, D) in at least float32 and lse (R, B, T):
    mix_r = Σ_s softmax_s(ℓ_r·)·v_s and lse_r = logsumexp_s ℓ_rs with ℓ_rs as in attn_res_read.
    """
    if not done:
        raise ValueError("completed_sources_mix needs at least one completed source")
    compute = torch.promote_types(done[0].dtype, torch.float32)
    gq = (norm_weights.to(compute) * queries.to(compute))[:, None, None, :]  # (R, 1, 1, D)
    logits = []
    for v in done:
        v = v.to(compute)
        inv_rms = torch.rsqrt(v.pow(2).mean(dim=-1) + eps)                   # (B, T)
        logits.append((v * gq).sum(dim=-1) * inv_rms)                        # (R, B, T)
    logits = torch.stack(logits, dim=-1)                                      # (R, B, T, S)
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - lse.unsqueeze(-1))
    mix = weights[..., 0:1] * done[0].to(compute)
    for s in range(1, len(done)):
        mix = mix + weights[..., s:s + 1] * done[s].to(compute)
    return mix, lse


def open_block_read(mix: Tensor, lse: Tensor, partial: Tensor, query: Tensor, norm_weight: Tensor,
                    eps: float) -> Tensor:
    """Phase 2: one read = the phase-1 mix (B, T, D) of the completed sources merged with the open
    block's sum `partial` (B, T, D) by its softmax weight σ(ℓ_p − lse). Returns partial's dtype."""
    compute = torch.promote_types(partial.dtype, torch.float32)
    p = partial.to(compute)
    gq = norm_weight.to(compute) * query.to(compute)
    logit = (p * gq).sum(dim=-1) * torch.rsqrt(p.pow(2).mean(dim=-1) + eps)
    w = torch.sigmoid(logit - lse).unsqueeze(-1)
    return (mix + w * (p - mix)).to(partial.dtype)


def merged_read_norm(mix: Tensor, lse: Tensor, partial: Tensor, query: Tensor, read_gain: Tensor,
                     read_eps: float, norm_weight: Tensor, norm_eps: float,
                     out_dtype: torch.dtype | None = None) -> Tensor:
    """A phase-2 read followed by the consuming layer's RMSNorm, y = RMSNorm_w(open_block_read(...)):
        h = mix + σ(ℓ_p − lse)·(p − mix),   y = h·rsqrt(mean(h²) + eps_n)·w.
    The reference for the fused kernel of attnres_triton (which never writes h); returns out_dtype
    (partial's dtype when None)."""
    h = open_block_read(mix, lse, partial, query, read_gain, read_eps)
    return rms_norm(h, norm_weight, norm_eps).to(out_dtype or partial.dtype)
