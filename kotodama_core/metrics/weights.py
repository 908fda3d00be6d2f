"""Spectral geometry of weight matrices: stable rank, participation ratio, power-law alpha of the ESD."""

from __future__ import annotations

import math

import numpy as np
import torch


def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weight matrix holds NaN or inf")
    return w.detach().to(torch.float64 if w.device.type == "cpu" else torch.float32)


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """σ_1 ≥ σ_2 ≥ … of W (float64 on CPU for stable closed-form checks)."""
    return torch.linalg.svdvals(_as_matrix(w))


def stable_rank(w: torch.Tensor) -> float:
    """Stable rank  srank(W) = ‖W‖_F² / ‖W‖_2² = Σ_i σ_i² / σ_max².

    Lies in [1, rank(W)]; equals k for a matrix with k equal non-zero singular values.
    """
    w = _as_matrix(w)
    fro2 = float(w.pow(2).sum())
    if fro2 == 0.0:
        raise ValueError("stable rank of an all-zero matrix is undefined")
    smax = float(torch.linalg.matrix_norm(w, ord=2))
    return fro2 / (smax * smax)


def participation_ratio(values: torch.Tensor | np.ndarray) -> float:
    """Participation ratio  PR(x) = (Σ_i x_i)² / Σ_i x_i²  of non-negative values x.

    Applied to the singular values σ of a weight matrix (PR(σ)) or to the PCA eigenvalues λ of a point
    cloud (effective dimensionality). Equals k when k values are equal and the rest zero.
    """
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("participation ratio of an empty vector is undefined")
    if (x < 0).any() or not torch.isfinite(x).all():
        raise ValueError("participation ratio needs finite non-negative values")
    denom = float(x.pow(2).sum())
    if denom == 0.0:
        raise ValueError("participation ratio of an all-zero vector is undefined")
    return float(x.sum()) ** 2 / denom


def weight_participation_ratio(w: torch.Tensor) -> float:
    """PR of the singular values:  (Σ σ_i)² / Σ σ_i²."""
    return participation_ratio(singular_values(w))


def powerlaw_alpha_hill(eigs: np.ndarray, xmin: float) -> float:
    """Continuous power-law MLE (Clauset et al. 2009) for the tail λ ≥ xmin:
    α̂ = 1 + n / Σ_{λ_i ≥ xmin} ln(λ_i / xmin),  n = #{λ_i ≥ xmin}."""
    tail = eigs[eigs >= xmin]
    logs = np.log(tail / xmin).sum()
    if tail.size < 2 or logs <= 0:
        raise ValueError("power-law tail too short to fit")
    return 1.0 + tail.size / logs


def esd_alpha(w: torch.Tensor, min_tail: int = 5) -> float:
    """Power-law exponent α of the empirical spectral density of W, WeightWatcher style.

    Eigenvalues λ_i = σ_i² of the correlation matrix WᵀW (WeightWatcher normalises by N, which does not
    change α). For every candidate xmin among the λ_i (keeping ≥ `min_tail` points in the tail) fit
    α̂(xmin) = 1 + n / Σ ln(λ_i / xmin) and keep the xmin minimising the Kolmogorov–Smirnov distance
    D = max_x |F_emp(x) − (1 − (x/xmin)^{1−α̂})| over the tail.
    """
    eigs = np.sort(singular_values(w).cpu().numpy() ** 2)
    eigs = eigs[eigs > eigs.max() * 1e-12]
    if eigs.size < min_tail + 1:
        raise ValueError(f"need more than {min_tail} non-zero eigenvalues to fit a power law, got {eigs.size}")
    best_d, best_alpha = math.inf, math.nan
    for i in range(eigs.size - min_tail + 1):
        xmin = eigs[i]
        tail = eigs[i:]
        logs = np.log(tail / xmin)
        s = logs.sum()
        if s <= 0:
            continue
        alpha = 1.0 + tail.size / s
        model_cdf = 1.0 - (tail / xmin) ** (1.0 - alpha)
        n = tail.size
        emp_hi = np.arange(1, n + 1) / n
        emp_lo = np.arange(0, n) / n
        d = max(np.abs(emp_hi - model_cdf).max(), np.abs(emp_lo - model_cdf).max())
        if d < best_d:
            best_d, best_alpha = d, alpha
    if not math.isfinite(best_alpha):
        raise ValueError("no power-law fit found (all eigenvalues equal?)")
    return float(best_alpha)
