"""Each geometric metric against a closed form (and against reference packages where they install)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from kotodama_core import metrics as M


def orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def with_singular_values(s: list[float], rows: int = 7, cols: int = 5) -> torch.Tensor:
    k = len(s)
    return orthogonal(rows, 1)[:, :k] @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ orthogonal(cols, 2)[:k]


def test_stable_rank_closed_form():
    assert M.stable_rank(with_singular_values([3.0, 2.0, 1.0])) == pytest.approx(14 / 9)
    assert M.stable_rank(torch.eye(6)) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="all-zero"):
        M.stable_rank(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="2-D"):
        M.stable_rank(torch.ones(2, 2, 2))


def test_participation_ratio_closed_form():
    assert M.participation_ratio(torch.tensor([1.0, 1.0, 1.0, 0.0])) == pytest.approx(3.0)
    assert M.participation_ratio(np.array([3.0, 1.0])) == pytest.approx(16 / 10)
    assert M.weight_participation_ratio(with_singular_values([2.0, 1.0])) == pytest.approx(9 / 5)
    with pytest.raises(ValueError, match="non-negative"):
        M.participation_ratio(np.array([1.0, -1.0]))


def test_powerlaw_hill_estimator_closed_form():
    # tail {1, e} above xmin = 1: α = 1 + 2 / (ln 1 + ln e) = 3
    assert M.powerlaw_alpha_hill(np.array([0.5, 1.0, math.e]), xmin=1.0) == pytest.approx(3.0)


def test_esd_alpha_recovers_exponent_of_exact_power_law_spectrum():
    alpha, n = 3.0, 200
    u = (np.arange(n) + 0.5) / n
    eigs = (1 - u) ** (-1 / (alpha - 1))          # quantiles of a Pareto law with xmin = 1
    w = orthogonal(n, 3) @ torch.diag(torch.tensor(np.sqrt(eigs))) @ orthogonal(n, 4)
    assert M.esd_alpha(w) == pytest.approx(alpha, rel=0.05)


def test_esd_alpha_matches_weightwatcher():
    ww = pytest.importorskip("weightwatcher")
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    w = torch.distributions.StudentT(torch.tensor(2.5)).sample((300, 150))
    net = torch.nn.Sequential(torch.nn.Linear(150, 300, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(w)
    reference = float(ww.WeightWatcher(model=net).analyze()["alpha"].iloc[0])
    assert M.esd_alpha(w) == pytest.approx(reference, rel=0.02)


def test_rankme_counts_equal_singular_values():
    assert M.rankme(with_singular_values([1.0, 1.0, 1.0], rows=20, cols=8)) == pytest.approx(3.0, rel=1e-4)
    assert M.rankme(torch.ones(10, 4)) == pytest.approx(1.0, rel=1e-4)
    # p = (2/3, 1/3): exp(H) = exp(−(2/3 ln 2/3 + 1/3 ln 1/3))
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert M.rankme(with_singular_values([2.0, 1.0]), eps=0.0) == pytest.approx(math.exp(h))


def test_anisotropy_closed_form():
    assert M.anisotropy(torch.eye(5)) == pytest.approx(0.0)
    assert M.anisotropy(torch.tensor([[1.0, 2.0]] * 4)) == pytest.approx(1.0)
    # e1, e2, e1+e2: cosines 0, 1/√2, 1/√2
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert M.anisotropy(h) == pytest.approx(math.sqrt(2) / 3)
    assert M.anisotropy(h.reshape(1, 3, 2)) == pytest.approx(math.sqrt(2) / 3)
    with pytest.raises(ValueError, match="all zeros"):
        M.anisotropy(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="NaN"):
        M.anisotropy(torch.tensor([[1.0, float("nan")], [1.0, 0.0]]))


def test_dead_unit_fraction():
    acts = torch.randn(2, 16, 8)
    acts[..., [1, 6]] = 0.0
    assert M.dead_unit_fraction(acts) == pytest.approx(2 / 8)


def test_twonn_hand_computed_line():
    # points 0, 1, 3 on a line: μ = r2/r1 = 3, 2, 1.5
    x = np.array([[0.0], [1.0], [3.0]])
    lx = np.log([1.5, 2.0, 3.0])
    ly = -np.log(1 - np.arange(3) / 3)
    assert M.twonn_dimension(x, discard_fraction=0.0) == pytest.approx((lx * ly).sum() / (lx * lx).sum())


def test_twonn_dimension_of_a_3d_cube_in_10d_and_against_skdim():
    rng = np.random.default_rng(0)
    x = np.zeros((1000, 10))
    x[:, :3] = rng.uniform(size=(1000, 3))
    d = M.twonn_dimension(x)
    assert d == pytest.approx(3.0, rel=0.1)
    skdim = pytest.importorskip("skdim")
    assert d == pytest.approx(skdim.id.TwoNN().fit(x).dimension_, rel=0.02)


def causal_uniform(b: int, h: int, t: int) -> torch.Tensor:
    mask = torch.tril(torch.ones(t, t))
    return (mask / mask.sum(-1, keepdim=True)).expand(b, h, t, t)


def test_attention_entropy_and_bos_mass_of_uniform_causal_attention():
    t = 6
    probs = causal_uniform(2, 3, t)
    ent = M.attention_entropy(probs)
    assert ent.shape == (3,)
    assert torch.allclose(ent, torch.full((3,), np.mean([math.log(k + 1) for k in range(1, t)]), dtype=ent.dtype))
    bos = M.bos_attention_mass(probs)
    assert torch.allclose(bos, torch.full((3,), np.mean([1 / (k + 1) for k in range(1, t)]), dtype=bos.dtype))


def test_attention_entropy_of_a_bos_sink_is_zero():
    probs = torch.zeros(1, 2, 5, 5)
    probs[..., 0] = 1.0
    assert torch.allclose(M.attention_entropy(probs), torch.zeros(2))
    assert torch.allclose(M.bos_attention_mass(probs), torch.ones(2))
    with pytest.raises(ValueError, match="B, H, T, T"):
        M.attention_entropy(torch.zeros(2, 5, 5))


def test_effective_dimensionality():
    x = np.array([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]])
    assert M.effective_dimensionality(x) == pytest.approx(2.0)
    # variances 4 and 1 along two axes: (4+1)²/(16+1)
    y = np.array([[2.0, 0], [-2, 0], [0, 1], [0, -1]])
    assert M.effective_dimensionality(y) == pytest.approx(25 / 17)


def line_distances(n: int) -> np.ndarray:
    idx = np.arange(n, dtype=float)
    return np.abs(idx[:, None] - idx[None, :])


def test_mantel_monotone_and_reversed():
    d = line_distances(8)
    rho, p = M.mantel_test(d, d ** 2, permutations=199)
    assert rho == pytest.approx(1.0)
    assert p <= 0.02
    rho, p = M.mantel_test(d, -d, permutations=199)
    assert rho == pytest.approx(-1.0)
    assert p > 0.9
    with pytest.raises(ValueError, match="shape"):
        M.mantel_test(d, line_distances(7))


def test_mantel_statistic_equals_spearman_of_upper_triangles():
    rng = np.random.default_rng(1)
    a, b = rng.random((9, 9)), rng.random((9, 9))
    a, b = a + a.T, b + b.T
    iu = np.triu_indices(9, 1)
    rho, _ = M.mantel_test(a, b, permutations=9)
    assert rho == pytest.approx(spearmanr(a[iu], b[iu]).statistic)


def test_partial_mantel_formula_and_control_removes_confound():
    rng = np.random.default_rng(2)
    n = 10
    z = rng.random((n, n)); z = z + z.T
    x = z + 0.3 * (lambda r: r + r.T)(rng.random((n, n)))
    y = z + 0.3 * (lambda r: r + r.T)(rng.random((n, n)))
    iu = np.triu_indices(n, 1)
    rxy = spearmanr(x[iu], y[iu]).statistic
    rxz = spearmanr(x[iu], z[iu]).statistic
    ryz = spearmanr(y[iu], z[iu]).statistic
    expected = (rxy - rxz * ryz) / math.sqrt((1 - rxz ** 2) * (1 - ryz ** 2))
    rho, p = M.partial_mantel_test(x, y, z, permutations=99)
    assert rho == pytest.approx(expected)
    assert abs(rho) < rxy          # the shared cause z explains most of the x–y correlation


def test_levenshtein():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein("", "abc") == 3
    assert M.levenshtein("2001", "2002") == 1
    assert M.levenshtein_matrix(["1990", "1991", "2001"]).tolist() == [[0, 1, 4], [1, 0, 3], [4, 3, 0]]


def test_pc1_cosine_of_a_rotated_cloud():
    x = np.concatenate([np.diag([5.0, 1.0, 0.5]), -np.diag([5.0, 1.0, 0.5])])   # PC1 = e1 exactly
    theta = 0.4
    rot = np.array([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]])
    assert M.pc1_cosine(x, x @ rot.T) == pytest.approx(math.cos(theta), abs=1e-9)
    assert M.pc1_cosine(x, -x) == pytest.approx(1.0)


def test_trajectory_consistency_smooth_and_zigzag():
    e1 = np.array([[1.0, 0.0], [0.0, 1.0]])
    layers = [0 * e1, e1, 2 * e1, e1]       # steps +e, +e, −e
    assert M.trajectory_consistency(layers) == pytest.approx([1.0, -1.0])
    with pytest.raises(ValueError, match="at least 3"):
        M.trajectory_consistency(layers[:2])
