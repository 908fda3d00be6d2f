"""Triton kernels for the two-phase AttnRes read (attnres.completed_sources_mix, attnres.merged_read_norm),
CUDA only.

Phase 1, per token n, with the completed sources v_s (s < S, separate (N, D) tensors) and the R folded
queries q̃_r = g_r∘q_r (R, D):
    inv_s = rsqrt(mean(v_s²) + eps),   ℓ_rs = inv_s·⟨q̃_r, v_s⟩,   lse_r = logsumexp_s ℓ_rs,
    w_rs = exp(ℓ_rs − lse_r),          mix_r = Σ_s w_rs·v_s.
One program (one warp, so every reduction stays inside the warp) holds one token's S source rows in
registers: each source is read once per block in forward, the R mixes are written once each, and the
sources and mixes are passed as tuples of tensors, so nothing is stacked or unstacked. Under bf16
autocast each mix is written as two bf16 terms, hi + lo (SplitMix): the merge reads it as precisely as
fp32 at the same cost, and its gradient (through hi) is bf16, half of fp32's traffic in backward. The
logits ℓ are kept (S·R per token) for backward, with G_r = ∂L/∂mix_r and γ_r = ∂L/∂lse_r:
    a_rs = ⟨G_r, v_s⟩,   ∂ℓ_rs = w_rs·(a_rs − Σ_s' w_rs'·a_rs') + γ_r·w_rs,   c_s = Σ_r ∂ℓ_rs·ℓ_rs,
    ∂v_s = Σ_r w_rs·G_r + inv_s·Σ_r ∂ℓ_rs·q̃_r − (inv_s²/D)·c_s·v_s,
    ∂q̃_r = Σ_n Σ_s (∂ℓ_rs·inv_s)·v_s      (the kernel writes the coefficients; S matmuls reduce over n).
The backward runs in two passes over the R reads: the logit gradients with the sources in registers,
then the source gradients with the gradients in registers (reading each G_r twice, the second time
mostly from cache).
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

from typing import NamedTuple

import torch
from torch import Tensor

from kotodama_core.pointer_table import pointer_table as _pointer_table

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install has no Triton; callers check `available()`
    triton = None

# Sources per block that the kernels take: one warp holds S_PAD × D floats per token in registers.
MAX_SOURCES = 8


class SplitMix(NamedTuple):
    """A phase-1 mix stored as two bfloat16 terms, value = hi + lo (lo: hi's rounding error, rounded), so
    about 16 significant bits against bf16's 8: the merge's p − mix keeps its precision at fp32's 4 bytes
    per element, while the gradient, taken through hi alone (lo is constant to autograd), is bf16 and
    costs half of fp32's traffic in backward."""

    hi: Tensor
    lo: Tensor

    def value(self) -> Tensor:
        """hi + lo in float32."""
        return self.hi.float() + self.lo.float()


def mix_value(mix: Tensor | SplitMix) -> Tensor:
    """A phase-1 mix as one tensor (float32 for a SplitMix)."""
    return mix.value() if isinstance(mix, SplitMix) else mix


def available(tensor: Tensor) -> bool:
    """True when the Triton kernels can serve `tensor`'s device."""
    return triton is not None and tensor.is_cuda


if triton is not None:

    @triton.jit
    def _load_token_sources(SRC, N, D, eps, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's token row of each source in the tuple SRC as one (S_PAD, BLOCK_D) fp32 tile:
        (n, s, d, s_ok, d_ok, v, inv_s)."""
        n = tl.program_id(0).to(tl.int64)  # offsets n·D pass 2³¹ at large batches
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, BLOCK_D)
        v = tl.zeros((S_PAD, BLOCK_D), dtype=tl.float32)
        for k in tl.static_range(S):
            row = tl.load(SRC[k] + n * D + d, mask=d < D, other=0.0).to(tl.float32)
            v = tl.where(s[:, None] == k, row[None, :], v)
        inv = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / D + eps)
        return n, s, d, s < S, d < D, v, inv

    @triton.jit
    def _row_pointer(TABLE, r, n, D, BF16: tl.constexpr):
        """Row n of the r-th (N, D) tensor (bf16 or fp32) whose address is TABLE[r] (a runtime index, so
        the read loops stay loops: unrolled, the compiler keeps every read's addresses live and spills)."""
        element = tl.bfloat16 if BF16 else tl.float32
        # Torch's buffers start 16-byte aligned (the launcher assumes as much of pointer arguments); an
        # address read from the table carries no such fact, and without it every access is scalar.
        return tl.multiple_of(tl.load(TABLE + r).to(tl.pointer_type(element)), 16) + n * D

    @triton.jit
    def _mix_one_read(r, v, inv, s, d, s_ok, d_ok, n, GQ, MIX_TABLE, MIX_LO, LOGITS, LSE, N, D,
                      S: tl.constexpr, SPLIT: tl.constexpr):
        q = tl.load(GQ + r * D + d, mask=d_ok, other=0.0)
        logit = tl.where(s_ok, tl.sum(v * q[None, :], axis=1) * inv, float("-inf"))
        top = tl.max(logit, axis=0)
        e = tl.exp(logit - top)
        total = tl.sum(e, axis=0)
        mix = tl.sum((e / total)[:, None] * v, axis=0)
        row = _row_pointer(MIX_TABLE, r, n, D, SPLIT)
        if SPLIT:  # mix = hi + lo, two bf16 terms (the rounding error of hi, rounded)
            hi = mix.to(tl.bfloat16)
            tl.store(row + d, hi, mask=d_ok)
            tl.store(MIX_LO + (r * N + n) * D + d, (mix - hi.to(tl.float32)).to(tl.bfloat16), mask=d_ok)
        else:
            tl.store(row + d, mix, mask=d_ok)
        tl.store(LOGITS + (r * N + n) * S + s, logit, mask=s_ok)  # (R, N, S): a token's S logits side by side
        tl.store(LSE + r * N + n, top + tl.log(total))

    @triton.jit
    def _mix_forward_kernel(SRC, GQ, MIX_TABLE, MIX_LO, LOGITS, LSE, N, D, eps,
                            S: tl.constexpr, R: tl.constexpr, S_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                            SPLIT: tl.constexpr, UNROLL: tl.constexpr):
        n, s, d, s_ok, d_ok, v, inv = _load_token_sources(SRC, N, D, eps, S, S_PAD, BLOCK_D)
        if UNROLL:  # every read's loads and stores in flight together (few reads)
            for r in tl.static_range(R):
                _mix_one_read(r, v, inv, s, d, s_ok, d_ok, n, GQ, MIX_TABLE, MIX_LO, LOGITS, LSE, N, D, S, SPLIT)
        else:
            for r in tl.range(0, R):
                _mix_one_read(r, v, inv, s, d, s_ok, d_ok, n, GQ, MIX_TABLE, MIX_LO, LOGITS, LSE, N, D, S, SPLIT)

    @triton.jit
    def _mix_backward_kernel(SRC, GQ, LOGITS, LSE, GRAD_MIX_TABLE, GRAD_LSE, GRAD_SRC, COEF, N, D, eps,
                             S: tl.constexpr, R: tl.constexpr, S_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                             SPLIT: tl.constexpr):
        n, s, d, s_ok, d_ok, v, inv = _load_token_sources(SRC, N, D, eps, S, S_PAD, BLOCK_D)
        # Pass 1: the logit gradients of every read, written as coefficients ∂ℓ_rs·inv_s.
        norm_term = tl.zeros((S_PAD,), dtype=tl.float32)
        for r in tl.range(0, R):
            logit = tl.load(LOGITS + (r * N + n) * S + s, mask=s_ok, other=0.0)
            w = tl.where(s_ok, tl.exp(logit - tl.load(LSE + r * N + n)), 0.0)
            g = tl.load(_row_pointer(GRAD_MIX_TABLE, r, n, D, SPLIT) + d, mask=d_ok, other=0.0).to(tl.float32)
            a = tl.sum(v * g[None, :], axis=1)
            grad_logit = w * (a - tl.sum(w * a, axis=0)) + tl.load(GRAD_LSE + r * N + n) * w
            tl.store(COEF + (s * R + r) * N + n, grad_logit * inv, mask=s_ok)
            norm_term += grad_logit * logit
        # Pass 2: the source gradients, with the sources out of registers; what it reads again (the
        # logits, the coefficients this program wrote, the mix gradients) comes from cache.
        tl.debug_barrier()
        grad_v = -(inv * inv * norm_term / D)[:, None] * v
        for r in tl.range(0, R):
            logit = tl.load(LOGITS + (r * N + n) * S + s, mask=s_ok, other=0.0)
            w = tl.where(s_ok, tl.exp(logit - tl.load(LSE + r * N + n)), 0.0)
            coef = tl.load(COEF + (s * R + r) * N + n, mask=s_ok, other=0.0)
            g = tl.load(_row_pointer(GRAD_MIX_TABLE, r, n, D, SPLIT) + d, mask=d_ok, other=0.0).to(tl.float32)
            q = tl.load(GQ + r * D + d, mask=d_ok, other=0.0)
            grad_v += w[:, None] * g[None, :] + coef[:, None] * q[None, :]
        for k in tl.static_range(S):
            row = tl.sum(tl.where(s[:, None] == k, grad_v, 0.0), axis=0)
            tl.store(GRAD_SRC[k] + n * D + d, row.to(GRAD_SRC[k].dtype.element_ty), mask=d_ok)

    # Warps per token program of the phase-1 kernels. One warp keeps every reduction inside the warp, but
    # caps a Hopper SM at 32 resident one-warp programs (half its warp slots); more warps per token put
    # more loads in flight per program at the price of cross-warp reductions. bench/attnres_kernels.py
    # (--mix-warps) times the choices.
    # The forward kernel unrolls its loop over the reads up to this many reads.
    MIX_FORWARD = {"warps": 1, "unroll_reads": 8}
    # The backward runs in two passes over the reads even where one would fit (sources and source
    # gradients both in registers, S ≤ 4): at 223 registers a thread that one ran 0.91 ms against the
    # two passes' 0.70 (S 4, R 18, 32,768 tokens, H200), as a third of the warps fit on an SM.
    MIX_BACKWARD = {"warps": 1}

    def _mix_meta(num_sources: int, num_reads: int, dim: int, split: bool, warps: int = 1) -> dict:
        s_pad = max(2, triton.next_power_of_2(num_sources))
        block_d = triton.next_power_of_2(dim)
        return {"S": num_sources, "R": num_reads, "S_PAD": s_pad, "BLOCK_D": block_d, "SPLIT": split,
                "num_warps": warps}

    # Opaque custom operators (their kernels take tuples of tensors, which the traced triton_op path
    # does not), so torch.compile sees them as graph nodes with known outputs, and autograd gets the
    # backward below.

    @torch.library.custom_op("kotodama::attnres_block_mix", mutates_args=())
    def attnres_block_mix(sources: list[Tensor], folded_queries: Tensor, eps: float,
                          split: bool) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """(mixes, lows, lse, logits). split=False: the R mixes in float32, lows empty. split=True: each
        mix as hi + lo in bfloat16, mixes[r] = hi (the differentiable term, so its gradient is bf16) and
        lows[r] = lo, (R, N, D), not differentiable."""
        n, d = sources[0].shape
        r = folded_queries.shape[0]
        dtype = torch.bfloat16 if split else torch.float32
        mixes = [torch.empty((n, d), dtype=dtype, device=sources[0].device) for _ in range(r)]
        lows = torch.empty((r, n, d) if split else (0,), dtype=torch.bfloat16, device=sources[0].device)
        logits = torch.empty((r, n, len(sources)), dtype=torch.float32, device=sources[0].device)
        lse = torch.empty((r, n), dtype=torch.float32, device=sources[0].device)
        _mix_forward_kernel[(n,)](tuple(sources), folded_queries, _pointer_table(mixes), lows if split else lse,
                                  logits, lse, n, d, eps, UNROLL=r <= MIX_FORWARD["unroll_reads"],
                                  **_mix_meta(len(sources), r, d, split, MIX_FORWARD["warps"]))
        return mixes, lows, lse, logits

    @attnres_block_mix.register_fake
    def _(sources, folded_queries, eps, split):
        n, d = sources[0].shape
        r = folded_queries.shape[0]
        dtype = torch.bfloat16 if split else torch.float32
        return ([sources[0].new_empty((n, d), dtype=dtype) for _ in range(r)],
                sources[0].new_empty((r, n, d) if split else (0,), dtype=torch.bfloat16),
                sources[0].new_empty((r, n), dtype=torch.float32),
                sources[0].new_empty((r, n, len(sources)), dtype=torch.float32))

    @torch.library.custom_op("kotodama::attnres_block_mix_backward", mutates_args=())
    def attnres_block_mix_backward(sources: list[Tensor], folded_queries: Tensor, logits: Tensor, lse: Tensor,
                                   grad_mixes: list[Tensor], grad_lse: Tensor,
                                   eps: float) -> tuple[list[Tensor], Tensor]:
        """(∂sources, ∂q̃); the mix gradients are float32, or bfloat16 for split mixes."""
        n, d = sources[0].shape
        r = folded_queries.shape[0]
        grad_sources = [torch.empty_like(v) for v in sources]
        coef = torch.empty((len(sources), r, n), dtype=torch.float32, device=sources[0].device)
        split = grad_mixes[0].dtype == torch.bfloat16
        grad_mixes = [g.contiguous() for g in grad_mixes]
        _mix_backward_kernel[(n,)](tuple(sources), folded_queries, logits, lse, _pointer_table(grad_mixes), grad_lse,
                                   tuple(grad_sources), coef, n, d, eps,
                                   **_mix_meta(len(sources), r, d, split, MIX_BACKWARD["warps"]))
        grad_q = coef[0] @ sources[0].float()
        for k in range(1, len(sources)):
            grad_q = grad_q + coef[k] @ sources[k].float()
        return grad_sources, grad_q

    @attnres_block_mix_backward.register_fake
    def _(sources, folded_queries, logits, lse, grad_mixes, grad_lse, eps):
        return [torch.empty_like(v) for v in sources], torch.empty_like(folded_queries)

    def _setup_context(ctx, inputs, output):
        sources, folded_queries, eps, split = inputs
        _mixes, lows, lse, logits = output
        ctx.save_for_backward(folded_queries, lse, logits, *sources)
        ctx.eps = eps
        ctx.mix_dtype = torch.bfloat16 if split else torch.float32
        ctx.mark_non_differentiable(lows, logits)
        # Autograd would otherwise fill a zero gradient for every output without one: lows alone is
        # R·N·D bf16 of zeros a block, written and never read. _backward fills in the few it needs.
        ctx.set_materialize_grads(False)

    def _backward(ctx, grad_mixes, _grad_lows, grad_lse, _grad_logits):
        folded_queries, lse, logits, *sources = ctx.saved_tensors
        n, d = sources[0].shape
        grad_mixes = [lse.new_zeros((n, d), dtype=ctx.mix_dtype) if g is None else g.to(ctx.mix_dtype)
                      for g in (grad_mixes or [None] * folded_queries.shape[0])]
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.contiguous()
        grad_sources, grad_q = attnres_block_mix_backward(list(sources), folded_queries, logits, lse,
                                                          grad_mixes, grad_lse, ctx.eps)
        return grad_sources, grad_q, None, None

    attnres_block_mix.register_autograd(_backward, setup_context=_setup_context)

    @triton.jit
    def _load_mix(MIX, MIX_LO, offs, tile, SPLIT: tl.constexpr):
        """The phase-1 mix tile in fp32: hi + lo for a split mix."""
        mix = tl.load(MIX + offs, mask=tile, other=0.0).to(tl.float32)
        if SPLIT:
            mix += tl.load(MIX_LO + offs, mask=tile, other=0.0).to(tl.float32)
        return mix

    @triton.jit
    def _merge_norm_forward_kernel(MIX, MIX_LO, BASE, DELTA, LSE, GQ, WN, Y, P_OUT, SIG, INV_P, RSTD, N, D,
                                   read_eps, norm_eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                                   HAS_DELTA: tl.constexpr, SPLIT: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < N
        col_ok = cols < D
        tile = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        mix = _load_mix(MIX, MIX_LO, offs, tile, SPLIT)
        p = tl.load(BASE + offs, mask=tile, other=0.0).to(tl.float32)
        if HAS_DELTA:  # the residual add before the read: p = base + delta, written once here
            p += tl.load(DELTA + offs, mask=tile, other=0.0).to(tl.float32)
            tl.store(P_OUT + offs, p.to(P_OUT.dtype.element_ty), mask=tile)
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
    def _merge_norm_backward_kernel(MIX, MIX_LO, P, GQ, WN, GY, GP_IN, SIG, INV_P, RSTD, GRAD_MIX, GRAD_P,
                                    GRAD_DELTA, GRAD_LSE, PART_WN, PART_GQ, N, D,
                                    TILES_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_D: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_GRAD_P: tl.constexpr,
                                    SPLIT: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        gq = tl.load(GQ + cols, mask=col_ok, other=0.0)
        wn = tl.load(WN + cols, mask=col_ok, other=0.0)
        acc_wn = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        acc_gq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for i in tl.range(0, TILES_PER_PROGRAM, loop_unroll_factor=1):
            rows = (pid * TILES_PER_PROGRAM + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < N
            tile = row_ok[:, None] & col_ok[None, :]
            offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
            mix = _load_mix(MIX, MIX_LO, offs, tile, SPLIT)
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
            if HAS_GRAD_P:  # p's gradient from its other consumers, summed here instead of by autograd
                g_p += tl.load(GP_IN + offs, mask=tile, other=0.0).to(tl.float32)
            tl.store(GRAD_P + offs, g_p.to(GRAD_P.dtype.element_ty), mask=tile)
            if HAS_DELTA:  # p = base + delta: both get p's gradient, delta's in its own dtype
                tl.store(GRAD_DELTA + offs, g_p.to(GRAD_DELTA.dtype.element_ty), mask=tile)
            tl.store(GRAD_LSE + rows, -g_logit, mask=row_ok)
            acc_gq += coef[:, None] * p
        tl.store(PART_WN + pid * D + cols, tl.sum(acc_wn, axis=0), mask=col_ok)
        tl.store(PART_GQ + pid * D + cols, tl.sum(acc_gq, axis=0), mask=col_ok)

    # Launch shapes of the merge kernels: rows per program and warps per program. One warp per row keeps
    # every reduction inside the warp (no shared-memory round trips); the backward kernel's programs
    # loop over rows, each writing one partial row of the two token sums (at most MERGE_PROGRAMS rows).
    MERGE_FORWARD = {"rows": 1, "warps": 1}
    MERGE_BACKWARD = {"rows": 1, "warps": 1}
    MERGE_PROGRAMS = 2048

    def _merge_meta(shape: dict, d: int) -> dict:
        return {"BLOCK_M": shape["rows"], "BLOCK_D": triton.next_power_of_2(d), "num_warps": shape["warps"]}

    # Kernel arguments a launch does not use (its HAS_* switch is off) point at one of its own outputs;
    # the kernel never touches them.

    @torch.library.triton_op("kotodama::attnres_merge_norm", mutates_args=())
    def attnres_merge_norm(mix: Tensor, mix_lo: Tensor | None, lse: Tensor, base: Tensor, delta: Tensor | None,
                           folded_query: Tensor, norm_weight: Tensor, read_eps: float, norm_eps: float,
                           out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(y, p, σ, inv_p, r); the mix is mix + mix_lo when mix_lo is given (a split mix); p = base + delta
        when delta is given, else an empty tensor."""
        n, d = base.shape
        y = torch.empty((n, d), dtype=out_dtype, device=base.device)
        sig, inv_p, rstd = (torch.empty((n,), dtype=torch.float32, device=base.device) for _ in range(3))
        p_out = torch.empty((n, d) if delta is not None else (0,), dtype=base.dtype, device=base.device)
        torch.library.wrap_triton(_merge_norm_forward_kernel)[(triton.cdiv(n, MERGE_FORWARD["rows"]),)](
            mix, sig if mix_lo is None else mix_lo, base, sig if delta is None else delta, lse, folded_query,
            norm_weight, y, sig if delta is None else p_out, sig, inv_p, rstd, n, d, read_eps, norm_eps,
            HAS_DELTA=delta is not None, SPLIT=mix_lo is not None, **_merge_meta(MERGE_FORWARD, d))
        return y, p_out, sig, inv_p, rstd

    @torch.library.triton_op("kotodama::attnres_merge_norm_backward", mutates_args=())
    def attnres_merge_norm_backward(mix: Tensor, mix_lo: Tensor | None, p: Tensor, folded_query: Tensor,
                                    norm_weight: Tensor, grad_y: Tensor, grad_p_in: Tensor | None, sig: Tensor,
                                    inv_p: Tensor, rstd: Tensor, has_delta: bool,
                                    delta_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(∂mix, ∂p, ∂delta, ∂lse, ∂q̃, ∂w); ∂mix in mix's dtype (bf16 for a split mix: the gradient of
        its hi term); ∂p includes grad_p_in; ∂delta is empty without a delta."""
        n, d = p.shape
        tiles = triton.cdiv(n, MERGE_BACKWARD["rows"])
        tiles_per_program = triton.cdiv(tiles, MERGE_PROGRAMS)
        programs = triton.cdiv(tiles, tiles_per_program)
        grad_mix = torch.empty_like(mix)
        grad_p = torch.empty_like(p)
        grad_delta = torch.empty((n, d) if has_delta else (0,), dtype=delta_dtype, device=p.device)
        grad_lse = torch.empty((n,), dtype=torch.float32, device=p.device)
        part_wn = torch.empty((programs, d), dtype=torch.float32, device=p.device)
        part_gq = torch.empty((programs, d), dtype=torch.float32, device=p.device)
        torch.library.wrap_triton(_merge_norm_backward_kernel)[(programs,)](
            mix, grad_lse if mix_lo is None else mix_lo, p, folded_query, norm_weight, grad_y,
            grad_lse if grad_p_in is None else grad_p_in, sig, inv_p, rstd, grad_mix, grad_p,
            grad_delta if has_delta else grad_lse, grad_lse, part_wn, part_gq, n, d, tiles_per_program,
            HAS_DELTA=has_delta, HAS_GRAD_P=grad_p_in is not None, SPLIT=mix_lo is not None,
            **_merge_meta(MERGE_BACKWARD, d))
        return grad_mix, grad_p, grad_delta, grad_lse, part_gq.sum(0), part_wn.sum(0)

    def _merge_setup_context(ctx, inputs, output):
        mix, mix_lo, _lse, base, delta, folded_query, norm_weight, _read_eps, _norm_eps, _out_dtype = inputs
        _y, p_out, sig, inv_p, rstd = output
        ctx.save_for_backward(mix, mix_lo, base if delta is None else p_out, folded_query, norm_weight, sig, inv_p,
                              rstd)
        ctx.delta_dtype = None if delta is None else delta.dtype
        ctx.mark_non_differentiable(sig, inv_p, rstd)

    def _merge_backward(ctx, grad_y, grad_p_out, *_stats):
        mix, mix_lo, p, folded_query, norm_weight, sig, inv_p, rstd = ctx.saved_tensors
        has_delta = ctx.delta_dtype is not None
        grad_p_in = grad_p_out.contiguous() if has_delta and grad_p_out is not None else None
        grad_mix, grad_p, grad_delta, grad_lse, grad_q, grad_wn = attnres_merge_norm_backward(
            mix, mix_lo, p, folded_query, norm_weight, grad_y.contiguous(), grad_p_in, sig, inv_p, rstd, has_delta,
            ctx.delta_dtype or p.dtype)
        return (grad_mix, None, grad_lse, grad_p, grad_delta if has_delta else None, grad_q, grad_wn,
                None, None, None)

    attnres_merge_norm.register_autograd(_merge_backward, setup_context=_merge_setup_context)


def completed_sources_mix_triton(done: list[Tensor], queries: Tensor, norm_weights: Tensor, eps: float,
                                 split: bool = False) -> tuple[list[Tensor] | list[SplitMix], list[Tensor]]:
    """attnres.completed_sources_mix with the Triton kernels: sources (B, T, D) each, queries and norm
    gains (R, D). Returns the R mixes (B, T, D) and the R lse (B, T) in float32, as lists. The mixes are
    float32 tensors, or with `split` SplitMix pairs (the model's choice under bf16 autocast: as precise
    for the merge as fp32, with bf16 gradients)."""
    if len(done) > MAX_SOURCES:
        raise ValueError(f"the Triton AttnRes kernels take at most {MAX_SOURCES} sources, got {len(done)}")
    shape = done[0].shape
    sources = [v.reshape(-1, shape[-1]).contiguous() for v in done]
    folded = (norm_weights.float() * queries.float()).contiguous()
    mixes, lows, lse, _logits = attnres_block_mix(sources, folded, float(eps), split)
    mixes = [m.view(shape) for m in mixes]
    if split:
        mixes = [SplitMix(m, lo.view(shape)) for m, lo in zip(mixes, lows.unbind(0))]
    return mixes, list(lse.view(-1, *shape[:-1]).unbind(0))


def merged_read_norm_triton(mix: Tensor | SplitMix, lse: Tensor, partial: Tensor, query: Tensor, read_gain: Tensor,
                            read_eps: float, norm_weight: Tensor, norm_eps: float,
                            out_dtype: torch.dtype | None = None, delta: Tensor | None = None):
    """attnres.merged_read_norm (same arguments and result) in one Triton kernel each way: mix (a tensor or
    a SplitMix), partial (B, T, D), lse (B, T), query, read_gain and norm_weight (D,). With `delta`
    (B, T, D), the residual add before the read runs in the same kernel: the read is of partial + delta,
    and the result is (partial + delta, y)."""
    shape = partial.shape
    d = shape[-1]
    folded = (read_gain.float() * query.float()).contiguous()
    hi, lo = (mix.hi, mix.lo.reshape(-1, d).contiguous()) if isinstance(mix, SplitMix) else (mix, None)
    y, p_out, _sig, _inv_p, _rstd = attnres_merge_norm(
        hi.reshape(-1, d).contiguous(), lo, lse.reshape(-1).contiguous().float(), partial.reshape(-1, d).contiguous(),
        None if delta is None else delta.reshape(-1, d).contiguous(), folded, norm_weight.float().contiguous(),
        float(read_eps), float(norm_eps), out_dtype or partial.dtype)
    if delta is None:
        return y.view(shape)
    return p_out.view(shape), y.view(shape)
