"""Triton kernels for phase 1 of the two-phase AttnRes read (attnres.completed_sources_mix), CUDA only.

Per token n, with the completed sources v_s (s < S, stacked as V (S, N, D)) and the R folded queries
q̃_r = g_r∘q_r (R, D):
    inv_s = rsqrt(mean(v_s²) + eps),   ℓ_rs = inv_s·⟨q̃_r, v_s⟩,   lse_r = logsumexp_s ℓ_rs,
    w_rs = exp(ℓ_rs − lse_r),          mix_r = Σ_s w_rs·v_s.
One program holds one token's S source rows in registers, so each source is read once per block in
forward and once in backward, and nothing of size R·S·D is ever written. Backward, with G_r = ∂L/∂mix_r
and γ_r = ∂L/∂lse_r:
    a_rs  = ⟨G_r, v_s⟩,   ∂ℓ_rs = w_rs·(a_rs − Σ_s' w_rs'·a_rs') + γ_r·w_rs
    ∂v_s  = Σ_r w_rs·G_r + inv_s·Σ_r ∂ℓ_rs·q̃_r − (inv_s²/D)·(Σ_r ∂ℓ_rs·ℓ_rs)·v_s
    ∂q̃_r = Σ_n Σ_s (∂ℓ_rs·inv_s)·v_s      (the kernel writes the coefficients; S matmuls reduce over n)
The CPU path stays the plain PyTorch one in attnres.py; tests/test_attnres_triton.py checks these kernels
against it (on CUDA, or on the CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install has no Triton; callers check `available()`
    triton = None

# Sources per block that the kernels take (registers hold S_PAD × D floats twice in backward).
MAX_SOURCES = 16


def available(tensor: Tensor) -> bool:
    """True when the Triton kernels can serve `tensor`'s device."""
    return triton is not None and tensor.is_cuda


