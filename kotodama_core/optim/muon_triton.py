"""Muon's element-wise passes as three Triton kernels, CUDA only.

For a bucket of N matrices of one shape (rows × cols) with gradients g_j (separate tensors, read through a
pointer table, so nothing is stacked), the momentum stack B (N, rows, cols) and weights W_j:
    momentum:   B_j ← μ·B_j + g_j,   u_j = g_j + μ·B_j (Nesterov) or B_j,   written once in bf16 into a
                Newton–Schulz stack of any strides (a tall matrix goes in transposed, so tall and wide
                matrices of one size share one batched Newton–Schulz), with each tile's Σu_j² beside it;
    normalize:  u_j ← u_j / (‖u_j‖_F + eps),   ‖u_j‖_F² = the sum of matrix j's tile sums (fp32, of the
                bf16 values, summed in a fixed order: no atomics, so no dependence on scheduling);
    apply:      W_j ← W_j·(1 − lr·wd) − lr·s·O_j,   O = NS(u) of any strides, in fp32 registers, one read
                and one write of W, with lr read from the device (a captured step follows the schedule).
The PyTorch path in muon.py does the same with a gradient stack, separate adds, a norm, a division, a
cast and a foreach lerp: about twice the memory traffic and five times the launches. Bytes per element
here: 14 (momentum: g, B read and write, u) + 4 (normalize) + 10 (apply: O, W read and write).
tests/test_muon_triton.py checks this path against the PyTorch one (on CUDA, or on the CPU under
TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kotodama_core.pointer_table import triton

if triton is not None:
    import triton.language as tl

# Elements per program of the normalize pass; the tile of the momentum and apply passes; warps per
# program of each pass.
BLOCK = 4096
TILE = 64
MOMENTUM_WARPS, NORMALIZE_WARPS, APPLY_WARPS = 8, 8, 4


_FLOATS = (torch.float32, torch.bfloat16)


def supported(params: list[Tensor], grads: list[Tensor]) -> bool:
    """True when the fused passes can serve these weights and their gradients: Triton is installed, and
    the weights and gradients are contiguous fp32 or bf16, one dtype each. (Muon also asks for CUDA unless
    told to use them: under TRITON_INTERPRET=1 they run on the CPU, which only tests want.)"""
    if triton is None or not params:
        return False
    p_dtype, g_dtype = params[0].dtype, grads[0].dtype
    if p_dtype not in _FLOATS or g_dtype not in _FLOATS:
        return False
    # One pass, few attribute reads: this runs before every step, ahead of the replayed graph.
    return (all(p.dtype == p_dtype and p.is_contiguous() for p in params)
            and all(g.dtype == g_dtype and g.is_contiguous() for g in grads))


if triton is not None:

    @triton.jit
    def _tile(rows, cols, TILE: tl.constexpr):
        """This program's TILE × TILE tile of a rows × cols matrix (tiles row-major along axis 1 of the
        grid): its row and column indices and the in-bounds mask."""
        tile = tl.program_id(1)
        tiles_c = tl.cdiv(cols, TILE)
        r = (tile // tiles_c) * TILE + tl.arange(0, TILE)
        c = (tile % tiles_c) * TILE + tl.arange(0, TILE)
        return r, c, (r < rows)[:, None] & (c < cols)[None, :]

    @triton.jit
    def _muon_momentum_kernel(GRADS, BUF, U, PARTIAL, rows, cols, su_n, su_r, su_c, mu,
                              NESTEROV: tl.constexpr, GRAD_BF16: tl.constexpr, TILE: tl.constexpr):
        m = tl.program_id(0)
        r, c, ok = _tile(rows, cols, TILE)
        offs = r[:, None] * cols + c[None, :]
        grad_type = tl.bfloat16 if GRAD_BF16 else tl.float32
        g = tl.load(tl.load(GRADS + m).to(tl.pointer_type(grad_type)) + offs, mask=ok, other=0.0).to(tl.float32)
        buf_at = BUF + m.to(tl.int64) * rows * cols + offs
        buf = mu * tl.load(buf_at, mask=ok, other=0.0).to(tl.float32) + g
        tl.store(buf_at, buf.to(BUF.dtype.element_ty), mask=ok)
        if NESTEROV:
            u = (g + mu * buf).to(U.dtype.element_ty)
        else:
            u = buf.to(U.dtype.element_ty)
        tl.store(U + m.to(tl.int64) * su_n + r[:, None] * su_r + c[None, :] * su_c, u, mask=ok)
        uf = u.to(tl.float32)
        tl.store(PARTIAL + m * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(uf * uf, axis=1), axis=0))

    @triton.jit
    def _muon_normalize_kernel(U, PARTIAL, numel, num_parts, eps, PARTS: tl.constexpr, BLOCK: tl.constexpr):
        m = tl.program_id(0)
        b = tl.program_id(1)
        p = tl.arange(0, PARTS)
        squares = tl.sum(tl.load(PARTIAL + m * num_parts + p, mask=p < num_parts, other=0.0), axis=0)
        scale = 1.0 / (tl.sqrt(squares) + eps)
        offs = b * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        at = U + m.to(tl.int64) * numel + offs
        tl.store(at, (tl.load(at, mask=ok, other=0.0).to(tl.float32) * scale).to(U.dtype.element_ty), mask=ok)

    @triton.jit
    def _muon_apply_kernel(PARAMS, O, LR, rows, cols, so_n, so_r, so_c, weight_decay, scale,
                           PARAM_BF16: tl.constexpr, TILE: tl.constexpr):
        m = tl.program_id(0)
        r, c, ok = _tile(rows, cols, TILE)
        o = tl.load(O + m.to(tl.int64) * so_n + r[:, None] * so_r + c[None, :] * so_c, mask=ok, other=0.0)
        param_type = tl.bfloat16 if PARAM_BF16 else tl.float32
        w_at = tl.load(PARAMS + m).to(tl.pointer_type(param_type)) + r[:, None] * cols + c[None, :]
        w = tl.load(w_at, mask=ok, other=0.0).to(tl.float32)
        lr = tl.load(LR).to(tl.float32)
        tl.store(w_at, (w * (1.0 - lr * weight_decay) - (lr * scale) * o.to(tl.float32)).to(param_type), mask=ok)


def tiles(rows: int, cols: int) -> int:
    """Tiles (of TILE × TILE) per rows × cols matrix: the partial sums per matrix of `momentum`."""
    return triton.cdiv(rows, TILE) * triton.cdiv(cols, TILE)


def momentum(grad_table: Tensor, grad_dtype: torch.dtype, stack: Tensor, update: Tensor, partial: Tensor,
             mu: float, nesterov: bool) -> None:
    """Update the (N, rows, cols) momentum stack in place from the N gradients whose addresses grad_table
    holds, write the Newton–Schulz input u into `update` (an (N, rows, cols) view of any strides, e.g. the
    transpose of a wide stack) and each tile's Σu² into partial (N, tiles(rows, cols))."""
    n, rows, cols = stack.shape
    _muon_momentum_kernel[(n, tiles(rows, cols))](
        grad_table, stack, update, partial, rows, cols, *update.stride(), mu,
        NESTEROV=nesterov, GRAD_BF16=grad_dtype == torch.bfloat16, TILE=TILE, num_warps=MOMENTUM_WARPS)


