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
Phase 2 and the consuming layer's RMSNorm run as one kernel per read (attnres.merged_read_norm), with
the folded query q̃ = g∘q, the norm weight w and, per token, the open block's sum p, the phase-1 mix m
and lse:
    inv_p = rsqrt(mean(p²) + eps_r),   ℓ = inv_p·⟨q̃, p⟩,   σ = sigmoid(ℓ − lse),   h = m + σ·(p − m),
    r = rsqrt(mean(h²) + eps_n),       y = h·r·w        (h is never written; σ, inv_p, r are kept).
Backward, with gy = ∂L/∂y and x̂ = h·r:
    ∂w = Σ_n gy∘x̂,   g_h = r·(gy∘w − x̂·mean(gy∘w∘x̂)),   ∂m = (1 − σ)·g_h,
    gℓ = ⟨g_h, p − m⟩·σ(1 − σ),   ∂lse = −gℓ,   ∂q̃ = Σ_n gℓ·inv_p·p,
    ∂p = σ·g_h + gℓ·inv_p·q̃ − (gℓ·ℓ·inv_p²/D)·p.
The two sums over tokens are written as per-program partial rows and added up afterwards, so the result
does not depend on scheduling (no atomics).
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

    @triton.jit
    def _merge_norm_forward_kernel(MIX, P, LSE, GQ, WN, Y, SIG, INV_P, RSTD, N, D, read_eps, norm_eps,
                                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < N
        col_ok = cols < D
        tile = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        mix = tl.load(MIX + offs, mask=tile, other=0.0).to(tl.float32)
        p = tl.load(P + offs, mask=tile, other=0.0).to(tl.float32)
        gq = tl.load(GQ + cols, mask=col_ok, other=0.0)
        wn = tl.load(WN + cols, mask=col_ok, other=0.0)
        inv_p = 1.0 / tl.sqrt(tl.sum(p * p, axis=1) / D + read_eps)
        logit = tl.sum(p * gq[None, :], axis=1) * inv_p
        sig = tl.sigmoid(logit - tl.load(LSE + rows, mask=row_ok, other=0.0))
        h = mix + sig[:, None] * (p - mix)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / D + norm_eps)
        tl.store(Y + offs, (h * rstd[:, None] * wn[None, :]).to(Y.dtype.element_ty), mask=tile)
        tl.store(SIG + rows, sig, mask=row_ok)
        tl.store(INV_P + rows, inv_p, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _merge_norm_backward_kernel(MIX, P, GQ, WN, GY, SIG, INV_P, RSTD, GRAD_MIX, GRAD_P, GRAD_LSE,
                                    PART_WN, PART_GQ, N, D, TILES_PER_PROGRAM: tl.constexpr,
                                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        gq = tl.load(GQ + cols, mask=col_ok, other=0.0)
        wn = tl.load(WN + cols, mask=col_ok, other=0.0)
        acc_wn = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        acc_gq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for i in range(0, TILES_PER_PROGRAM):
            rows = (pid * TILES_PER_PROGRAM + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < N
            tile = row_ok[:, None] & col_ok[None, :]
            offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
            mix = tl.load(MIX + offs, mask=tile, other=0.0).to(tl.float32)
            p = tl.load(P + offs, mask=tile, other=0.0).to(tl.float32)
            gy = tl.load(GY + offs, mask=tile, other=0.0).to(tl.float32)
            sig = tl.load(SIG + rows, mask=row_ok, other=0.0)
            inv_p = tl.load(INV_P + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            diff = p - mix
            x_hat = (mix + sig[:, None] * diff) * rstd[:, None]
            acc_wn += gy * x_hat
            g_xhat = gy * wn[None, :]
            g_h = rstd[:, None] * (g_xhat - x_hat * (tl.sum(g_xhat * x_hat, axis=1) / D)[:, None])
            tl.store(GRAD_MIX + offs, ((1.0 - sig)[:, None] * g_h).to(GRAD_MIX.dtype.element_ty), mask=tile)
            g_logit = tl.sum(g_h * diff, axis=1) * sig * (1.0 - sig)
            logit = tl.sum(p * gq[None, :], axis=1) * inv_p
            coef = g_logit * inv_p
            g_p = sig[:, None] * g_h + coef[:, None] * gq[None, :] - (coef * logit * inv_p / D)[:, None] * p
            tl.store(GRAD_P + offs, g_p.to(GRAD_P.dtype.element_ty), mask=tile)
            tl.store(GRAD_LSE + rows, -g_logit, mask=row_ok)
            acc_gq += coef[:, None] * p
        tl.store(PART_WN + pid * D + cols, tl.sum(acc_wn, axis=0), mask=col_ok)
        tl.store(PART_GQ + pid * D + cols, tl.sum(acc_gq, axis=0), mask=col_ok)

    # Rows per program: a (ROWS, next_pow2(D)) fp32 tile of each operand in registers.
    _MERGE_ROWS = 8
    # Programs of the backward kernel at most: each writes one partial row of each token sum.
    _MERGE_BACKWARD_PROGRAMS = 512

    def _merge_meta(d: int) -> dict:
        return {"BLOCK_M": _MERGE_ROWS, "BLOCK_D": triton.next_power_of_2(d), "num_warps": 8 if d >= 512 else 4}

    @torch.library.triton_op("kotodama::attnres_merge_norm", mutates_args=())
    def attnres_merge_norm(mix: Tensor, lse: Tensor, partial: Tensor, folded_query: Tensor, norm_weight: Tensor,
                           read_eps: float, norm_eps: float,
                           out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n, d = partial.shape
        y = torch.empty((n, d), dtype=out_dtype, device=partial.device)
        sig, inv_p, rstd = (torch.empty((n,), dtype=torch.float32, device=partial.device) for _ in range(3))
        torch.library.wrap_triton(_merge_norm_forward_kernel)[(triton.cdiv(n, _MERGE_ROWS),)](
            mix, partial, lse, folded_query, norm_weight, y, sig, inv_p, rstd, n, d, read_eps, norm_eps,
            **_merge_meta(d))
        return y, sig, inv_p, rstd

    @torch.library.triton_op("kotodama::attnres_merge_norm_backward", mutates_args=())
    def attnres_merge_norm_backward(mix: Tensor, partial: Tensor, folded_query: Tensor, norm_weight: Tensor,
                                    grad_y: Tensor, sig: Tensor, inv_p: Tensor,
                                    rstd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        n, d = partial.shape
        tiles = triton.cdiv(n, _MERGE_ROWS)
        tiles_per_program = triton.cdiv(tiles, _MERGE_BACKWARD_PROGRAMS)
        programs = triton.cdiv(tiles, tiles_per_program)
        grad_mix = torch.empty_like(mix)
        grad_p = torch.empty_like(partial)
        grad_lse = torch.empty((n,), dtype=torch.float32, device=partial.device)
        part_wn = torch.empty((programs, d), dtype=torch.float32, device=partial.device)
        part_gq = torch.empty((programs, d), dtype=torch.float32, device=partial.device)
        torch.library.wrap_triton(_merge_norm_backward_kernel)[(programs,)](
            mix, partial, folded_query, norm_weight, grad_y, sig, inv_p, rstd, grad_mix, grad_p, grad_lse,
            part_wn, part_gq, n, d, tiles_per_program, **_merge_meta(d))
        return grad_mix, grad_p, grad_lse, part_gq.sum(0), part_wn.sum(0)

    def _merge_setup_context(ctx, inputs, output):
        mix, _lse, partial, folded_query, norm_weight, _read_eps, _norm_eps, _out_dtype = inputs
        _y, sig, inv_p, rstd = output
        ctx.save_for_backward(mix, partial, folded_query, norm_weight, sig, inv_p, rstd)
        ctx.mark_non_differentiable(sig, inv_p, rstd)

    def _merge_backward(ctx, grad_y, *_stats):
        mix, partial, folded_query, norm_weight, sig, inv_p, rstd = ctx.saved_tensors
        grad_mix, grad_p, grad_lse, grad_q, grad_wn = attnres_merge_norm_backward(
            mix, partial, folded_query, norm_weight, grad_y.contiguous(), sig, inv_p, rstd)
        return grad_mix, grad_lse, grad_p, grad_q, grad_wn, None, None, None

    attnres_merge_norm.register_autograd(_merge_backward, setup_context=_merge_setup_context)


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


def merged_read_norm_triton(mix: Tensor, lse: Tensor, partial: Tensor, query: Tensor, read_gain: Tensor,
                            read_eps: float, norm_weight: Tensor, norm_eps: float,
                            out_dtype: torch.dtype | None = None) -> Tensor:
    """attnres.merged_read_norm (same arguments and result) in one Triton kernel each way: mix, partial
    (B, T, D), lse (B, T), query, read_gain and norm_weight (D,)."""
    shape = partial.shape
    d = shape[-1]
    folded = (read_gain.float() * query.float()).contiguous()
    y, _sig, _inv_p, _rstd = attnres_merge_norm(
        mix.reshape(-1, d).contiguous(), lse.reshape(-1).contiguous().float(), partial.reshape(-1, d).contiguous(),
        folded, norm_weight.float().contiguous(), float(read_eps), float(norm_eps), out_dtype or partial.dtype)
    return y.view(shape)
