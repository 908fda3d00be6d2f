"""Triton kernels for the two-phase AttnRes read (attnres.completed_sources_mix, attnres.merged_read_norm),
CUDA only.

Phase 1, per token n, with the completed sources v_s (s < S, separate (N, D) tensors) and the R folded
queries q̃_r = g_r∘q_r (R, D):
    inv_s = rsqrt(mean(v_s²) + eps),   ℓ_rs = inv_s·⟨q̃_r, v_s⟩,   lse_r = logsumexp_s ℓ_rs,
    w_rs = exp(ℓ_rs − lse_r),          mix_r = Σ_s w_rs·v_s.
One program (one warp, so every reduction stays inside the warp) holds one token's S source rows in
registers: each source is read once per block in forward, the R mixes are written once each, and the
sources and mixes are passed as tuples of tensors, so nothing is stacked or unstacked. The logits ℓ are
kept (S·R per token) for backward, which runs in two passes over the R reads, with G_r = ∂L/∂mix_r and
γ_r = ∂L/∂lse_r:
    pass 1 (sources in registers):  a_rs = ⟨G_r, v_s⟩,   ∂ℓ_rs = w_rs·(a_rs − Σ_s' w_rs'·a_rs') + γ_r·w_rs,
                                    c_s = Σ_r ∂ℓ_rs·ℓ_rs
    pass 2 (gradients in registers): ∂v_s = Σ_r w_rs·G_r + inv_s·Σ_r ∂ℓ_rs·q̃_r − (inv_s²/D)·c_s·v_s
    ∂q̃_r = Σ_n Σ_s (∂ℓ_rs·inv_s)·v_s      (the kernel writes the coefficients c_srn = ∂ℓ_rs·inv_s; a
                                           second kernel reduces them against all S sources over n)
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

from kotodama_core.pointer_table import pointer_table as _pointer_table

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install has no Triton; callers check `available()`
    triton = None

# Sources per block that the kernels take: one warp holds S_PAD × D floats per token in registers.
MAX_SOURCES = 8


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
    def _mix_one_read(r, v, inv, s, d, s_ok, d_ok, n, GQ, MIX_TABLE, LOGITS, LSE, N, D,
                      S: tl.constexpr, MIX_BF16: tl.constexpr):
        q = tl.load(GQ + r * D + d, mask=d_ok, other=0.0)
        logit = tl.where(s_ok, tl.sum(v * q[None, :], axis=1) * inv, float("-inf"))
        top = tl.max(logit, axis=0)
        e = tl.exp(logit - top)
        total = tl.sum(e, axis=0)
        mix = tl.sum((e / total)[:, None] * v, axis=0)
        row = _row_pointer(MIX_TABLE, r, n, D, MIX_BF16)
        tl.store(row + d, mix.to(row.dtype.element_ty), mask=d_ok)
        tl.store(LOGITS + (r * N + n) * S + s, logit, mask=s_ok)  # (R, N, S): a token's S logits side by side
        tl.store(LSE + r * N + n, top + tl.log(total))

    @triton.jit
    def _mix_forward_kernel(SRC, GQ, MIX_TABLE, LOGITS, LSE, N, D, eps,
                            S: tl.constexpr, R: tl.constexpr, S_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                            MIX_BF16: tl.constexpr, UNROLL: tl.constexpr, STAGES: tl.constexpr):
        n, s, d, s_ok, d_ok, v, inv = _load_token_sources(SRC, N, D, eps, S, S_PAD, BLOCK_D)
        if UNROLL:  # every read's loads and stores in flight together (few reads)
            for r in tl.static_range(R):
                _mix_one_read(r, v, inv, s, d, s_ok, d_ok, n, GQ, MIX_TABLE, LOGITS, LSE, N, D, S, MIX_BF16)
        else:
            for r in tl.range(0, R, num_stages=STAGES):
                _mix_one_read(r, v, inv, s, d, s_ok, d_ok, n, GQ, MIX_TABLE, LOGITS, LSE, N, D, S, MIX_BF16)

    @triton.jit
    def _mix_backward_kernel(SRC, GQ, LOGITS, LSE, GRAD_MIX_TABLE, GRAD_LSE, GRAD_SRC, COEF, N, D, eps,
                             S: tl.constexpr, R: tl.constexpr, S_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                             MIX_BF16: tl.constexpr, STAGES: tl.constexpr):
        n, s, d, s_ok, d_ok, v, inv = _load_token_sources(SRC, N, D, eps, S, S_PAD, BLOCK_D)
        # Pass 1: the logit gradients of every read, written as coefficients ∂ℓ_rs·inv_s.
        norm_term = tl.zeros((S_PAD,), dtype=tl.float32)
        for r in tl.range(0, R, num_stages=STAGES):
            logit = tl.load(LOGITS + (r * N + n) * S + s, mask=s_ok, other=0.0)
            w = tl.where(s_ok, tl.exp(logit - tl.load(LSE + r * N + n)), 0.0)
            g = tl.load(_row_pointer(GRAD_MIX_TABLE, r, n, D, MIX_BF16) + d, mask=d_ok, other=0.0).to(tl.float32)
            a = tl.sum(v * g[None, :], axis=1)
            grad_logit = w * (a - tl.sum(w * a, axis=0)) + tl.load(GRAD_LSE + r * N + n) * w
            tl.store(COEF + (s * R + r) * N + n, grad_logit * inv, mask=s_ok)
            norm_term += grad_logit * logit
        # Pass 2: the source gradients, with the sources out of registers; what it reads again (the
        # logits, the coefficients this program wrote, the mix gradients) comes from cache.
        tl.debug_barrier()
        grad_v = -(inv * inv * norm_term / D)[:, None] * v
        for r in tl.range(0, R, num_stages=STAGES):
            logit = tl.load(LOGITS + (r * N + n) * S + s, mask=s_ok, other=0.0)
            w = tl.where(s_ok, tl.exp(logit - tl.load(LSE + r * N + n)), 0.0)
            coef = tl.load(COEF + (s * R + r) * N + n, mask=s_ok, other=0.0)
            g = tl.load(_row_pointer(GRAD_MIX_TABLE, r, n, D, MIX_BF16) + d, mask=d_ok, other=0.0).to(tl.float32)
            q = tl.load(GQ + r * D + d, mask=d_ok, other=0.0)
            grad_v += w[:, None] * g[None, :] + coef[:, None] * q[None, :]
        for k in tl.static_range(S):
            row = tl.sum(tl.where(s[:, None] == k, grad_v, 0.0), axis=0)
            tl.store(GRAD_SRC[k] + n * D + d, row.to(GRAD_SRC[k].dtype.element_ty), mask=d_ok)

    @triton.jit
    def _query_grad_kernel(SRC, COEF, PART, N, D, S: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr,
                           PRECISION: tl.constexpr):
        """PART[p, r, d] = Σ_n Σ_s COEF[s, r, n]·SRC[s][n, d] over program p's tokens, for its tile of d:
        one (R_PAD × BLOCK_N)·(BLOCK_N × BLOCK_D) product per source and token tile, so each source is
        read once for all R reads (S separate (R × N)·(N × D) matmuls read it once per read tile and run
        as skinny SIMT split-K GEMMs)."""
        pid_n = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        r = tl.arange(0, R_PAD)
        d_ok, r_ok = d < D, r < R
        acc = tl.zeros((R_PAD, BLOCK_D), dtype=tl.float32)
        for i in tl.range(0, TILES_PER_PROGRAM):
            n = (pid_n * TILES_PER_PROGRAM + i) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < N
            for k in tl.static_range(S):
                coef = tl.load(COEF + (k * R + r[:, None]) * N + n[None, :], mask=r_ok[:, None] & n_ok[None, :],
                               other=0.0)
                v = tl.load(SRC[k] + n.to(tl.int64)[:, None] * D + d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                            other=0.0).to(tl.float32)
                acc = tl.dot(coef, v, acc, input_precision=PRECISION)
        tl.store(PART + (pid_n * R + r[:, None]) * D + d[None, :], acc, mask=r_ok[:, None] & d_ok[None, :])

    # Warps per token program of the phase-1 kernels. One warp keeps every reduction inside the warp, but
    # caps a Hopper SM at 32 resident one-warp programs (half its warp slots); more warps per token put
    # more loads in flight per program at the price of cross-warp reductions. bench/attnres_kernels.py
    # (--mix-warps) times the choices.
    # The forward kernel unrolls its loop over the reads up to this many reads; `stages` > 1
    # software-pipelines the loads of a loop it does not unroll (Triton's cp.async prefetch): 3 stages
    # took S 4, R 18 from 0.46 to 0.35 ms (bf16 mixes, H200, 2026-12-04 eighth session); unrolling
    # all 18 reads instead gained nothing (0.46).
    MIX_FORWARD = {"warps": 1, "unroll_reads": 8, "stages": 3}
    # The backward keeps two passes over the reads even where one would fit (sources and source
    # gradients both in registers, S ≤ 4): at 223 registers a thread, one pass ran 0.91 ms against the two
    # passes' 0.70 (S 4, R 18, 32,768 tokens, bf16 mix gradients, H200), as fewer warps fit on an SM.
    # Its loops over the reads are pipelined `stages` deep from `pipelined_from` sources on: 3 stages
    # took S 4, R 18 from 0.69 to 0.60 ms and S 6, R 7 from 0.48 to 0.44, but S 2, R 8 from 0.22 to
    # 0.25 (bf16 mix gradients, H200, 2026-12-04 eighth session).
    MIX_BACKWARD = {"warps": 1, "stages": 3, "pipelined_from": 3}
    # The ∂q̃ reduction (_query_grad_kernel): tokens × columns per tile, token-tile programs, warps,
    # pipeline stages, and the products' precision by the mixes' dtype. With fp32 mixes tf32x3 (three
    # TF32 tensor-core products, about fp32's accuracy: 5e-7 of the largest entry); with bf16 mixes,
    # whose rounding (4e-3) already bounds the gradients, one TF32 product (9e-4), at half the time.
    # The interpreter computes in fp32 whatever is asked. At 8 warps and 32 × 64 tiles the kernel takes
    # 127 registers at S 4, R 18 (sm_90, bench/kernel_codegen.py); 4 warps or 64 × 128 tiles spill.
    QUERY_GRAD = {"tokens": 32, "cols": 64, "programs": 64, "warps": 8, "stages": 2,
                  "precision": {torch.float32: "tf32x3", torch.bfloat16: "tf32"}}

    def _backward_stages(num_sources: int) -> int:
        return MIX_BACKWARD["stages"] if num_sources >= MIX_BACKWARD["pipelined_from"] else 1

    def _aligned(t: Tensor) -> Tensor:
        return t if t.data_ptr() % 16 == 0 else t.clone()

    def _query_grad_launch(num_sources: int, num_reads: int, tokens: int, dim: int,
                           mix_dtype: torch.dtype) -> tuple[tuple[int, int], dict]:
        """(grid, meta) of _query_grad_kernel under QUERY_GRAD: the grid is (token-tile programs, column
        tiles); meta holds the constexprs, num_warps and num_stages (PRECISION before _dot_precision)."""
        shape = QUERY_GRAD
        tiles = triton.cdiv(tokens, shape["tokens"])
        tiles_per_program = triton.cdiv(tiles, shape["programs"])
        block_d = min(shape["cols"], triton.next_power_of_2(dim))
        grid = (triton.cdiv(tiles, tiles_per_program), triton.cdiv(dim, block_d))
        return grid, {"S": num_sources, "R": num_reads, "R_PAD": max(16, triton.next_power_of_2(num_reads)),
                      "BLOCK_N": shape["tokens"], "BLOCK_D": block_d, "TILES_PER_PROGRAM": tiles_per_program,
                      "PRECISION": shape["precision"][mix_dtype], "num_warps": shape["warps"],
                      "num_stages": shape["stages"]}

    def _query_grad(sources: list[Tensor], coef: Tensor, mix_dtype: torch.dtype) -> Tensor:
        """∂q̃ (R, D) = Σ_s coef[s] @ sources[s] with coef (S, R, N), by _query_grad_kernel's partial rows,
        at the products' precision for mixes of mix_dtype."""
        n, d = sources[0].shape
        grid, meta = _query_grad_launch(coef.shape[0], coef.shape[1], n, d, mix_dtype)
        meta["PRECISION"] = _dot_precision(meta["PRECISION"], coef.device)
        part = torch.empty((grid[0], coef.shape[1], d), dtype=torch.float32, device=coef.device)
        _query_grad_kernel[grid](tuple(sources), coef, part, n, d, **meta)
        return part.sum(0)

    def _dot_precision(precision: str, device: torch.device) -> str:
        """`precision`, or full fp32 products on a device before Ampere (which has no TF32)."""
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
            return "ieee"
        return precision

    def _mix_meta(num_sources: int, num_reads: int, dim: int, mix_dtype: torch.dtype, warps: int = 1) -> dict:
        if mix_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the AttnRes mixes are stored in float32 or bfloat16, not {mix_dtype}")
        return {"S": num_sources, "R": num_reads, "S_PAD": max(2, triton.next_power_of_2(num_sources)),
                "BLOCK_D": triton.next_power_of_2(dim), "MIX_BF16": mix_dtype == torch.bfloat16,
                "num_warps": warps}

    # Opaque custom operators (their kernels take tuples of tensors, which the traced triton_op path
    # does not), so torch.compile sees them as graph nodes with known outputs, and autograd gets the
    # backward below.

    @torch.library.custom_op("kotodama::attnres_block_mix", mutates_args=())
    def attnres_block_mix(sources: list[Tensor], folded_queries: Tensor, eps: float,
                          mix_dtype: torch.dtype) -> tuple[list[Tensor], Tensor, Tensor]:
        n, d = sources[0].shape
        r = folded_queries.shape[0]
        mixes = [torch.empty((n, d), dtype=mix_dtype, device=sources[0].device) for _ in range(r)]
        logits = torch.empty((r, n, len(sources)), dtype=torch.float32, device=sources[0].device)
        lse = torch.empty((r, n), dtype=torch.float32, device=sources[0].device)
        _mix_forward_kernel[(n,)](tuple(sources), folded_queries, _pointer_table(mixes), logits, lse, n, d, eps,
                                  UNROLL=r <= MIX_FORWARD["unroll_reads"], STAGES=MIX_FORWARD["stages"],
                                  **_mix_meta(len(sources), r, d, mix_dtype, MIX_FORWARD["warps"]))
        return mixes, lse, logits

    @attnres_block_mix.register_fake
    def _(sources, folded_queries, eps, mix_dtype):
        n, d = sources[0].shape
        r = folded_queries.shape[0]
        return ([sources[0].new_empty((n, d), dtype=mix_dtype) for _ in range(r)],
                sources[0].new_empty((r, n), dtype=torch.float32),
                sources[0].new_empty((r, n, len(sources)), dtype=torch.float32))

    def _source_grads_and_coef(sources: list[Tensor], folded_queries: Tensor, logits: Tensor, lse: Tensor,
                               grad_mixes: list[Tensor], grad_lse: Tensor,
                               eps: float) -> tuple[list[Tensor], Tensor]:
        """_mix_backward_kernel: the S source gradients and the ∂q̃ coefficients (S, R, N)."""
        n, d = sources[0].shape
        r = folded_queries.shape[0]
        grad_sources = [torch.empty_like(v) for v in sources]
        coef = torch.empty((len(sources), r, n), dtype=torch.float32, device=sources[0].device)
        mix_dtype = grad_mixes[0].dtype
        # _row_pointer declares every table address 16-byte aligned; a gradient that is a view at an odd
        # offset is copied so that the declaration holds.
        grad_mixes = [_aligned(g.to(mix_dtype).contiguous()) for g in grad_mixes]
        _mix_backward_kernel[(n,)](tuple(sources), folded_queries, logits, lse, _pointer_table(grad_mixes), grad_lse,
                                   tuple(grad_sources), coef, n, d, eps, STAGES=_backward_stages(len(sources)),
                                   **_mix_meta(len(sources), r, d, mix_dtype, MIX_BACKWARD["warps"]))
        return grad_sources, coef

    @torch.library.custom_op("kotodama::attnres_block_mix_backward", mutates_args=())
    def attnres_block_mix_backward(sources: list[Tensor], folded_queries: Tensor, logits: Tensor, lse: Tensor,
                                   grad_mixes: list[Tensor], grad_lse: Tensor,
                                   eps: float) -> tuple[list[Tensor], Tensor]:
        grad_sources, coef = _source_grads_and_coef(sources, folded_queries, logits, lse, grad_mixes, grad_lse, eps)
        return grad_sources, _query_grad(sources, coef, grad_mixes[0].dtype)

    @attnres_block_mix_backward.register_fake
    def _(sources, folded_queries, logits, lse, grad_mixes, grad_lse, eps):
        return [torch.empty_like(v) for v in sources], torch.empty_like(folded_queries)

    def _setup_context(ctx, inputs, output):
        sources, folded_queries, eps, mix_dtype = inputs
        _mixes, lse, logits = output
        ctx.save_for_backward(folded_queries, lse, logits, *sources)
        ctx.eps = eps
        ctx.mix_dtype = mix_dtype
        ctx.mark_non_differentiable(logits)
        # Autograd would otherwise fill a zero gradient for every output without one (the logits, and a
        # read whose mix or lse goes unused); _backward fills in the few it needs.
        ctx.set_materialize_grads(False)

    def _backward(ctx, grad_mixes, grad_lse, _grad_logits):
        folded_queries, lse, logits, *sources = ctx.saved_tensors
        n, d = sources[0].shape
        grad_mixes = [lse.new_zeros((n, d), dtype=ctx.mix_dtype) if g is None else g
                      for g in (grad_mixes or [None] * folded_queries.shape[0])]
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.contiguous()
        grad_sources, grad_q = attnres_block_mix_backward(list(sources), folded_queries, logits, lse,
                                                          grad_mixes, grad_lse, ctx.eps)
        return grad_sources, grad_q, None, None

    attnres_block_mix.register_autograd(_backward, setup_context=_setup_context)

    @triton.jit
    def _merge_norm_forward_kernel(MIX, BASE, DELTA, LSE, GQ, WN, Y, P_OUT, SIG, INV_P, RSTD, N, D, read_eps,
                                   norm_eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                                   HAS_DELTA: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < N
        col_ok = cols < D
        tile = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        mix = tl.load(MIX + offs, mask=tile, other=0.0).to(tl.float32)
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
    def _merge_norm_backward_kernel(MIX, P, GQ, WN, GY, GP_IN, SIG, INV_P, RSTD, GRAD_MIX, GRAD_P, GRAD_DELTA,
                                    GRAD_LSE, PART_WN, PART_GQ, N, D, TILES_PER_PROGRAM: tl.constexpr,
                                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DELTA: tl.constexpr,
                                    HAS_GRAD_P: tl.constexpr):
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
    # Pipelining that loop (num_stages 2 or 3) left the backward at 0.27–0.28 ms (bf16 mixes, H200, eighth
    # session of 2026-12-04), so it runs unpipelined.
    MERGE_FORWARD = {"rows": 1, "warps": 1}
    MERGE_BACKWARD = {"rows": 1, "warps": 1}
    MERGE_PROGRAMS = 2048

    def _merge_meta(shape: dict, d: int) -> dict:
        return {"BLOCK_M": shape["rows"], "BLOCK_D": triton.next_power_of_2(d), "num_warps": shape["warps"]}

    # Kernel arguments a launch does not use (its HAS_* switch is off) point at one of its own outputs;
    # the kernel never touches them.

    @torch.library.triton_op("kotodama::attnres_merge_norm", mutates_args=())
    def attnres_merge_norm(mix: Tensor, lse: Tensor, base: Tensor, delta: Tensor | None, folded_query: Tensor,
                           norm_weight: Tensor, read_eps: float, norm_eps: float,
                           out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(y, p, σ, inv_p, r); p = base + delta when delta is given, else an empty tensor."""
        n, d = base.shape
        y = torch.empty((n, d), dtype=out_dtype, device=base.device)
        sig, inv_p, rstd = (torch.empty((n,), dtype=torch.float32, device=base.device) for _ in range(3))
        p_out = torch.empty((n, d) if delta is not None else (0,), dtype=base.dtype, device=base.device)
        torch.library.wrap_triton(_merge_norm_forward_kernel)[(triton.cdiv(n, MERGE_FORWARD["rows"]),)](
            mix, base, sig if delta is None else delta, lse, folded_query, norm_weight, y,
            sig if delta is None else p_out, sig, inv_p, rstd, n, d, read_eps, norm_eps,
            HAS_DELTA=delta is not None, **_merge_meta(MERGE_FORWARD, d))
        return y, p_out, sig, inv_p, rstd

    @torch.library.triton_op("kotodama::attnres_merge_norm_backward", mutates_args=())
    def attnres_merge_norm_backward(mix: Tensor, p: Tensor, folded_query: Tensor, norm_weight: Tensor,
                                    grad_y: Tensor, grad_p_in: Tensor | None, sig: Tensor, inv_p: Tensor,
                                    rstd: Tensor, has_delta: bool,
                                    delta_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(∂mix, ∂p, ∂delta, ∂lse, ∂q̃, ∂w); ∂p includes grad_p_in; ∂delta is empty without a delta."""
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
            mix, p, folded_query, norm_weight, grad_y, grad_lse if grad_p_in is None else grad_p_in, sig, inv_p,
            rstd, grad_mix, grad_p, grad_delta if has_delta else grad_lse, grad_lse, part_wn, part_gq, n, d,
            tiles_per_program, HAS_DELTA=has_delta, HAS_GRAD_P=grad_p_in is not None,
            **_merge_meta(MERGE_BACKWARD, d))
        return grad_mix, grad_p, grad_delta, grad_lse, part_gq.sum(0), part_wn.sum(0)

    def _merge_setup_context(ctx, inputs, output):
        mix, _lse, base, delta, folded_query, norm_weight, _read_eps, _norm_eps, _out_dtype = inputs
        _y, p_out, sig, inv_p, rstd = output
        ctx.save_for_backward(mix, base if delta is None else p_out, folded_query, norm_weight, sig, inv_p, rstd)
        ctx.delta_dtype = None if delta is None else delta.dtype
        ctx.mark_non_differentiable(sig, inv_p, rstd)

    def _merge_backward(ctx, grad_y, grad_p_out, *_stats):
        mix, p, folded_query, norm_weight, sig, inv_p, rstd = ctx.saved_tensors
        has_delta = ctx.delta_dtype is not None
        grad_p_in = grad_p_out.contiguous() if has_delta and grad_p_out is not None else None
        grad_mix, grad_p, grad_delta, grad_lse, grad_q, grad_wn = attnres_merge_norm_backward(
            mix, p, folded_query, norm_weight, grad_y.contiguous(), grad_p_in, sig, inv_p, rstd, has_delta,
            ctx.delta_dtype or p.dtype)
        return (grad_mix, grad_lse, grad_p, grad_delta if has_delta else None, grad_q, grad_wn,
                None, None, None)

    attnres_merge_norm.register_autograd(_merge_backward, setup_context=_merge_setup_context)


def completed_sources_mix_triton(done: list[Tensor], queries: Tensor, norm_weights: Tensor, eps: float,
                                 mix_dtype: torch.dtype = torch.float32) -> tuple[list[Tensor], list[Tensor]]:
    """attnres.completed_sources_mix with the Triton kernels: sources (B, T, D) each, queries and norm
    gains (R, D). Returns the R mixes (B, T, D) in mix_dtype (float32 or bfloat16: the model stores them
    in the autocast dtype, as the matmuls after each read take them) and the R lse (B, T) in float32,
    as lists."""
    if len(done) > MAX_SOURCES:
        raise ValueError(f"the Triton AttnRes kernels take at most {MAX_SOURCES} sources, got {len(done)}")
    shape = done[0].shape
    sources = [v.reshape(-1, shape[-1]).contiguous() for v in done]
    folded = (norm_weights.float() * queries.float()).contiguous()
    mixes, lse, _logits = attnres_block_mix(sources, folded, float(eps), mix_dtype)
    return [m.view(shape) for m in mixes], list(lse.view(-1, *shape[:-1]).unbind(0))


def merged_read_norm_triton(mix: Tensor, lse: Tensor, partial: Tensor, query: Tensor, read_gain: Tensor,
                            read_eps: float, norm_weight: Tensor, norm_eps: float,
                            out_dtype: torch.dtype | None = None, delta: Tensor | None = None):
    """attnres.merged_read_norm (same arguments and result) in one Triton kernel each way: mix, partial
    (B, T, D), lse (B, T), query, read_gain and norm_weight (D,). With `delta` (B, T, D), the residual
    add before the read runs in the same kernel: the read is of partial + delta, and the result is
    (partial + delta, y)."""
    shape = partial.shape
    d = shape[-1]
    folded = (read_gain.float() * query.float()).contiguous()
    y, p_out, _sig, _inv_p, _rstd = attnres_merge_norm(
        mix.reshape(-1, d).contiguous(), lse.reshape(-1).contiguous().float(), partial.reshape(-1, d).contiguous(),
        None if delta is None else delta.reshape(-1, d).contiguous(), folded, norm_weight.float().contiguous(),
        float(read_eps), float(norm_eps), out_dtype or partial.dtype)
    if delta is None:
        return y.view(shape)
    return p_out.view(shape), y.view(shape)
