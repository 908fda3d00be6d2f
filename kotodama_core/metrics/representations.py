"""Geometry of representation point clouds (rows = tokens or items, columns = features)."""

from __future__ import annotations

import numpy as np
import torch


def _points(x: torch.Tensor | np.ndarray, min_rows: int = 2) -> torch.Tensor:
    t = torch.as_tensor(x).detach()
    if t.ndim < 2:
        raise ValueError(f"expected points of shape (..., N, D), got {tuple(t.shape)}")
    t = t.reshape(-1, t.shape[-1]).to(torch.float64 if t.device.type == "cpu" else torch.float32)
    if t.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} points, got {t.shape[0]}")
    if not torch.isfinite(t).all():
        raise ValueError("representations hold NaN or inf")
    return t


def singular_values_of_points(z: torch.Tensor) -> torch.Tensor:
    """σ of Z; for a tall Z (N ≫ D, e.g. a 49152 × 512 embedding) as √eig(ZᵀZ), far cheaper than an SVD."""
    n, d = z.shape
    if n > 4 * d:
        z = z.to(torch.float64)
        return torch.linalg.eigvalsh(z.T @ z).clamp_min(0).sqrt().flip(0)
    return torch.linalg.svdvals(z)


def rankme(z: torch.Tensor | np.ndarray, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023), a smooth effective rank of a point cloud Z (N × D):

    p_k = σ_k / Σ_j σ_j + ε,   RankMe(Z) = exp( −Σ_k p_k ln p_k ),

    σ the singular values of Z. Equals k (up to ε) when Z has k equal non-zero singular values.
    """
    s = singular_values_of_points(_points(z, min_rows=1))
    total = float(s.sum())
    if total == 0.0:
        raise ValueError("RankMe of an all-zero matrix is undefined")
    p = s / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def anisotropy(h: torch.Tensor | np.ndarray) -> float:
    """Anisotropy = mean pairwise cosine similarity over distinct rows i ≠ j:

    A = 1/(N(N−1)) Σ_{i≠j} cos(h_i, h_j) = (‖Σ_i u_i‖² − N) / (N(N−1)),   u_i = h_i / ‖h_i‖.

    0 for isotropic (e.g. mutually orthogonal) rows, 1 when all rows point the same way. Inputs of shape
    (..., D) are flattened to rows.
    """
    x = _points(h)
    norms = x.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        raise ValueError("anisotropy: a representation vector is all zeros (cosine undefined)")
    u = x / norms
    n = u.shape[0]
    total = float(u.sum(0).pow(2).sum())
    return (total - n) / (n * (n - 1))


def dead_unit_fraction(acts: torch.Tensor | np.ndarray, tol: float = 1e-6) -> float:
    """Fraction of units (last axis) that never fire on the given tokens:

    dead = (1/F) · #{ f : max_n |a_{n,f}| ≤ tol }.
    """
    a = _points(acts, min_rows=1)
    return float((a.abs().amax(dim=0) <= tol).double().mean())


def twonn_dimension(x: torch.Tensor | np.ndarray, discard_fraction: float = 0.1) -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017).

    For each point, μ_i = r_2 / r_1 (distances to its 2nd and 1st nearest neighbours); under local
    uniformity F(μ) = 1 − μ^{−d}, so −ln(1 − F(μ)) = d · ln μ. Sort the μ_i, drop the largest
    `discard_fraction`, set F_emp(μ_(i)) = i / N (i = 0 … m−1) and fit the line through the origin:

    d̂ = Σ_i ln μ_(i) · (−ln(1 − i/N)) / Σ_i (ln μ_(i))².
    """
    pts = _points(x, min_rows=3)
    dist = torch.cdist(pts, pts)
    dist.fill_diagonal_(float("inf"))
    r = torch.topk(dist, 2, dim=1, largest=False).values
    r1, r2 = r[:, 0], r[:, 1]
    if (r1 == 0).any():
        raise ValueError("TwoNN: duplicate points (zero nearest-neighbour distance); deduplicate first")
    mu = torch.sort(r2 / r1).values.cpu().numpy()
    n = mu.size
    m = int(n * (1 - discard_fraction))
    if m < 2:
        raise ValueError(f"TwoNN: too few points ({n}) after discarding {discard_fraction:.0%}")
    xlog = np.log(mu[:m])
    y = -np.log(1 - np.arange(m) / n)
    denom = float((xlog * xlog).sum())
    if denom == 0.0:
        raise ValueError("TwoNN: all neighbour ratios are 1 (degenerate point set)")
    return float((xlog * y).sum() / denom)
