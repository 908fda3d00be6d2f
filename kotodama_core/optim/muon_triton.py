"""Muon's element-wise passes as three Triton kernels per shape bucket, CUDA only.

For a bucket of N matrices of one shape (rows × cols) with gradients g_j (separate tensors, read through a
pointer table, so nothing is stacked), the momentum stack B (N, rows, cols) and weights W_j:
    momentum:   B_j ← μ·B_j + g_j,   u_j = g_j + μ·B_j (Nesterov) or B_j,   written once in bf16,
                with the per-block partial sums of u_j² (fp32, of the bf16 values) beside it;
    normalize:  u_j ← u_j / (‖u_j‖_F + eps),   ‖u_j‖_F² = the sum of matrix j's partial sums
                (summed in a fixed order, so the result does not depend on scheduling: no atomics);
    apply:      W_j ← W_j·(1 − lr·wd) − lr·s·O_j,   O = NS(u) of any strides (a transposed view too),
                in fp32 registers, one read and one write of W.
The PyTorch path in muon.py does the same with a gradient stack, separate adds, a norm, a division, a
cast and a foreach lerp: about twice the memory traffic and five times the launches. Bytes per element
here: 14 (momentum: g, B read and write, u) + 4 (normalize) + 10 (apply: O, W read and write).
tests/test_optim.py checks this path against the PyTorch one (on CUDA, or on the CPU under
TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kotodama_core.pointer_table import pointer_table, triton

if triton is not None:
    import triton.language as tl

# Elements per program of the 1-D passes, and the tile of the apply pass.
BLOCK = 4096
TILE = 64


_FLOATS = (torch.float32, torch.bfloat16)


def supported(params: list[Tensor]) -> bool:
    """True when the fused passes can serve these weights and their gradients: Triton is installed, and
    the weights and gradients are contiguous fp32 or bf16, one dtype each. (Muon also asks for CUDA unless
    told to use them: under TRITON_INTERPRET=1 they run on the CPU, which only tests want.)"""
    if triton is None or not params:
        return False
    p0 = params[0]
    return all(p.grad is not None and p.is_contiguous() and p.grad.is_contiguous()
               and p.dtype == p0.dtype and p.grad.dtype == p0.grad.dtype
               and p.dtype in _FLOATS and p.grad.dtype in _FLOATS for p in params)


if triton is not None:

    @triton.jit
    def _muon_momentum_kernel(GRADS, BUF, U, PARTIAL, numel, num_blocks, mu,
                         NESTEROV: tl.constexpr, GRAD_BF16: tl.constexpr, BLOCK: tl.constexpr):
        m = tl.program_id(0)
        b = tl.program_id(1)
        offs = b * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        base = m.to(tl.int64) * numel
        grad_type = tl.bfloat16 if GRAD_BF16 else tl.float32
        g = tl.load(tl.load(GRADS + m).to(tl.pointer_type(grad_type)) + offs, mask=ok, other=0.0).to(tl.float32)
        buf = mu * tl.load(BUF + base + offs, mask=ok, other=0.0).to(tl.float32) + g
        tl.store(BUF + base + offs, buf.to(BUF.dtype.element_ty), mask=ok)
        if NESTEROV:
            u = (g + mu * buf).to(U.dtype.element_ty)
        else:
            u = buf.to(U.dtype.element_ty)
        tl.store(U + base + offs, u, mask=ok)
        uf = u.to(tl.float32)
        tl.store(PARTIAL + m * num_blocks + b, tl.sum(uf * uf, axis=0))

    @triton.jit
    def _muon_normalize_kernel(U, PARTIAL, numel, num_blocks, eps, PARTS: tl.constexpr, BLOCK: tl.constexpr):
        m = tl.program_id(0)
        b = tl.program_id(1)
        p = tl.arange(0, PARTS)
        squares = tl.sum(tl.load(PARTIAL + m * num_blocks + p, mask=p < num_blocks, other=0.0), axis=0)
        scale = 1.0 / (tl.sqrt(squares) + eps)
        offs = b * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        base = m.to(tl.int64) * numel
        x = tl.load(U + base + offs, mask=ok, other=0.0).to(tl.float32) * scale
        tl.store(U + base + offs, x.to(U.dtype.element_ty), mask=ok)

    @triton.jit
    def _muon_apply_kernel(PARAMS, O, rows, cols, so_n, so_r, so_c, decay, step,
                      PARAM_BF16: tl.constexpr, TILE: tl.constexpr):
        m = tl.program_id(0)
        tile = tl.program_id(1)
        tiles_c = tl.cdiv(cols, TILE)
        r = (tile // tiles_c) * TILE + tl.arange(0, TILE)
        c = (tile % tiles_c) * TILE + tl.arange(0, TILE)
        ok = (r < rows)[:, None] & (c < cols)[None, :]
        o = tl.load(O + m.to(tl.int64) * so_n + r[:, None] * so_r + c[None, :] * so_c, mask=ok, other=0.0)
        param_type = tl.bfloat16 if PARAM_BF16 else tl.float32
        w_at = tl.load(PARAMS + m).to(tl.pointer_type(param_type)) + r[:, None] * cols + c[None, :]
        w = tl.load(w_at, mask=ok, other=0.0).to(tl.float32)
        tl.store(w_at, (w * decay - step * o.to(tl.float32)).to(param_type), mask=ok)


def momentum_normalized(grads: list[Tensor], momentum: Tensor, mu: float, nesterov: bool, eps: float,
                        out_dtype: torch.dtype) -> Tensor:
    """Update the (N, rows, cols) momentum stack in place from the N gradients and return the Newton–Schulz
    input u/‖u‖_F per matrix as a new (N, rows, cols) stack of out_dtype."""
    n, rows, cols = momentum.shape
    numel = rows * cols
    blocks = triton.cdiv(numel, BLOCK)
    update = torch.empty(momentum.shape, dtype=out_dtype, device=momentum.device)
    partial = torch.empty(n, blocks, dtype=torch.float32, device=momentum.device)
    grid = (n, blocks)
    _muon_momentum_kernel[grid](pointer_table(grads), momentum, update, partial, numel, blocks, mu,
                           NESTEROV=nesterov, GRAD_BF16=grads[0].dtype == torch.bfloat16, BLOCK=BLOCK,
                           num_warps=8)
    _muon_normalize_kernel[grid](update, partial, numel, blocks, eps, PARTS=triton.next_power_of_2(blocks),
                            BLOCK=BLOCK, num_warps=8)
    return update


def apply_update(params: list[Tensor], ortho: Tensor, decay: float, step: float) -> None:
    """W_j ← W_j·decay − step·O_j for each weight j of the bucket (decay = 1 − lr·wd, step = lr·scale)."""
    n, rows, cols = ortho.shape
    tiles = triton.cdiv(rows, TILE) * triton.cdiv(cols, TILE)
    _muon_apply_kernel[(n, tiles)](pointer_table(params), ortho, rows, cols, *ortho.stride(), decay, step,
                              PARAM_BF16=params[0].dtype == torch.bfloat16, TILE=TILE, num_warps=4)