def normalize(update: Tensor, partial: Tensor, eps: float) -> None:
    """u_j ← u_j / (‖u_j‖_F + eps) in place over a contiguous (N, r, c) stack, from momentum's partial sums."""
    n, rows, cols = update.shape
    numel, parts = rows * cols, partial.shape[1]
    _muon_normalize_kernel[(n, triton.cdiv(numel, BLOCK))](
        update, partial, numel, parts, eps, PARTS=triton.next_power_of_2(parts), BLOCK=BLOCK, num_warps=NORMALIZE_WARPS)


def apply_update(param_table: Tensor, param_dtype: torch.dtype, ortho: Tensor, lr: Tensor, weight_decay: float,
                 scale: float) -> None:
    """W_j ← W_j·(1 − lr·weight_decay) − lr·scale·O_j for the N weights whose addresses param_table holds;
    ortho is (N, rows, cols) of any strides, lr a one-element device tensor (read by the kernel, so a
    captured step follows the schedule)."""
    n, rows, cols = ortho.shape
    _muon_apply_kernel[(n, tiles(rows, cols))](
        param_table, ortho, lr, rows, cols, *ortho.stride(), weight_decay, scale,
        PARAM_BF16=param_dtype == torch.bfloat16, TILE=TILE, num_warps=APPLY_WARPS)
