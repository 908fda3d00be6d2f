"""Concept geometry: effective dimensionality, Mantel tests, cross-model PC1 alignment, layer trajectories."""

from __future__ import annotations

import numpy as np
import torch
from kotodama_core.metrics.weights import participation_ratio


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values` (flattened), ties given their average rank (as scipy.stats.rankdata's
    default 'average' method): rank_i = (first_i + last_i) / 2 over the 1-based sorted positions of the
    tie group of i. Kept here in numpy so the core needs no scipy (scipy is in the `eval` extra)."""
    a = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    inverse = np.empty(a.size, dtype=np.intp)
    inverse[order] = np.arange(a.size)
    ordered = a[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]]
    group = starts.cumsum()[inverse]  # 1-based tie group of each value
    bounds = np.r_[np.nonzero(starts)[0], a.size]  # group g spans sorted positions bounds[g-1] .. bounds[g]-1
    return 0.5 * (bounds[group] + bounds[group - 1] + 1)


def _matrix(x: torch.Tensor | np.ndarray) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D array (items × features), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("input holds NaN or inf")
    return a


def pca_eigenvalues(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Eigenvalues of the sample covariance of the rows of X (descending)."""
    a = _matrix(x)
    if a.shape[0] < 2:
        raise ValueError("need at least 2 items for a covariance")
    centered = a - a.mean(0)
    s = np.linalg.svd(centered, compute_uv=False)
    return s ** 2 / (a.shape[0] - 1)


def effective_dimensionality(x: torch.Tensor | np.ndarray) -> float:
    """Effective dimensionality of a concept set = participation ratio of its PCA eigenvalues:

    ED = (Σ_k λ_k)² / Σ_k λ_k²,  λ the eigenvalues of the covariance of the item representations.
    """
    return participation_ratio(pca_eigenvalues(x))


def _check_square(name: str, d: np.ndarray) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"{name} must be a square distance matrix, got shape {d.shape}")
    if d.shape[0] < 3:
        raise ValueError(f"{name}: a Mantel test needs at least 3 items, got {d.shape[0]}")
    if not np.isfinite(d).all():
        raise ValueError(f"{name} holds NaN or inf")
    return d


def _upper(d: np.ndarray) -> np.ndarray:
    return d[np.triu_indices(d.shape[0], k=1)]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    if denom == 0:
        raise ValueError("a distance matrix is constant; correlation undefined")
    return float((a * b).sum() / denom)


def _partial(rxy: float, rxz: float, ryz: float) -> float:
    denom = np.sqrt((1 - rxz ** 2) * (1 - ryz ** 2))
    if denom == 0:
        raise ValueError("control matrix is perfectly correlated with an input; partial correlation undefined")
    return float((rxy - rxz * ryz) / denom)


def mantel_test(dx: np.ndarray, dy: np.ndarray, permutations: int = 999,
                seed: int = 0) -> tuple[float, float]:
    """Mantel test with Spearman correlation between two distance matrices over the same n items.

    ρ = Pearson(rank(upper(Dx)), rank(upper(Dy))); p = (1 + #{π : ρ_π ≥ ρ}) / (1 + P), with ρ_π computed
    after permuting rows and columns of Dx together (one-sided, greater). Returns (ρ, p).
    """
    dx, dy = _check_square("dx", dx), _check_square("dy", dy)
    if dx.shape != dy.shape:
        raise ValueError(f"distance matrices differ in shape: {dx.shape} vs {dy.shape}")
    ry = rankdata(_upper(dy))
    rho = _pearson(rankdata(_upper(dx)), ry)
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(permutations):
        perm = rng.permutation(dx.shape[0])
        if _pearson(rankdata(_upper(dx[np.ix_(perm, perm)])), ry) >= rho:
            hits += 1
    return rho, (1 + hits) / (1 + permutations)


def partial_mantel_test(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray, permutations: int = 999,
                        seed: int = 0) -> tuple[float, float]:
    """Partial Mantel test (Spearman) of Dx vs Dy controlling for Dz (e.g. Levenshtein distance):

    ρ_xy·z = (ρ_xy − ρ_xz ρ_yz) / √((1 − ρ_xz²)(1 − ρ_yz²)),  ρ the Spearman correlations of the upper
    triangles; p from permuting Dx's items as in `mantel_test`. Returns (ρ_xy·z, p).
    """
    dx, dy, dz = (_check_square(n, d) for n, d in (("dx", dx), ("dy", dy), ("dz", dz)))
    if not dx.shape == dy.shape == dz.shape:
        raise ValueError(f"distance matrices differ in shape: {dx.shape}, {dy.shape}, {dz.shape}")
    ry, rz = rankdata(_upper(dy)), rankdata(_upper(dz))
    ryz = _pearson(ry, rz)

    def stat(d: np.ndarray) -> float:
        rx = rankdata(_upper(d))
        return _partial(_pearson(rx, ry), _pearson(rx, rz), ryz)

    rho = stat(dx)
    rng = np.random.default_rng(seed)
    hits = sum(stat(dx[np.ix_(p, p)]) >= rho for p in (rng.permutation(dx.shape[0]) for _ in range(permutations)))
    return rho, (1 + hits) / (1 + permutations)


def levenshtein(a: str, b: str) -> int:
    """Edit distance: the fewest single-character insertions, deletions and substitutions turning a into b."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def levenshtein_matrix(words: list[str]) -> np.ndarray:
    """D_ij = levenshtein(words[i], words[j])."""
    n = len(words)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            d[i, j] = d[j, i] = levenshtein(words[i], words[j])
    return d


def pairwise_distances(x: torch.Tensor | np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Representational distance matrix: cosine distance 1 − cos(x_i, x_j), or Euclidean ‖x_i − x_j‖."""
    a = _matrix(x)
    if metric == "cosine":
        norms = np.linalg.norm(a, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ValueError("cosine distance: a row is all zeros")
        u = a / norms
        return np.clip(1.0 - u @ u.T, 0.0, 2.0)
    if metric == "euclidean":
        sq = (a * a).sum(1)
        return np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2 * a @ a.T, 0.0, None))
    raise ValueError(f"unknown metric {metric!r}: use 'cosine' or 'euclidean'")


def first_principal_component(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Unit vector along the direction of largest variance of the centred rows of X."""
    a = _matrix(x)
    _, _, vt = np.linalg.svd(a - a.mean(0), full_matrices=False)
    return vt[0]


def pc1_cosine(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """|cos(PC1(X), PC1(Y))| between the first principal components of two models' representations of the
    same inputs (equal widths). The sign of a principal component is arbitrary, hence the absolute value.
    """
    px, py = first_principal_component(x), first_principal_component(y)
    if px.shape != py.shape:
        raise ValueError(f"PC1 cosine needs equal widths, got {px.shape[0]} and {py.shape[0]}")
    return float(abs(px @ py))


def trajectory_consistency(layers: list[torch.Tensor | np.ndarray]) -> list[float]:
    """Layer-to-layer trajectory consistency of item representations h^(0), h^(1), …, h^(L):

    Δ^(l) = h^(l+1) − h^(l),   c_l = mean_i cos(Δ_i^(l), Δ_i^(l+1)),  l = 0 … L−2.

    c > 0: successive layers push each item the same way (smooth refinement); c < 0: zig-zag.
    """
    hs = [_matrix(h) for h in layers]
    if len(hs) < 3:
        raise ValueError("trajectory consistency needs at least 3 layers")
    if any(h.shape != hs[0].shape for h in hs):
        raise ValueError("all layers must have the same shape")
    deltas = [b - a for a, b in zip(hs, hs[1:])]
    out = []
    for d1, d2 in zip(deltas, deltas[1:]):
        n1, n2 = np.linalg.norm(d1, axis=1), np.linalg.norm(d2, axis=1)
        if (n1 == 0).any() or (n2 == 0).any():
            raise ValueError("a layer leaves an item unchanged; its update direction is undefined")
        out.append(float(((d1 * d2).sum(1) / (n1 * n2)).mean()))
    return out
