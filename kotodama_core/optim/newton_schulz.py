"""Newton–Schulz orthogonalization: an approximation of U·Vᵀ for G = U·Σ·Vᵀ from matrix products only.

With X₀ = G/‖G‖_F (rows ≤ cols, transposing if needed, so every singular value lies in [0, 1]) each step is
    X ← (a·I + b·A + c·A²)·X,   A = X·Xᵀ,
i.e. every singular value σ moves to p(σ) = a·σ + b·σ³ + c·σ⁵. The coefficients decide where the singular
values end up; they do not converge to exactly 1 (test_optim measures the band of each variant).

Variants (selected by name):
  "quintic"  (3.4445, −4.7750, 2.0315) every step, the classic Muon iteration.
  "gram_ns"  Kotodama's per-step schedule GRAM_NS_SCHEDULE, classic iteration.
  "gram"     the same schedule carried out as a Gram Newton–Schulz iteration (below).

Gram Newton–Schulz. For an r×c matrix with r < c the classic step costs two r×r×c products. Every X_k is
Q_k·X₀ for an r×r matrix Q_k that is a polynomial in R = X₀·X₀ᵀ, and every such polynomial commutes with
R, so with A_k = X_k·X_kᵀ and P_k = a·I + b·A_k + c·A_k²:
    Q_{k+1} = P_k·Q_k,    A_{k+1} = P_k·A_k·P_k,
which needs only r×r products; X = Q_K·X₀ is formed once at the end. Rounding errors in A are amplified
by later steps (in bf16 most of all), so the iteration re-anchors after the steps in GRAM_RESTARTS:
X₀ ← Q·X₀, A ← X₀·X₀ᵀ, Q ← I. Cost for r×c, five steps and one restart: 4·r²c + 14·r³ multiply-adds,
versus 5·(2·r²c + r³) = 10·r²c + 5·r³ classically — a saving once c is above about 1.5·r.

Runs in bf16 on CUDA and fp32 elsewhere; a (N, r, c) stack is orthogonalized in one batched call, and every
step's scalings ride in the products' epilogues (addmm/baddbmm): a classic step is three products and a
diagonal add.
"""

from __future__ import annotations

import torch
from torch import Tensor

QUINTIC = (3.4445, -4.7750, 2.0315)
GRAM_NS_SCHEDULE = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
VARIANTS = ("quintic", "gram_ns", "gram")
# Added to ‖G‖_F before dividing, so a zero gradient gives a zero update.
NORM_EPS = 1e-7
# Re-anchor the Gram iteration after this many steps (1-based step counts).
GRAM_RESTARTS = (2,)


def ns_coefficients(variant: str, steps: int) -> list[tuple[float, float, float]]:
    """Per-step (a, b, c). The schedule variants repeat their last entry beyond five steps."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown Newton-Schulz variant {variant!r}; choose one of {VARIANTS}")
    if steps < 1:
        raise ValueError(f"Newton-Schulz needs at least one step, got {steps}")
    if variant == "quintic":
        return [QUINTIC] * steps
    return [GRAM_NS_SCHEDULE[min(i, len(GRAM_NS_SCHEDULE) - 1)] for i in range(steps)]


def ns_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def orthogonalize(G: Tensor, variant: str = "gram_ns", steps: int = 5, eps: float = NORM_EPS,
                  dtype: torch.dtype | None = None, out_scale: float = 1.0, normalized: bool = False) -> Tensor:
    """Approximate U·Vᵀ of G, shape (r, c) or (N, r, c); returns `dtype` (bf16 on CUDA, else fp32).
    out_scale multiplies the result inside the last product (no extra pass, no extra rounding).
    normalized: G is already G/(‖G‖_F + eps) per matrix (muon_triton does it in its momentum pass)."""
    if G.ndim not in (2, 3):
        raise ValueError(f"orthogonalize expects (rows, cols) or (batch, rows, cols), got {tuple(G.shape)}")
    coeffs = ns_coefficients(variant, steps)
    X = G.to(dtype or ns_dtype(G.device))
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = X.mT
    if not normalized:
        X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    X = _gram_iteration(X, coeffs, out_scale) if variant == "gram" else _classic_iteration(X, coeffs, out_scale)
    return X.mT if transposed else X


def _addmm(bias: Tensor, m1: Tensor, m2: Tensor, beta: float, alpha: float) -> Tensor:
    """beta·bias + alpha·(m1 @ m2) as one product (cuBLAS applies both scalars in its epilogue, after the
    bias is copied into the output), for a single matrix or a (N, r, c) stack; the plain expression
    takes three passes."""
    if m1.ndim == 2:
        return torch.addmm(bias, m1, m2, beta=beta, alpha=alpha)
    return torch.baddbmm(bias, m1, m2, beta=beta, alpha=alpha)


def _classic_iteration(X: Tensor, coeffs: list[tuple[float, float, float]], out_scale: float = 1.0) -> Tensor:
    # X ← (a·I + b·A + c·A²)·X with A = X·Xᵀ: three products per step. a·I joins the r×r polynomial on its
    # diagonal instead of entering the last product as a·X: a product with a summand first copies that
    # summand into its output (an r×c copy per step, and a slow transposing one for a tall matrix's view).
    for step, (a, b, c) in enumerate(coeffs, start=1):
        k = out_scale if step == len(coeffs) else 1.0
        A = X @ X.mT
        P = _addmm(A, A, A, beta=b * k, alpha=c * k)
        P.diagonal(dim1=-2, dim2=-1).add_(a * k)
        X = P @ X
    return X


def _gram_iteration(X: Tensor, coeffs: list[tuple[float, float, float]], out_scale: float = 1.0) -> Tensor:
    A = X @ X.mT
    Q = None  # None stands for the identity, saving a product after each (re)start
    for step, (a, b, c) in enumerate(coeffs, start=1):
        P = _addmm(A, A, A, beta=b, alpha=c)  # b·A + c·A², then + a·I on the diagonal
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = P if Q is None else P @ Q
        if step == len(coeffs):
            break
        if step in GRAM_RESTARTS:
            X = Q @ X
            A = X @ X.mT
            Q = None
        else:
            A = P @ A @ P
            A = 0.5 * (A + A.mT)  # keep the Gram matrix exactly symmetric
    if Q is None:
        return X * out_scale if out_scale != 1.0 else X
    return Q @ X if out_scale == 1.0 else _addmm(X, Q, X, beta=0.0, alpha=out_scale)