if triton is not None:

    @triton.jit
    def _load_token_sources(V, N, D, eps, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's token row of every source: (token, s, d, masks, v (S_PAD, BLOCK_D), inv_s)."""
        n = tl.program_id(0).to(tl.int64)  # offsets s·N·D pass 2³¹ at large batches
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, BLOCK_D)
        s_ok = s < S
        d_ok = d < D
        tile = s_ok[:, None] & d_ok[None, :]
        v = tl.load(V + s[:, None] * N * D + n * D + d[None, :], mask=tile, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / D + eps)
        return n, s, d, s_ok, d_ok, tile, v, inv

    @triton.jit
    def _mix_forward_kernel(V, GQ, MIX, LSE, N, D, eps,
                            S: tl.constexpr, R: tl.constexpr, S_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
        n, s, d, s_ok, d_ok, tile, v, inv = _load_token_sources(V, N, D, eps, S, S_PAD, BLOCK_D)
        for r in tl.static_range(R):
            q = tl.load(GQ + r * D + d, mask=d_ok, other=0.0)
            logit = tl.sum(v * q[None, :], axis=1) * inv
            logit = tl.where(s_ok, logit, float("-inf"))
            top = tl.max(logit, axis=0)
            e = tl.exp(logit - top)
            total = tl.sum(e, axis=0)
            w = e / total
            mix = tl.sum(w[:, None] * v, axis=0)
            tl.store(MIX + r * N * D + n * D + d, mix, mask=d_ok)
            tl.store(LSE + r * N + n, top + tl.log(total))

    @triton.jit
    def _mix_backward_kernel(V, GQ, LSE, GRAD_MIX, GRAD_LSE, GRAD_V, COEF, N, D, eps,
                             S: tl.constexpr, R: tl.constexpr, S_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
        n, s, d, s_ok, d_ok, tile, v, inv = _load_token_sources(V, N, D, eps, S, S_PAD, BLOCK_D)
        grad_v = tl.zeros((S_PAD, BLOCK_D), dtype=tl.float32)
        norm_term = tl.zeros((S_PAD,), dtype=tl.float32)
        for r in tl.static_range(R):
            q = tl.load(GQ + r * D + d, mask=d_ok, other=0.0)
            logit = tl.sum(v * q[None, :], axis=1) * inv
            w = tl.where(s_ok, tl.exp(logit - tl.load(LSE + r * N + n)), 0.0)
            g = tl.load(GRAD_MIX + r * N * D + n * D + d, mask=d_ok, other=0.0).to(tl.float32)
            a = tl.sum(v * g[None, :], axis=1)
            grad_logit = w * (a - tl.sum(w * a, axis=0)) + tl.load(GRAD_LSE + r * N + n) * w
            grad_v += w[:, None] * g[None, :] + (grad_logit * inv)[:, None] * q[None, :]
            norm_term += grad_logit * logit
            tl.store(COEF + s * R * N + r * N + n, grad_logit * inv, mask=s_ok)
        grad_v -= (inv * inv * norm_term / D)[:, None] * v
        tl.store(GRAD_V + s[:, None] * N * D + n * D + d[None, :], grad_v, mask=tile)

    def _launch_meta(stacked: Tensor, folded_queries: Tensor) -> dict:
        s, _, d = stacked.shape
        return {"S": s, "R": folded_queries.shape[0], "S_PAD": max(2, triton.next_power_of_2(s)),
                "BLOCK_D": triton.next_power_of_2(d), "num_warps": 8 if d >= 512 else 4}

    # Custom operators (not a bare autograd.Function) so torch.compile sees the kernels as graph nodes
    # with known outputs, and autograd gets the backward below.

    @torch.library.triton_op("kotodama::attnres_mix", mutates_args=())
    def attnres_mix(stacked: Tensor, folded_queries: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        s, n, d = stacked.shape
        r = folded_queries.shape[0]
        mix = torch.empty((r, n, d), dtype=torch.float32, device=stacked.device)
        lse = torch.empty((r, n), dtype=torch.float32, device=stacked.device)
        torch.library.wrap_triton(_mix_forward_kernel)[(n,)](
            stacked, folded_queries, mix, lse, n, d, eps, **_launch_meta(stacked, folded_queries))
        return mix, lse

    @torch.library.triton_op("kotodama::attnres_mix_backward", mutates_args=())
    def attnres_mix_backward(stacked: Tensor, folded_queries: Tensor, lse: Tensor, grad_mix: Tensor,
                             grad_lse: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        s, n, d = stacked.shape
        r = folded_queries.shape[0]
        grad_v = torch.empty((s, n, d), dtype=torch.float32, device=stacked.device)
        coef = torch.empty((s, r, n), dtype=torch.float32, device=stacked.device)
        torch.library.wrap_triton(_mix_backward_kernel)[(n,)](
            stacked, folded_queries, lse, grad_mix, grad_lse, grad_v, coef, n, d, eps,
            **_launch_meta(stacked, folded_queries))
        return grad_v, coef

    def _setup_context(ctx, inputs, output):
        stacked, folded_queries, eps = inputs
        ctx.save_for_backward(stacked, folded_queries, output[1])
        ctx.eps = eps

    def _backward(ctx, grad_mix, grad_lse):
        stacked, folded_queries, lse = ctx.saved_tensors
        grad_mix = lse.new_zeros(*lse.shape, stacked.shape[-1]) if grad_mix is None else grad_mix
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        grad_v, coef = attnres_mix_backward(stacked, folded_queries, lse, grad_mix.contiguous(),
                                            grad_lse.contiguous(), ctx.eps)
        grad_q = coef[0] @ stacked[0]
        for k in range(1, stacked.shape[0]):
            grad_q = grad_q + coef[k] @ stacked[k]
        return grad_v, grad_q, None

    attnres_mix.register_autograd(_backward, setup_context=_setup_context)


def completed_sources_mix_triton(done: list[Tensor], queries: Tensor, norm_weights: Tensor,
                                 eps: float) -> tuple[Tensor, Tensor]:
    """attnres.completed_sources_mix (same arguments and results) with the Triton kernels: sources
    (B, T, D) each, queries and norm gains (R, D); mix (R, B, T, D) and lse (R, B, T), float32."""
    if len(done) > MAX_SOURCES:
        raise ValueError(f"the Triton AttnRes kernels take at most {MAX_SOURCES} sources, got {len(done)}")
    shape = done[0].shape
    stacked = torch.stack([v.reshape(-1, shape[-1]) for v in done]).float()
    folded = (norm_weights.float() * queries.float()).contiguous()
    mix, lse = attnres_mix(stacked, folded, float(eps))
    return mix.view(-1, *shape), lse.view(-1, *shape[:-1])
